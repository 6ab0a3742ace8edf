// Package admin is the running agent's control API and the client the CLI
// uses to reach it. The API is JSON over HTTP on a Unix socket: the
// socket's file permissions are the only gate (directory 0750, socket
// 0660, so root and the socket's group may use it), as with Docker's and
// Caddy's admin sockets. Nouns read (status, conns, backends); verbs change
// (drain, undrain, weight, kill).
//
// The package knows nothing of the agent's internals: the agent implements
// Handler, and this package serves it, checks the socket's safety, and
// formats answers for people (tables) and scripts (JSON).
package admin

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Version is the API's path prefix. A change that breaks existing clients
// gets a new one.
const Version = "v1"

// Errors a Handler returns (wrapped) to choose the HTTP status, and the
// client returns (wrapped) for the same statuses.
var (
	// ErrNotFound: the backend or connection named does not exist (404).
	ErrNotFound = errors.New("not found")
	// ErrInvalid: the request is malformed or out of range (400).
	ErrInvalid = errors.New("invalid request")
	// ErrNoAgent: no agent answers on the socket (the client could not
	// connect, or was not allowed to).
	ErrNoAgent = errors.New("no agent answers")
	// ErrAgentRunning: Listen found another agent serving the socket.
	ErrAgentRunning = errors.New("another agent is running")
)

// Invalidf returns an error that reads as its message and matches
// ErrInvalid with errors.Is.
func Invalidf(format string, a ...any) error {
	return &kindError{fmt.Sprintf(format, a...), ErrInvalid}
}

// NotFoundf returns an error that reads as its message and matches
// ErrNotFound with errors.Is.
func NotFoundf(format string, a ...any) error {
	return &kindError{fmt.Sprintf(format, a...), ErrNotFound}
}

type kindError struct {
	msg  string
	kind error
}

func (e *kindError) Error() string        { return e.msg }
func (e *kindError) Is(target error) bool { return target == e.kind }

// Handler is the agent side of the API. Methods are called concurrently,
// one goroutine per request; ctx ends when the client goes away.
type Handler interface {
	// Status summarises the running agent.
	Status(ctx context.Context) (Status, error)
	// Conns lists the established connections that match q, oldest first.
	Conns(ctx context.Context, q ConnQuery) ([]Conn, error)
	// Backends lists every backend of every pool, in config order.
	Backends(ctx context.Context) ([]Backend, error)
	// Drain starts (on) or ends a drain of the backends that match spec
	// (see MatchBackend) and returns them. A draining backend gets no new
	// connections; its established ones stay.
	// With on and closeOver > 0 the backends' established connections are
	// also closed, spread evenly over closeOver, so their clients reconnect
	// elsewhere without a thundering herd; an undrain stops that.
	Drain(ctx context.Context, spec string, on bool, closeOver time.Duration) ([]Backend, error)
	// SetWeight sets the weight of the backends that match spec and
	// returns them.
	SetWeight(ctx context.Context, spec string, weight int) ([]Backend, error)
	// Kill closes connection id with an RST to both sides.
	Kill(ctx context.Context, id uint64) error
	// Reload re-reads and applies the agent's configuration file; an
	// invalid file changes nothing and the error says why.
	Reload(ctx context.Context) error
	// LameDuck marks the whole agent as draining (on) or not: readiness
	// turns false so load balancers and Kubernetes stop sending new
	// clients, while listeners keep accepting until the agent is stopped.
	LameDuck(ctx context.Context, on bool) error
	// Upgrade replaces the running agent with a new process of req.Binary
	// (empty: the agent's own executable, read again from disk) that takes
	// over its listeners and established connections without dropping one,
	// and returns once the new process serves. If the new process fails,
	// the running agent keeps serving and the error says why.
	Upgrade(ctx context.Context, req UpgradeRequest) (UpgradeResult, error)
}

// UpgradeRequest is the body of POST /v1/upgrade.
type UpgradeRequest struct {
	// Binary is the absolute path of the new binary; empty means the
	// running agent's own executable path. Only root (or the agent's own
	// user) may set it.
	Binary string `json:"binary,omitempty"`
	// Strict refuses the upgrade while connections that cannot move
	// (TLS-terminated) are open, instead of leaving them to the old agent.
	Strict bool `json:"strict,omitempty"`
}

