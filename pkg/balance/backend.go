package balance

import (
	"math"
	"sync/atomic"
)

// State bits of a Backend. A backend is available for new connections when
// no bit is set and its weight is positive.
const (
	stUnhealthy uint32 = 1 << iota // health checks failed
	stDraining                     // operator drain: existing connections stay
	stDown                         // spec says down (nginx "down")
)

// Backend is one upstream server of a Pool and its live state: active
// connections, health, drain and weight. A Backend belongs to the Pool that
// made it; Pool.Update keeps the same *Backend for an address that stays,
// so its active count, health and drain state carry over a reload. All
// methods are safe for concurrent use.
type Backend struct {
	addr string
	pool *Pool

	active   atomic.Int64
	state    atomic.Uint32
	weight   atomic.Int64
	maxConns atomic.Int64
	backup   atomic.Bool

	// specWeight is the weight last given by a BackendSpec; guarded by
	// pool.mu. Update resets the live weight only when this changes, so a
	// reload does not undo a slow start in progress.
	specWeight int
	// member is false once Update has removed the backend; guarded by
	// pool.mu.
	member bool
}

// Address returns the backend's host:port as given in its BackendSpec.
func (b *Backend) Address() string { return b.addr }

// String returns the address.
func (b *Backend) String() string { return b.addr }

// Active returns the number of connections currently counted on b: those
// returned by Pick or added by Acquire, less those given back by Release.
func (b *Backend) Active() int64 { return b.active.Load() }

// Acquire counts one more connection on b. Pick already counts the
// connection it returns; Acquire is for connections that reach b another
// way, such as those adopted from a previous agent process on restart.
// Every Acquire needs one Release.
func (b *Backend) Acquire() {
	b.active.Add(1)
	b.pool.total.Add(1)
}

// Release counts one connection less on b: call it once for every Pick
// that returned b (when the connection ends, or when connecting to b
// failed) and for every Acquire.
func (b *Backend) Release() {
	b.active.Add(-1)
	b.pool.total.Add(-1)
}

// tryAcquire counts one more connection on b if that keeps it at or below
// limit (limit ≤ 0: no limit). The compare-and-swap makes the limit hold
// under concurrent picks.
func (b *Backend) tryAcquire(limit int64) bool {
	if limit <= 0 {
		b.Acquire()
		return true
	}
	for {
		a := b.active.Load()
		if a >= limit {
			return false
		}
		if b.active.CompareAndSwap(a, a+1) {
			b.pool.total.Add(1)
			return true
		}
	}
}

// SetHealthy records the verdict of health checks: an unhealthy backend
// gets no new connections; those it has are left alone (closing them is the
// proxy's call). It does not rebuild the Maglev table — the table keeps the
// backend's slots and picks that land on them move on along the key's
// probe sequence — so a flapping backend moves only its own keys, never a
// key between two other backends.
func (b *Backend) SetHealthy(ok bool) {
	if ok {
		b.setState(stUnhealthy, false)
	} else {
		b.setState(stUnhealthy, true)
	}
}

// SetDraining starts (true) or ends (false) a drain: a draining backend
// gets no new connections and keeps the ones it has. Like SetHealthy it
// does not rebuild the table.
func (b *Backend) SetDraining(on bool) { b.setState(stDraining, on) }

// Healthy reports the last SetHealthy verdict (true for a new backend).
func (b *Backend) Healthy() bool { return b.state.Load()&stUnhealthy == 0 }

// Draining reports whether b is draining.
func (b *Backend) Draining() bool { return b.state.Load()&stDraining != 0 }

// Down reports whether b's spec marks it down.
func (b *Backend) Down() bool { return b.state.Load()&stDown != 0 }

// Available reports whether b may take new connections: healthy, not
// draining, not down, and with a positive weight. It does not look at
// MaxConns.
func (b *Backend) Available() bool { return b.available() }

func (b *Backend) available() bool {
	return b.state.Load() == 0 && b.weight.Load() > 0
}

// Backup reports whether b takes traffic only when no primary can.
func (b *Backend) Backup() bool { return b.backup.Load() }

// MaxConns returns the cap on b's active connections (0: none).
func (b *Backend) MaxConns() int { return int(b.maxConns.Load()) }

// Weight returns b's current (effective) weight.
func (b *Backend) Weight() int { return int(b.weight.Load()) }

// SetWeight changes b's effective weight at once, and rebuilds the pool's
// tables (for Maglev a weight change moves keys, like any change of
// shares). It is the hook for slow start: a health package ramps a
// recovered backend from a small weight to its spec weight. A weight ≤ 0
// takes b out of new selections, like a drain. Pool.Update resets the
// weight to the spec's only when the spec's weight changed.
func (b *Backend) SetWeight(w int) {
	w = max(w, 0)
	w = min(w, math.MaxInt32)
	p := b.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	if b.weight.Load() == int64(w) {
		return
	}
	b.weight.Store(int64(w))
	if b.member {
		p.rebuildLocked()
	}
}

// setState sets or clears state bits and, when availability changed,
// refreshes the pool's per-tier availability totals.
func (b *Backend) setState(bit uint32, on bool) {
	p := b.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	old := b.state.Load()
	nu := old &^ bit
	if on {
		nu |= bit
	}
	if nu == old {
		return
	}
	b.state.Store(nu)
	if b.member {
		p.stateSnap().recount()
	}
}
