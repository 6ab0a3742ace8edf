package proxy

import (
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// limiter enforces the global and per-client-address limits (nginx
// limit_conn and limit_req). Client addresses are grouped: IPv4 by /32,
// IPv6 by a configurable prefix (default /64) because one IPv6 host
// usually owns a whole /64.
type limiter struct {
	maxConns   int
	perIP      int
	perIPRate  rate.Limit
	perIPBurst int
	v6prefix   int

	mu      sync.Mutex
	total   int
	perAddr map[netip.Addr]*ipState
}

type ipState struct {
	conns   int
	bucket  *rate.Limiter
	lastUse time.Time
}

func newLimiter(maxConns, perIP int, perIPRate float64, burst, v6prefix int) *limiter {
	return &limiter{
		maxConns: maxConns, perIP: perIP, perIPRate: rate.Limit(perIPRate),
		perIPBurst: burst, v6prefix: v6prefix, perAddr: make(map[netip.Addr]*ipState),
	}
}

// set changes the limits in place (reload); connections already admitted
// keep their slots.
func (l *limiter) set(maxConns, perIP int, perIPRate float64, burst, v6prefix int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	changedRate := rate.Limit(perIPRate) != l.perIPRate || burst != l.perIPBurst
	l.maxConns, l.perIP, l.perIPRate, l.perIPBurst, l.v6prefix = maxConns, perIP, rate.Limit(perIPRate), burst, v6prefix
	for _, st := range l.perAddr {
		if changedRate {
			st.bucket = nil
			if l.perIPRate > 0 {
				st.bucket = rate.NewLimiter(l.perIPRate, l.perIPBurst)
			}
		}
	}
}

// key groups a client address for per-IP limits.
func (l *limiter) key(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		if p, err := a.Prefix(l.v6prefix); err == nil {
			return p.Addr()
		}
	}
	return a
}

// admit reserves a slot for a new connection from a, or returns the refusal
// reason. Every admitted connection must be released exactly once.
func (l *limiter) admit(a netip.Addr, now time.Time) (netip.Addr, string) {
	k := l.key(a)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.total >= l.maxConns {
		return k, RefuseMaxConns
	}
	st := l.perAddr[k]
	if st == nil {
		if l.perIP == 0 && l.perIPRate == 0 {
			l.total++
			return k, ""
		}
		st = &ipState{}
		if l.perIPRate > 0 {
			st.bucket = rate.NewLimiter(l.perIPRate, l.perIPBurst)
		}
		l.perAddr[k] = st
	}
	st.lastUse = now
	if l.perIP > 0 && st.conns >= l.perIP {
		return k, RefusePerIPConns
	}
	if st.bucket != nil && !st.bucket.AllowN(now, 1) {
		return k, RefusePerIPRate
	}
	st.conns++
	l.total++
	return k, ""
}

// release frees the slot of a connection admitted under k.
func (l *limiter) release(k netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if st := l.perAddr[k]; st != nil {
		st.conns--
	}
}

// sweep forgets idle addresses whose bucket has refilled, so the map does
// not grow with every client ever seen.
func (l *limiter) sweep(now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, st := range l.perAddr {
		if st.conns == 0 && now.Sub(st.lastUse) > time.Minute {
			delete(l.perAddr, k)
		}
	}
}
