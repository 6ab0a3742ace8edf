package metrics

import (
	"time"
)

// Direction label values of wsplice_bytes_total and wsplice_segments_total.
const (
	ToBackend = "to_backend" // client → backend
	ToClient  = "to_client"  // backend → client
)

// Flow counts one direction of a connection.
type Flow struct {
	Bytes    uint64
	Segments uint64
}

// Conn is one established connection as the collector sees it at scrape
// time. Dataplane is the plane the connection was handed to, which stays
// the same for its whole life (a sockmap connection demoted to splice is
// still a sockmap connection here), so a counter labelled with it never
// moves between series.
type Conn struct {
	ID        uint64
	Listener  string
	Route     string
	Pool      string
	Backend   string
	Dataplane string
	Client    string
	Start     time.Time
	// ToBackend and ToClient are the plane's live counters; zero when the
	// plane no longer knows the connection (it is closing).
	ToBackend Flow
	ToClient  Flow
}

// Backend is one backend of a pool and its state.
type Backend struct {
	Pool     string
	Address  string
	Weight   int
	Active   int64 // connections counted on it (established and connecting)
	Healthy  bool  // the last health-check verdict
	Draining bool  // operator drain: no new connections
	Down     bool  // configured down
	Backup   bool
}

// ProxyCounters are the proxy's monotonic counters.
type ProxyCounters struct {
	Accepted       uint64
	Established    uint64
	ConnectFails   uint64
	PlaneFallbacks uint64
	Refusals       map[string]uint64 // by reason
}

// SockmapCounters are the kernel data plane's counters.
type SockmapCounters struct {
	Active           int               // connections on the kernel path now
	Demoted          int               // demoted connections still open
	Demotions        map[string]uint64 // by reason: parked, rate, insert
	DemoteFailures   uint64
	IntegrityResets  uint64
	InsertFailures   uint64
	RedirectFailures uint64
	RedirectResets   uint64
	ParkedBytes      int64
	IterPasses       uint64
	IterTime         time.Duration
	DrainTime        time.Duration
}

// SpliceStats are the splice data plane's gauges.
type SpliceStats struct {
	Conns      int // connections on the plane, including demoted ones
	PipesIdle  int
	PipesTotal int
}

// Passthrough fallback reasons (wsplice_tls_passthrough_fallbacks_total's
// reason label): always exported, zero until the first one.
var TLSFallbackReasons = []string{"no_sni", "unknown_sni", "malformed"}

// TLSStats are the proxy's TLS counters and the copy plane's gauge.
type TLSStats struct {
	Handshakes uint64 // TLS handshakes completed on terminating listeners
	// PassthroughFallbacks counts ClientHellos tls_passthrough listeners
	// sent to their pool instead of a route, by reason (no_sni,
	// unknown_sni, malformed).
	PassthroughFallbacks map[string]uint64
	Reloads              uint64 // certificate reloads that succeeded
	ReloadFailures       uint64 // reloads refused, the previous certificates kept
	// CopyPlane is false while the agent has no copy plane (no listener
	// terminates or originates TLS); CopyConns is then not exported.
	CopyPlane bool
	CopyConns int // connections on the copy plane
}

// Source is the running agent as the collector reads it. Every method is
// called at scrape time, possibly from several scrapes at once, and must be
// safe for concurrent use. A method may panic: the collector recovers and
// counts a scrape error for that source instead of failing the scrape.
type Source interface {
	// EachConn calls fn for every established connection. fn must not
	// keep c after it returns (the implementation may reuse it).
	EachConn(fn func(c *Conn))
	// Backends returns every backend of every pool.
	Backends() []Backend
	// Proxy returns the proxy's counters.
	Proxy() ProxyCounters
	// Draining reports whether the agent is draining (shutting down).
	Draining() bool
	// Sockmap returns the kernel plane's counters; ok is false when the
	// agent runs without it.
	Sockmap() (c SockmapCounters, ok bool, err error)
	// Splice returns the splice plane's gauges; ok is false without one.
	Splice() (s SpliceStats, ok bool)
	// TLS returns the TLS counters and the copy plane's gauge; ok is false
	// when the source has no TLS support (nothing is exported).
	TLS() (t TLSStats, ok bool)
}
