package dataplane

import (
	"encoding/json"
	"os"
	"time"
)

// Detached is one connection taken off a data plane, still open, for a
// hand-off to another agent process (a binary upgrade): its two sockets
// and what the plane needs to resume it. Closing the files closes nothing
// while another descriptor of the same socket is open (the receiving
// process's, or the one Adopt makes); the caller owns them.
type Detached struct {
	ID      uint64
	Kind    Kind // the plane that detached it, and the one that can adopt it
	Client  *os.File
	Backend *os.File
	// IdleTimeout is the connection's Conn.IdleTimeout, for the adopter's.
	IdleTimeout time.Duration
	// State is the plane's own record of the connection: counters so far,
	// last activity, half-closes, and bytes read from one socket and not
	// yet written to the other. Adopt of the same Kind reads it; a newer
	// agent's Adopt must read what an older one wrote.
	State json.RawMessage
}

// Handoff is implemented by data planes whose connections can move to
// another process without a byte lost or duplicated.
//
// A plane whose connections cannot move does not implement it, and an
// upgrade refuses to start while such a plane holds connections: the
// sockmap plane today (its sockets sit in BPF maps of this process, and
// taking them out is the delicate demotion of DESIGN.md facts 12–15).
type Handoff interface {
	Plane
	// Detach stops moving bytes for the connections ids, without closing
	// them, and returns their sockets and state. Bytes already read from a
	// socket and not yet written to its peer travel in the state: the
	// adopting plane writes them first. Unknown ids, and connections that
	// are closing anyway, are left out of the result (they finish here and
	// their Done runs as usual); a detached connection's Done is never
	// called by this plane. It returns once every listed connection is
	// either detached or finished.
	Detach(ids []uint64) ([]Detached, error)
	// Adopt resumes a connection detached by this or another agent process
	// of the same or an older version: c carries the sockets (made from
	// Detached's files), the id, the idle timeout and Done; state is
	// Detached.State. On error the caller still owns the sockets and Done
	// is not called.
	Adopt(c *Conn, state json.RawMessage) error
}
