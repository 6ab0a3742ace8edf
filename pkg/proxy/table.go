package proxy

import (
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/dataplane"
)

// Conn is one established connection as the agent knows it: where it came
// from, where it went, and which data plane moves its bytes. Byte counters
// are not here: they are read from the plane on demand.
type Conn struct {
	ID          uint64
	Listener    string
	Route       string
	Pool        string
	Backend     string
	Client      netip.AddrPort // client's address
	Local       netip.AddrPort // agent's address on the client side
	BackendTo   netip.AddrPort // backend's address as dialled
	BackendFrom netip.AddrPort // agent's address on the backend side
	Start       time.Time
	Upgrade     bool          // the client asked for a WebSocket upgrade
	Status      int           // backend's response status (101 for an upgrade, 0 in tcp mode)
	Handshake   time.Duration // accept → handed to the data plane
	Connect     time.Duration // TCP connect time of the successful backend try
	Plane       dataplane.Plane
	backend     *balance.Backend
	clientKey   netip.Addr // per-IP limit bucket
}

// table is the set of established connections, by id.
type table struct {
	mu    sync.Mutex
	conns map[uint64]*Conn
	n     atomic.Int64
}

func newTable() *table { return &table{conns: make(map[uint64]*Conn)} }

func (t *table) add(c *Conn) {
	t.mu.Lock()
	t.conns[c.ID] = c
	t.mu.Unlock()
	t.n.Add(1)
}

func (t *table) remove(id uint64) *Conn {
	t.mu.Lock()
	c := t.conns[id]
	delete(t.conns, id)
	t.mu.Unlock()
	if c != nil {
		t.n.Add(-1)
	}
	return c
}

func (t *table) get(id uint64) *Conn {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.conns[id]
}

func (t *table) len() int { return int(t.n.Load()) }

// snapshot returns the connections ordered by id (oldest first).
func (t *table) snapshot() []*Conn {
	t.mu.Lock()
	out := make([]*Conn, 0, len(t.conns))
	for _, c := range t.conns {
		out = append(out, c)
	}
	t.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}
