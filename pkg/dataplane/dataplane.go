// Package dataplane moves the bytes of an established, already-proxied
// connection pair: in the kernel through a BPF sockhash (sockmap) or, as the
// fallback, with splice(2). It knows nothing about HTTP: by the time a pair
// reaches it, both heads have been exchanged by the proxy.
package dataplane

import (
	"net"
	"time"
)

// Kind names a data plane. It appears in logs, metrics labels and the CLI.
type Kind string

const (
	// KindSockmap forwards in the kernel with an sk_skb verdict program.
	KindSockmap Kind = "sockmap"
	// KindSplice copies with splice(2), borrowing pipes only while bytes move.
	KindSplice Kind = "splice"
)

// CloseReason says why a connection ended. Values are stable: they are
// metric label values and access-log fields.
type CloseReason string

const (
	ReasonClientFIN    CloseReason = "client_fin"      // client closed first, cleanly
	ReasonBackendFIN   CloseReason = "backend_fin"     // backend closed first, cleanly
	ReasonClientReset  CloseReason = "client_reset"    // client sent RST or errored
	ReasonBackendReset CloseReason = "backend_reset"   // backend sent RST or errored
	ReasonIdle         CloseReason = "idle_timeout"    // no bytes either way for IdleTimeout
	ReasonKill         CloseReason = "kill"            // operator closed it (wsplice kill)
	ReasonDrain        CloseReason = "drain"           // agent or backend drain deadline
	ReasonShutdown     CloseReason = "shutdown"        // agent stopped
	ReasonIntegrity    CloseReason = "integrity_reset" // kernel hand-off could not be proven exact
	ReasonError        CloseReason = "error"           // local failure (see Result.Err)
)

// Direction counts one direction of a connection.
type Direction struct {
	Bytes    uint64 // payload bytes forwarded
	Segments uint64 // skbs (sockmap) or read calls (splice) that carried them
}

// Stats is a snapshot of one connection, read on demand (scrape, CLI).
type Stats struct {
	Plane           Kind
	ClientToBackend Direction
	BackendToClient Direction
	LastActivity    time.Time // wall-clock time of the last forwarded byte
	Demoted         bool      // left the kernel path for splice (see DemoteReason)
	DemoteReason    string    // "parked", "rate", "" if never demoted
}

// Result is what a connection's life on the data plane ended with.
type Result struct {
	Stats
	Reason CloseReason
	Err    error // set for ReasonError / ReasonIntegrity, nil otherwise
}

// Conn is one client/backend pair handed to a data plane. On a successful
// Start the plane owns both sockets and closes them; Done is called exactly
// once, from any goroutine, after both are closed.
type Conn struct {
	ID          uint64
	Client      *net.TCPConn
	Backend     *net.TCPConn
	IdleTimeout time.Duration // 0 = never
	Done        func(Result)
}

// Plane is a data plane. Implementations are safe for concurrent use.
type Plane interface {
	// Kind names the plane.
	Kind() Kind
	// Start takes ownership of c's sockets and begins forwarding. On error
	// the caller still owns the sockets and may try another plane; Done is
	// not called.
	Start(c *Conn) error
	// Stats returns the live counters of connection id, false if unknown.
	Stats(id uint64) (Stats, bool)
	// Kill closes connection id with the given reason (RST to both sides
	// for ReasonKill, FIN for ReasonDrain/ReasonShutdown). False if unknown.
	Kill(id uint64, reason CloseReason) bool
	// Close stops the plane: every connection is closed with
	// ReasonShutdown and its Done called before Close returns.
	Close() error
}
