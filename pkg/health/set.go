package health

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"

	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/config"
)

// Set is the agent's view of health checking: one Checker per pool, the
// proxy's hooks (Specs for building pools, ReportResult for passive
// checks), and reloads that hand each pool's state from the old Checker to
// the new one.
//
// At start and on every reload the agent does, in order:
//
//	specs := set.Specs(ctx, poolConfig)           // via the proxy's compile hook
//	set.Apply(ctx, proxy.Pools(), cfg.Pools)      // after the proxy swapped its pools
type Set struct {
	opt Options

	mu       sync.Mutex
	stopped  bool
	resolved map[string]map[string][]endpoint // pool → name → answer from Specs

	// checkers is replaced whole under mu and read without it on the
	// connection path (ReportResult).
	checkers atomic.Pointer[map[string]*Checker]
}

// NewSet returns an empty Set whose Checkers get opt (Previous is set by
// the Set).
func NewSet(opt Options) *Set {
	s := &Set{opt: opt, resolved: map[string]map[string][]endpoint{}}
	m := map[string]*Checker{}
	s.checkers.Store(&m)
	return s
}

// Specs resolves a pool's configured backends to the specs the proxy
// should give Pool.Update (or NewPool): DNS names expanded to their
// addresses, weights scaled by SlowStartScale when the pool has slow
// start. A name that does not resolve keeps the answer the pool's running
// Checker last had; a host:port never resolved stays as it is. The
// answers are handed to the Checker that Apply starts, so the proxy and
// the Checker agree on the set. It blocks for at most the resolve timeout.
func (s *Set) Specs(ctx context.Context, pc config.Pool) ([]balance.BackendSpec, error) {
	var targets []target
	for _, b := range pc.Backends {
		t, err := parseTarget(b)
		if err != nil {
			return nil, fmt.Errorf("health: pool %s: %w", pc.Name, err)
		}
		targets = append(targets, t)
	}
	var last map[string][]endpoint
	if c := s.Checker(pc.Name); c != nil {
		c.mu.Lock()
		last = maps.Clone(c.lastGood)
		c.mu.Unlock()
	}
	r := s.opt.Resolver
	if r == nil {
		r = NewResolver("")
	}
	to := s.opt.ResolveTimeout
	if to <= 0 {
		to = DefaultResolveTimeout
	}
	eps, errs := resolveTargets(ctx, r, to, targets)
	fresh := map[string][]endpoint{}
	for i, t := range targets {
		switch {
		case t.kind == targetStatic:
		case errs[i] == nil:
			fresh[t.cfg.Address] = eps[i]
		case last[t.cfg.Address] != nil:
			eps[i] = last[t.cfg.Address]
		case t.kind == targetHost:
			eps[i] = []endpoint{{addr: t.cfg.Address}}
		}
	}
	s.mu.Lock()
	s.resolved[pc.Name] = fresh
	s.mu.Unlock()
	scale := 1
	if pc.Health.SlowStart > 0 {
		scale = SlowStartScale
	}
	specs, _ := buildSpecs(targets, eps, scale)
	return specs, nil
}

// Apply makes the Set run one Checker per pool in cfgs, over the pool of
// the same name in pools, each taking over from the Checker that ran that
// pool before, and stops the Checkers of pools that are gone. Every new
// Checker is built before any starts, so an error (a config the checks
// cannot use, a pool missing from pools) changes nothing.
func (s *Set) Apply(ctx context.Context, pools map[string]*balance.Pool, cfgs []config.Pool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return errors.New("health: set stopped")
	}
	old := *s.checkers.Load()
	next := make(map[string]*Checker, len(cfgs))
	var errs []error
	for _, pc := range cfgs {
		p := pools[pc.Name]
		if p == nil {
			errs = append(errs, fmt.Errorf("health: pool %s: not among the proxy's pools", pc.Name))
			continue
		}
		opt := s.opt
		opt.Previous = old[pc.Name]
		c, err := NewChecker(p, pc, opt)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for name, eps := range s.resolved[pc.Name] {
			c.lastGood[name] = eps
		}
		next[pc.Name] = c
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	clear(s.resolved)
	for _, c := range next {
		c.Start(ctx) // stops its Previous first
	}
	s.checkers.Store(&next)
	for name, c := range old {
		if next[name] == nil {
			c.Stop()
		}
	}
	return nil
}

// Checker returns the running Checker of a pool, or nil.
func (s *Set) Checker(pool string) *Checker { return (*s.checkers.Load())[pool] }

// ReportResult is the proxy's OnConnectResult hook: err nil when a
// backend was connected and answered the handshake, non-nil when the
// connect or the handshake failed. Unknown pools are ignored. It does not
// block on I/O.
func (s *Set) ReportResult(pool string, b *balance.Backend, err error) {
	if c := s.Checker(pool); c != nil {
		c.ReportResult(b, err)
	}
}

// SetWeight is Checker.SetWeight on the named pool: the admin API's
// weight command.
func (s *Set) SetWeight(pool, addr string, w int) error {
	c := s.Checker(pool)
	if c == nil {
		return fmt.Errorf("health: no pool %s", pool)
	}
	return c.SetWeight(addr, w)
}

// Status returns every pool's backends (see Checker.Status).
func (s *Set) Status() map[string][]BackendStatus {
	out := map[string][]BackendStatus{}
	for name, c := range *s.checkers.Load() {
		out[name] = c.Status()
	}
	return out
}

// Counters returns every pool's counters.
func (s *Set) Counters() map[string]Counters {
	out := map[string]Counters{}
	for name, c := range *s.checkers.Load() {
		out[name] = c.Counters()
	}
	return out
}

// Stop stops every Checker (see Checker.Stop).
func (s *Set) Stop() {
	s.mu.Lock()
	s.stopped = true
	cs := *s.checkers.Load()
	empty := map[string]*Checker{}
	s.checkers.Store(&empty)
	s.mu.Unlock()
	for _, c := range cs {
		c.Stop()
	}
}
