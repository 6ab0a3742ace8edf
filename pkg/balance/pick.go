package balance

import (
	"math"
	"math/rand/v2"
)

// pickMaglev looks h up in t's Maglev table. With a balance factor it first
// looks for a backend under the bounded-load cap; only if none is (which
// cannot happen unless backends are skipped or at MaxConns, since the caps
// sum to more than the connections) does it fall back to plain Maglev.
func (p *Pool) pickMaglev(t *tier, h uint64, skip func(*Backend) bool) *Backend {
	if len(t.table) == 0 {
		return nil
	}
	if p.opt.BalanceFactor > 0 {
		// m counts the connection being placed. Concurrent picks can make
		// the m read here stale; a pass that finds no room is retried while
		// m keeps moving, so the fallback below is taken only on a settled
		// view.
		for range 3 {
			m := p.total.Load() + 1
			w := t.availW.Load()
			if w <= 0 {
				break
			}
			if b := p.walk(t, h, skip, m, w); b != nil {
				return b
			}
			if p.total.Load()+1 == m {
				break
			}
		}
	}
	return p.walk(t, h, skip, 0, 0)
}

// walk follows h's probe sequence through t and takes the first backend
// that is usable, under MaxConns and, when m > 0, under the bounded-load cap
// for m connections over available weight wsum.
func (p *Pool) walk(t *tier, h uint64, skip func(*Backend) bool, m, wsum int64) *Backend {
	size := len(t.table)
	for j := range maglevProbes {
		b := t.members[t.table[reduce(probe(h, j), size)]]
		if p.take(b, skip, m, wsum) {
			return b
		}
	}
	n := len(t.members)
	start := reduce(h, n)
	for i := range n {
		k := start + i
		if k >= n {
			k -= n
		}
		if b := t.members[k]; p.take(b, skip, m, wsum) {
			return b
		}
	}
	return nil
}

// take counts a connection on b if b is usable and stays within MaxConns
// and, when m > 0, the bounded-load cap.
func (p *Pool) take(b *Backend, skip func(*Backend) bool, m, wsum int64) bool {
	if !usable(b, skip) {
		return false
	}
	limit := b.maxConns.Load()
	if m > 0 {
		c := boundCap(p.opt.BalanceFactor, m, b.weight.Load(), wsum)
		if limit <= 0 || c < limit {
			limit = c
		}
	}
	return b.tryAcquire(limit)
}

// boundCap is the most connections a backend of weight w may hold when the
// pool holds m (counting the one being placed) and the available backends
// weigh wsum in all: ⌈(1+ε)·m·w/wsum⌉, at least 1. The average counts every
// connection of the pool, including those on draining or unhealthy
// backends: that is the load the available backends would carry if those
// connections moved to them, which is where they go as they reconnect.
func boundCap(eps float64, m, w, wsum int64) int64 {
	// The small subtraction keeps float rounding (e.g. 12.000000000001)
	// from adding a whole connection.
	c := math.Ceil((1+eps)*float64(m)*float64(w)/float64(wsum) - 1e-9)
	if c < 1 {
		return 1
	}
	if c > math.MaxInt64/2 {
		return math.MaxInt64 / 2
	}
	return int64(c)
}

// pickRoundRobin takes the next usable entry of the weighted cycle. An
// entry whose backend cannot take the connection is consumed, so the
// remaining backends keep their relative shares (with A, B, C and B down,
// picks alternate A, C rather than giving C two turns in a row).
func pickRoundRobin(t *tier, skip func(*Backend) bool) *Backend {
	l := uint64(len(t.sched))
	if l == 0 {
		return nil
	}
	for range min(l, rrTries) {
		c := t.next.Add(1) - 1
		b := t.members[t.sched[c%l]]
		if usable(b, skip) && b.tryAcquire(b.maxConns.Load()) {
			return b
		}
	}
	return scan(t, int(t.next.Load()%uint64(len(t.members))), skip)
}

// scan takes the first usable backend under MaxConns, in member order from
// start.
func scan(t *tier, start int, skip func(*Backend) bool) *Backend {
	n := len(t.members)
	for i := range n {
		k := start + i
		if k >= n {
			k -= n
		}
		b := t.members[k]
		if usable(b, skip) && b.tryAcquire(b.maxConns.Load()) {
			return b
		}
	}
	return nil
}

// pickLeastConn takes the usable backend with the fewest active connections
// per weight. The scan starts at a rotating member, so ties (an idle pool)
// go round robin. If another pick fills the chosen backend to its MaxConns
// first, it looks again.
func pickLeastConn(t *tier, skip func(*Backend) bool) *Backend {
	n := len(t.members)
	for range 4 {
		start := int(t.next.Add(1) % uint64(n))
		var best *Backend
		var ba, bw int64
		for i := range n {
			k := start + i
			if k >= n {
				k -= n
			}
			b := t.members[k]
			if !usable(b, skip) {
				continue
			}
			a := b.active.Load()
			if mc := b.maxConns.Load(); mc > 0 && a >= mc {
				continue
			}
			w := b.weight.Load()
			if best == nil || a*bw < ba*w {
				best, ba, bw = b, a, w
			}
		}
		if best == nil {
			return nil
		}
		if best.tryAcquire(best.maxConns.Load()) {
			return best
		}
	}
	return nil
}

// pickRandomTwo draws two backends at random in proportion to weight (a
// uniform entry of the weighted cycle) and takes the one with fewer active
// connections per weight; nginx's "random two least_conn". When draws keep
// landing on backends that cannot take the connection it falls back to
// least connections.
func pickRandomTwo(t *tier, skip func(*Backend) bool) *Backend {
	l := uint64(len(t.sched))
	if l == 0 {
		return nil
	}
	for range rrTries {
		x := t.members[t.sched[rand.Uint64N(l)]]
		y := t.members[t.sched[rand.Uint64N(l)]]
		for k := 0; x == y && k < 3; k++ {
			y = t.members[t.sched[rand.Uint64N(l)]]
		}
		okx, oky := room(x, skip), room(y, skip)
		var b *Backend
		switch {
		case okx && oky:
			// x·wy ≤ y·wx ⇔ x/wx ≤ y/wy.
			if x.active.Load()*y.weight.Load() <= y.active.Load()*x.weight.Load() {
				b = x
			} else {
				b = y
			}
		case okx:
			b = x
		case oky:
			b = y
		default:
			continue
		}
		if b.tryAcquire(b.maxConns.Load()) {
			return b
		}
	}
	return pickLeastConn(t, skip)
}

// room reports whether b is usable and below its MaxConns.
func room(b *Backend, skip func(*Backend) bool) bool {
	if !usable(b, skip) {
		return false
	}
	mc := b.maxConns.Load()
	return mc <= 0 || b.active.Load() < mc
}

// pickFirst takes the first usable backend in spec order that is below its
// MaxConns (HAProxy balance first). A backend without MaxConns takes every
// connection while it is available.
func pickFirst(t *tier, skip func(*Backend) bool) *Backend {
	for _, b := range t.members {
		if usable(b, skip) && b.tryAcquire(b.maxConns.Load()) {
			return b
		}
	}
	return nil
}