// UpgradeResult is the answer to POST /v1/upgrade.
type UpgradeResult struct {
	OldPID      int `json:"old_pid"`
	NewPID      int `json:"new_pid"`
	Listeners   int `json:"listeners"`
	Connections int `json:"connections"` // handed over
	// Rejected connections stayed with the old agent, which serves them
	// until they close or its drain deadline.
	Rejected int `json:"rejected"`
	// Stayed counts every connection left with the old agent when the
	// new one took over: rejected ones, TLS-terminated ones (which cannot
	// move) and any a handshake established during the hand-off.
	Stayed  int `json:"stayed"`
	Batches int `json:"batches"`
	// MaxBatch is the longest any connection did not move (its batch's
	// detach to adoption); AcceptPause how long new clients waited in the
	// listen backlog.
	MaxBatch    float64 `json:"max_batch_seconds"`
	AcceptPause float64 `json:"accept_pause_seconds"`
	Seconds     float64 `json:"seconds"`
}

// MaxWeight is the largest weight SetWeight accepts (the config's range).
// 0 takes a backend out of new selections, like a drain.
const MaxWeight = 1000

// Status is GET /v1/status.
type Status struct {
	Version   string     `json:"version"`
	PID       int        `json:"pid"`
	Started   time.Time  `json:"started"`
	Draining  bool       `json:"draining"`
	Dataplane string     `json:"dataplane"` // "sockmap" (with splice as fallback) or "splice"
	Listeners []Listener `json:"listeners"`
	// Connections counts established connections now.
	Connections ConnCounts    `json:"connections"`
	Counters    Counters      `json:"counters"`
	Pools       []PoolSummary `json:"pools"`
	// Sockmap is set when the kernel data plane runs.
	Sockmap *SockmapStatus `json:"sockmap,omitempty"`
	// Metrics is the address of /metrics, /healthz and /readyz, if served.
	Metrics string `json:"metrics,omitempty"`
}

// Listener is one listening socket.
type Listener struct {
	Name      string `json:"name"`
	Address   string `json:"address"` // the bound address
	Mode      string `json:"mode"`
	Dataplane string `json:"dataplane"`
}

// ConnCounts counts established connections by data plane.
type ConnCounts struct {
	Active  int `json:"active"`
	Sockmap int `json:"sockmap"` // handed to the kernel plane (demoted ones included)
	Splice  int `json:"splice"`  // handed to splice
	TLS     int `json:"tls"`     // TLS-terminated (copied in userspace; cannot move in an upgrade)
	Demoted int `json:"demoted"` // left the kernel path for splice
}

// Counters are the proxy's totals since the agent started.
type Counters struct {
	Accepted       uint64            `json:"accepted"`
	Established    uint64            `json:"established"`
	ConnectFails   uint64            `json:"connect_failures"`
	PlaneFallbacks uint64            `json:"dataplane_fallbacks"`
	Refusals       map[string]uint64 `json:"refusals"`
}

// PoolSummary is one pool in Status.
type PoolSummary struct {
	Name     string `json:"name"`
	Backends int    `json:"backends"`
	Up       int    `json:"up"` // available for new connections
	Draining int    `json:"draining"`
	Active   int64  `json:"active"`
}

// SockmapStatus is the kernel plane's state in Status.
type SockmapStatus struct {
	Active           int               `json:"active"`
	Demoted          int               `json:"demoted"`
	ParkedBytes      int64             `json:"parked_bytes"`
	Demotions        map[string]uint64 `json:"demotions"`
	IntegrityResets  uint64            `json:"integrity_resets"`
	InsertFailures   uint64            `json:"insert_failures"`
	RedirectFailures uint64            `json:"redirect_failures"`
}

// ConnQuery filters GET /v1/conns. Empty fields match everything.
type ConnQuery struct {
	// Backend matches like MatchBackend.
	Backend string
	// Client is an address, address:port or CIDR prefix (MatchClient).
	Client string
	// Route is a route name exactly as listed.
	Route string
	// TCP asks for TCP detail (RTT, retransmits, queues) of both sockets
	// from the kernel's socket diagnostics; it costs two netlink queries
	// per listed connection.
	TCP bool
}

