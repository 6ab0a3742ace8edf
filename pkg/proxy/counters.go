package proxy

import (
	"sync"
	"sync/atomic"
)

// Refusal reasons: stable values used as metric labels and log fields.
const (
	RefuseMalformed     = "malformed"      // 400
	RefuseHeadTooLarge  = "head_too_large" // 431
	RefuseHeadTimeout   = "head_timeout"   // 408
	RefuseNoRoute       = "no_route"       // 404
	RefuseNotUpgrade    = "not_upgrade"    // 426 on an upgrade-only route
	RefuseOrigin        = "origin"         // 403
	RefuseNoBackend     = "no_backend"     // 503: no healthy backend
	RefuseBackendFailed = "backend_failed" // 502: every try failed
	RefuseMaxConns      = "max_conns"      // 503: global limit
	RefusePerIPConns    = "per_ip_conns"   // 429: limit_conn
	RefusePerIPRate     = "per_ip_rate"    // 429: limit_req
	RefuseBackendHead   = "backend_head"   // 502: backend's response head unreadable
)

// Counters are the proxy's own monotonic counters, read at scrape time.
type Counters struct {
	Accepted        atomic.Uint64
	Established     atomic.Uint64
	ConnectFails    atomic.Uint64 // backend connect failures (each try)
	PlaneFallbacks  atomic.Uint64 // sockmap refused a connection, splice took it
	UpgradeDeclined atomic.Uint64 // backend answered an upgrade with something other than 101

	mu       sync.Mutex
	refusals map[string]*atomic.Uint64 // by "reason/status"
}

// Refused counts one refusal.
func (c *Counters) Refused(reason string) {
	c.mu.Lock()
	if c.refusals == nil {
		c.refusals = make(map[string]*atomic.Uint64)
	}
	v := c.refusals[reason]
	if v == nil {
		v = new(atomic.Uint64)
		c.refusals[reason] = v
	}
	c.mu.Unlock()
	v.Add(1)
}

// Refusals returns a copy of the refusal counts by reason.
func (c *Counters) Refusals() map[string]uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]uint64, len(c.refusals))
	for k, v := range c.refusals {
		out[k] = v.Load()
	}
	return out
}