// Conn is one established connection.
type Conn struct {
	ID       uint64 `json:"id"`
	Listener string `json:"listener"`
	Route    string `json:"route"`
	Pool     string `json:"pool"`
	Backend  string `json:"backend"`
	Client   string `json:"client"`
	// Local is the agent's address on the client side, BackendLocal the
	// agent's address on the backend side.
	Local        string `json:"local,omitempty"`
	BackendLocal string `json:"backend_local,omitempty"`
	// Dataplane is the plane moving the bytes now: "sockmap", or "splice"
	// (configured, refused by sockmap, or Demoted).
	Dataplane    string    `json:"dataplane"`
	Demoted      bool      `json:"demoted,omitempty"`
	DemoteReason string    `json:"demote_reason,omitempty"`
	Status       int       `json:"status,omitempty"` // backend's response status (101)
	Started      time.Time `json:"started"`
	AgeSeconds   float64   `json:"age_seconds"`
	// IdleSeconds is the time since the last forwarded byte.
	IdleSeconds       float64  `json:"idle_seconds"`
	HandshakeSeconds  float64  `json:"handshake_seconds"`
	BytesToBackend    uint64   `json:"bytes_to_backend"`
	BytesToClient     uint64   `json:"bytes_to_client"`
	SegmentsToBackend uint64   `json:"segments_to_backend"`
	SegmentsToClient  uint64   `json:"segments_to_client"`
	ClientTCP         *TCPInfo `json:"client_tcp,omitempty"`
	BackendTCP        *TCPInfo `json:"backend_tcp,omitempty"`
}

// TCPInfo is one socket's TCP state, from NETLINK_SOCK_DIAG.
type TCPInfo struct {
	State       string `json:"state"`
	RTTMicros   uint32 `json:"rtt_us"`
	RTTVarUs    uint32 `json:"rttvar_us"`
	MinRTTUs    uint32 `json:"min_rtt_us"`
	Retransmits uint32 `json:"retransmits"` // total retransmitted segments
	Lost        uint32 `json:"lost"`
	Unacked     uint32 `json:"unacked"`
	Cwnd        uint32 `json:"cwnd"`
	// SendQueue is bytes written and not yet acknowledged; RecvQueue bytes
	// received and not yet read (on the kernel path the psock takes them).
	SendQueue     uint32 `json:"send_queue"`
	RecvQueue     uint32 `json:"recv_queue"`
	BytesAcked    uint64 `json:"bytes_acked"`
	BytesReceived uint64 `json:"bytes_received"`
}

// Backend is one backend of a pool.
type Backend struct {
	Pool    string `json:"pool"`
	Address string `json:"address"`
	// State is the summary: "up", "draining", "unhealthy" or "down"
	// (configured down), in that order of precedence from last to first.
	State    string       `json:"state"`
	Healthy  bool         `json:"healthy"`
	Draining bool         `json:"draining"`
	Down     bool         `json:"down"`
	Backup   bool         `json:"backup,omitempty"`
	Weight   int          `json:"weight"`
	Active   int64        `json:"active"`
	History  []Transition `json:"history,omitempty"`
}

// Transition is one change of a backend's State, newest first in History.
type Transition struct {
	Time  time.Time `json:"time"`
	State string    `json:"state"`
	// Cause says who changed it: "admin" (drain, undrain, weight) or
	// "observed" (health checks or a reload, seen by the agent's sampler).
	Cause string `json:"cause,omitempty"`
	// Reason says why, when known ("weight 1→5", a health-check error).
	Reason string `json:"reason,omitempty"`
}

// Backend states.
const (
	StateUp        = "up"
	StateDraining  = "draining"
	StateUnhealthy = "unhealthy"
	StateDown      = "down"
)

// BackendState summarises a backend's flags.
func BackendState(healthy, draining, down bool) string {
	switch {
	case down:
		return StateDown
	case !healthy:
		return StateUnhealthy
	case draining:
		return StateDraining
	}
	return StateUp
}

// errorBody is the JSON body of every non-2xx answer.
type errorBody struct {
	Error string `json:"error"`
}

// backendRequest is the body of drain, undrain and weight.
type backendRequest struct {
	Backend   string `json:"backend"`
	Weight    *int   `json:"weight,omitempty"`
	CloseOver string `json:"close_over,omitempty"` // drain: a Go duration
}
