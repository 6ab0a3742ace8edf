// Package health decides which backends of a pool may take new
// connections, and feeds that to package balance: active checks (TCP
// connect, HTTP GET, a real WebSocket upgrade) with rise and fall counts
// and jitter, passive checks from the proxy's connect and handshake
// results (max_fails within fail_timeout), slow start after a recovery,
// and discovery of a pool's addresses from static entries and DNS (A/AAAA
// and SRV, re-resolved on an interval).
//
// A Checker owns one balance.Pool's backend set: it resolves the
// configured addresses, calls Pool.Update, and then only calls
// Backend.SetHealthy and Backend.SetWeight. It never touches a connection:
// what happens to the connections of a backend that went down is the
// proxy's decision. Every state change is logged once, counted, and kept
// in a bounded per-backend history for `wsplice backends`.
//
// On a reload, a new Checker made with Options.Previous takes over the old
// one's verdicts, counters, history, passive hold-downs and slow starts, so
// a reload does not flap a backend. See README.md for the settings and the
// nginx and HAProxy directives they replace.
package health

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/config"
)

// Defaults for Options fields left zero.
const (
	// DefaultDNSInterval is how often DNS names are re-resolved: the TTL
	// CoreDNS gives Kubernetes Service records.
	DefaultDNSInterval = 5 * time.Second
	// DefaultResolveTimeout bounds one round of lookups of one name.
	DefaultResolveTimeout = 2 * time.Second
	// DefaultJitter is the spread of each check interval: ±10%.
	DefaultJitter = 0.1
	// DefaultHistory is how many state changes are kept per backend.
	DefaultHistory = 16
	// recentEvents is how many events the pool-wide log keeps (removed
	// backends take their own history with them; this keeps their last
	// word).
	recentEvents = 128
)

// SlowStartScale multiplies every weight of a pool that has slow start,
// because a weight is an integer and 10% of weight 1 is not one. Shares
// are unchanged (every weight is scaled alike); Backend.Weight shows the
// scaled value.
const SlowStartScale = 10

// slowStartFloor is the share a backend starts its ramp at.
const slowStartFloor = 0.1

// Options configure a Checker beyond its pool's config.
type Options struct {
	// Logger receives one line per state change, per DNS failure and per
	// recovery. Nil discards.
	Logger *slog.Logger
	// Resolver resolves DNS names; nil uses net.DefaultResolver. See
	// NewResolver to ask a given server.
	Resolver Resolver
	// DNSInterval is how often names are re-resolved (0:
	// DefaultDNSInterval).
	DNSInterval time.Duration
	// ResolveTimeout bounds the lookups of one name in one round (0:
	// DefaultResolveTimeout). Rounds never overlap: a slow one delays the
	// next.
	ResolveTimeout time.Duration
	// Jitter spreads each check interval uniformly over ±Jitter × interval
	// (0: DefaultJitter; negative: none; at most 0.5), so checks of many
	// backends, and of many agents, do not synchronise. The first check of
	// a backend is at a uniform random point in its first interval.
	Jitter float64
	// History is how many state changes are kept per backend (0:
	// DefaultHistory).
	History int
	// Previous is the Checker this one replaces on a reload. Start stops
	// it and carries over its verdicts, counters, history, passive
	// hold-downs, slow starts in progress and last good DNS answers.
	Previous *Checker
	// OnEvent, when set, is called after each event is recorded, outside
	// the Checker's lock (it may call the Checker), possibly from several
	// goroutines at once.
	OnEvent func(Event)
}

// State is a backend's state as health checks see it.
type State string

// The states.
const (
	StateUp      State = "up"
	StateDown    State = "down"
	StateUnknown State = "unknown" // not checked yet; takes connections
	StateOff     State = "off"     // no active check configured
)

// Change is what an Event records.
type Change string

// The changes.
const (
	ChangeUp      Change = "up"      // may take new connections again
	ChangeDown    Change = "down"    // takes no new connections
	ChangeAdded   Change = "added"   // joined the pool (DNS or reload)
	ChangeRemoved Change = "removed" // left the pool
)

// Event is one recorded change of one backend.
type Event struct {
	Time    time.Time `json:"time"`
	Pool    string    `json:"pool"`
	Address string    `json:"address"`
	Change  Change    `json:"change"`
	Reason  string    `json:"reason"`
}

// Counters are a Checker's cumulative counts. A Checker that takes over
// from Options.Previous continues its counts, so they never go backwards
// across a reload.
type Counters struct {
	Checks           uint64 `json:"checks"`             // active checks run
	CheckFailures    uint64 `json:"check_failures"`     // of which failed
	StateChanges     uint64 `json:"state_changes"`      // up↔down transitions
	PassiveFailures  uint64 `json:"passive_failures"`   // failures reported by the proxy
	PassiveMarkDowns uint64 `json:"passive_mark_downs"` // times max_fails was reached
	Resolutions      uint64 `json:"resolutions"`        // DNS lookups of a configured name
	ResolveErrors    uint64 `json:"resolve_errors"`     // of which failed (last good set kept)
	Added            uint64 `json:"added"`              // backends that joined after start
	Removed          uint64 `json:"removed"`            // backends that left
	UpdateErrors     uint64 `json:"update_errors"`      // Pool.Update refused a resolved set
}

type counters struct {
	checks, checkFailures, stateChanges, passiveFailures, passiveMarkDowns,
	resolutions, resolveErrors, added, removed, updateErrors atomic.Uint64
}

// BackendStatus is one backend as `wsplice backends` shows it.
type BackendStatus struct {
	Address string `json:"address"`
	// Source is the configured address it came from (a DNS name, or the
	// address itself).
	Source string `json:"source"`
	// State says whether health checks let it take new connections.
	State State `json:"state"`
	// Active is the active checks' verdict (StateOff without them).
	Active State `json:"active"`
	// PassiveFails counts failures in the current fail_timeout window;
	// PassiveDownUntil is set while max_fails holds it down.
	PassiveFails     int       `json:"passive_fails,omitempty"`
	PassiveDownUntil time.Time `json:"passive_down_until,omitzero"`
	// Weight is the live weight, FullWeight the configured one (both ×
	// SlowStartScale when the pool has slow start). SlowStartUntil is set
	// while the weight ramps.
	Weight         int       `json:"weight"`
	FullWeight     int       `json:"full_weight"`
	SlowStartUntil time.Time `json:"slow_start_until,omitzero"`
	// LastCheck, LastDuration and LastError describe the last active check.
	LastCheck    time.Time     `json:"last_check,omitzero"`
	LastDuration time.Duration `json:"last_duration,omitempty"`
	LastError    string        `json:"last_error,omitempty"`
	// History is the last state changes, oldest first.
	History []Event `json:"history"`
}

// Checker runs the health checks and discovery of one pool. Its methods
// are safe for concurrent use.
type Checker struct {
	pool     *balance.Pool
	name     string
	cfg      config.Health
	opt      Options
	log      *slog.Logger
	prober   *prober // nil: no active check
	targets  []target
	hasDNS   bool
	scale    int
	interval time.Duration
	failTO   time.Duration

	ctr atomic.Pointer[counters]
	// failing counts members with passive failures in their window, so
	// ReportSuccess is lock-free in the common case.
	failing atomic.Int64

	kick chan struct{} // a slow start began

	// onCheck, when set (tests only, before Start), sees every active
	// check's start and result.
	onCheck func(addr string, start time.Time, err error)

	mu          sync.Mutex
	phase       int // 0 new, 1 started, 2 stopped
	ctx         context.Context
	cancel      context.CancelFunc
	members     map[string]*member
	recent      []Event
	lastGood    map[string][]endpoint // by configured address
	dnsErr      map[string]string     // configured address → failing error
	source      map[string]string     // backend address → configured address
	full        map[string]int        // backend address → spec weight installed
	override    map[string]int        // backend address → operator's weight (scaled)
	installed   []balance.BackendSpec
	initialized bool    // the first reconcile of this lineage is done
	out         []Event // recorded under mu, emitted after unlock

	wg sync.WaitGroup
}

// member is the state of one backend; every field is guarded by
// Checker.mu.
type member struct {
	addr   string
	b      *balance.Backend
	cancel context.CancelFunc // the check loop; nil when none runs

	active         State // StateUnknown, StateUp, StateDown (StateUp without checks)
	okRun, failRun int
	healthy        bool // the verdict last given to b
	pFails         int
	pStart, pUntil time.Time
	pTimer         *time.Timer
	rampStart      time.Time
	lastCheck      time.Time
	lastDur        time.Duration
	lastErr        string
	history        []Event
}

// NewChecker prepares a Checker for pool with the pool's config. Nothing
// runs until Start. It fails when the config cannot be checked: an unknown
// check type, a bad expect class, or a backend address that is not
// IP:port, host:port or an SRV name.
func NewChecker(pool *balance.Pool, cfg config.Pool, opt Options) (*Checker, error) {
	h := cfg.Health
	c := &Checker{
		pool: pool, name: cfg.Name, cfg: h, opt: opt,
		kick:     make(chan struct{}, 1),
		members:  map[string]*member{},
		lastGood: map[string][]endpoint{},
		dnsErr:   map[string]string{},
		source:   map[string]string{},
		full:     map[string]int{},
		override: map[string]int{},
		scale:    1,
	}
	if pool == nil {
		return nil, fmt.Errorf("health: pool %s: nil pool", cfg.Name)
	}
	c.log = opt.Logger
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	c.log = c.log.With("pool", cfg.Name)
	if c.opt.DNSInterval <= 0 {
		c.opt.DNSInterval = DefaultDNSInterval
	}
	if c.opt.ResolveTimeout <= 0 {
		c.opt.ResolveTimeout = DefaultResolveTimeout
	}
	switch {
	case c.opt.Jitter == 0:
		c.opt.Jitter = DefaultJitter
	case c.opt.Jitter < 0:
		c.opt.Jitter = 0
	}
	c.opt.Jitter = min(c.opt.Jitter, 0.5)
	if c.opt.History <= 0 {
		c.opt.History = DefaultHistory
	}
	if c.opt.Resolver == nil {
		c.opt.Resolver = net.DefaultResolver
	}
	c.ctr.Store(new(counters))

	c.interval = h.Interval.D()
	if c.interval <= 0 {
		c.interval = 3 * time.Second
	}
	c.failTO = h.FailTimeout.D()
	if c.failTO <= 0 {
		c.failTO = 10 * time.Second
	}
	if h.SlowStart > 0 {
		c.scale = SlowStartScale
	}
	typ := CheckType(h.Type)
	switch typ {
	case "", CheckNone:
	case CheckTCP, CheckHTTP, CheckWebSocket:
		mask, err := parseExpect(h.Expect)
		if err != nil {
			return nil, fmt.Errorf("health: pool %s: %w", cfg.Name, err)
		}
		to := h.Timeout.D()
		if to <= 0 {
			to = time.Second
		}
		path := h.Path
		if path == "" {
			path = "/"
		}
		c.prober = &prober{typ: typ, timeout: to, path: path, host: h.Host, expect: mask}
	default:
		return nil, fmt.Errorf("health: pool %s: check type %q: use none, tcp, http or websocket", cfg.Name, h.Type)
	}
	for _, b := range cfg.Backends {
		t, err := parseTarget(b)
		if err != nil {
			return nil, fmt.Errorf("health: pool %s: %w", cfg.Name, err)
		}
		c.targets = append(c.targets, t)
		c.hasDNS = c.hasDNS || t.kind != targetStatic
	}
	return c, nil
}

// Pool returns the pool the Checker manages.
func (c *Checker) Pool() *balance.Pool { return c.pool }

// Start resolves the pool's addresses once (waiting at most the resolve
// timeout per name), installs them with Pool.Update, and starts the
// active checks, the DNS re-resolution and the slow-start ramps; they run
// until Stop or until ctx ends. With Options.Previous set, it first stops
// that Checker and takes over its state. Start is a no-op after the first
// call.
func (c *Checker) Start(ctx context.Context) {
	c.mu.Lock()
	if c.phase != 0 {
		c.mu.Unlock()
		return
	}
	c.phase = 1
	c.ctx, c.cancel = context.WithCancel(ctx)
	c.mu.Unlock()
	if p := c.opt.Previous; p != nil && p != c {
		p.stop(true)
		c.adopt(p)
	}
	c.refresh(true)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.phase == 1 { // not stopped meanwhile
		c.wg.Add(1)
		go c.loop()
	}
}

// Stop ends every check, timer and ramp and waits for them. A slow start
// in progress is finished at once (the backend gets its full weight), so
// no backend is left at a fraction of its share; verdicts stay as they
// are. Reports that arrive after Stop are ignored.
func (c *Checker) Stop() { c.stop(false) }

func (c *Checker) stop(handover bool) {
	c.mu.Lock()
	if c.phase == 2 {
		c.mu.Unlock()
		return
	}
	c.phase = 2
	if c.cancel != nil {
		c.cancel()
	}
	for _, m := range c.members {
		m.stopTimers()
	}
	c.mu.Unlock()
	c.wg.Wait()
	if handover {
		return
	}
	c.mu.Lock()
	for _, m := range c.members {
		if !m.rampStart.IsZero() {
			m.rampStart = time.Time{}
			m.b.SetWeight(c.fullOf(m))
		}
	}
	c.mu.Unlock()
}

func (m *member) stopTimers() {
	if m.cancel != nil {
		m.cancel()
		m.cancel = nil
	}
	if m.pTimer != nil {
		m.pTimer.Stop()
		m.pTimer = nil
	}
}

// adopt copies a stopped predecessor's state.
func (c *Checker) adopt(p *Checker) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ctr.Store(p.ctr.Load())
	c.recent = slices.Clone(p.recent)
	c.initialized = p.initialized
	for k, v := range p.lastGood {
		if _, fresher := c.lastGood[k]; !fresher {
			c.lastGood[k] = v
		}
	}
	for k, v := range p.dnsErr {
		c.dnsErr[k] = v
	}
	for k, v := range p.override {
		// Re-scaled in case slow start was turned on or off.
		c.override[k] = v / p.scale * c.scale
	}
	for addr, pm := range p.members {
		m := *pm
		m.cancel, m.pTimer = nil, nil
		m.history = slices.Clone(pm.history)
		if m.pFails > 0 {
			c.failing.Add(1)
		}
		switch {
		case c.prober == nil:
			m.active = StateUp
		case p.prober == nil:
			// Checks were off: trust the pool until the first check.
			m.active = StateUnknown
		}
		c.members[addr] = &m
	}
}

// Counters returns a snapshot of the counts.
func (c *Checker) Counters() Counters {
	k := c.ctr.Load()
	return Counters{
		Checks: k.checks.Load(), CheckFailures: k.checkFailures.Load(),
		StateChanges: k.stateChanges.Load(), PassiveFailures: k.passiveFailures.Load(),
		PassiveMarkDowns: k.passiveMarkDowns.Load(), Resolutions: k.resolutions.Load(),
		ResolveErrors: k.resolveErrors.Load(), Added: k.added.Load(), Removed: k.removed.Load(),
		UpdateErrors: k.updateErrors.Load(),
	}
}

// History returns the last state changes of the backend at addr, oldest
// first (nil for an address the pool does not have).
func (c *Checker) History(addr string) []Event {
	c.mu.Lock()
	defer c.mu.Unlock()
	if m := c.members[addr]; m != nil {
		return slices.Clone(m.history)
	}
	return nil
}

// Recent returns the pool's last events, oldest first, including those of
// backends that have since been removed.
func (c *Checker) Recent() []Event {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.recent)
}

// Status returns every backend's state in pool order.
func (c *Checker) Status() []BackendStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []BackendStatus
	for _, b := range c.pool.Backends() {
		s := BackendStatus{Address: b.Address(), Source: c.source[b.Address()], Weight: b.Weight(), State: StateUp, Active: StateOff}
		if s.Source == "" {
			s.Source = s.Address
		}
		if !b.Healthy() {
			s.State = StateDown
		}
		m := c.members[b.Address()]
		if m == nil {
			s.FullWeight = b.Weight()
			out = append(out, s)
			continue
		}
		if c.prober != nil {
			s.Active = m.active
		}
		s.PassiveFails = m.pFails
		if time.Now().Before(m.pUntil) {
			s.PassiveDownUntil = m.pUntil
		}
		s.FullWeight = c.fullOf(m)
		if !m.rampStart.IsZero() {
			s.SlowStartUntil = m.rampStart.Add(c.cfg.SlowStart.D())
		}
		s.LastCheck, s.LastDuration, s.LastError = m.lastCheck, m.lastDur, m.lastErr
		s.History = slices.Clone(m.history)
		out = append(out, s)
	}
	return out
}

// Specs returns the backend specs the Checker installed last (resolved
// addresses, weights scaled for slow start). The proxy can pass them to
// Pool.Update on a reload instead of the config's literal addresses.
func (c *Checker) Specs() []balance.BackendSpec {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.installed)
}

// SetWeight sets the weight of the backend at addr as an operator would,
// on the config's scale (1 to 1000; 0 takes it out of new selections).
// On a pool with slow start it is multiplied by SlowStartScale like the
// configured weights, so shares mean the same; during a slow start it is
// the weight the ramp climbs to. It lasts until the address leaves the
// pool, across DNS refreshes and reloads (a new Checker with Previous
// keeps it). The admin API's weight command should come here rather than
// to Backend.SetWeight, which a ramp would overwrite.
func (c *Checker) SetWeight(addr string, w int) error {
	if w < 0 || w > 1000 {
		return fmt.Errorf("health: weight %d: use 0 to 1000", w)
	}
	c.mu.Lock()
	defer c.unlock()
	m := c.members[addr]
	if m == nil {
		return fmt.Errorf("health: pool %s has no backend %s", c.name, addr)
	}
	c.override[addr] = w * c.scale
	if m.rampStart.IsZero() {
		m.b.SetWeight(w * c.scale)
	} else {
		m.b.SetWeight(rampWeight(w*c.scale, time.Since(m.rampStart), c.cfg.SlowStart.D()))
	}
	return nil
}

// ReportConnectFailure is the passive check: the proxy calls it when a
// connect to b, or the handshake with it, failed. MaxFails such failures
// within FailTimeout of the first (with no ReportSuccess between them)
// take b out of service for FailTimeout. It is cheap and never blocks on
// I/O.
func (c *Checker) ReportConnectFailure(b *balance.Backend, err error) {
	k := c.ctr.Load()
	k.passiveFailures.Add(1)
	if c.cfg.MaxFails <= 0 || b == nil {
		return
	}
	c.mu.Lock()
	defer c.unlock()
	m := c.members[b.Address()]
	if c.phase != 1 || m == nil {
		return
	}
	now := time.Now()
	if now.Before(m.pUntil) {
		return // already held down
	}
	if m.pFails == 0 || now.Sub(m.pStart) > c.failTO {
		if m.pFails == 0 {
			c.failing.Add(1)
		}
		m.pStart, m.pFails = now, 0
	}
	m.pFails++
	if m.pFails < c.cfg.MaxFails {
		return
	}
	m.pFails = 0
	c.failing.Add(-1)
	m.pUntil = now.Add(c.failTO)
	k.passiveMarkDowns.Add(1)
	if m.pTimer != nil {
		m.pTimer.Stop()
	}
	m.pTimer = time.AfterFunc(c.failTO, func() { c.passiveExpired(m) })
	c.applyLocked(m, now, fmt.Sprintf("passive: %d failures within %s, last: %v", c.cfg.MaxFails, c.failTO, err))
}

// ReportSuccess tells the Checker a connection to b was established and
// its handshake answered: it clears b's passive failure count. It takes no
// lock unless some backend has failures counted.
func (c *Checker) ReportSuccess(b *balance.Backend) {
	if c.cfg.MaxFails <= 0 || b == nil || c.failing.Load() == 0 {
		return
	}
	c.mu.Lock()
	defer c.unlock()
	if m := c.members[b.Address()]; m != nil && m.pFails > 0 {
		m.pFails = 0
		c.failing.Add(-1)
	}
}

// ReportResult is ReportSuccess when err is nil and ReportConnectFailure
// otherwise: the shape of the proxy's hook.
func (c *Checker) ReportResult(b *balance.Backend, err error) {
	if err == nil {
		c.ReportSuccess(b)
	} else {
		c.ReportConnectFailure(b, err)
	}
}

func (c *Checker) passiveExpired(m *member) {
	c.mu.Lock()
	defer c.unlock()
	if c.phase != 1 || c.members[m.addr] != m {
		return
	}
	m.pTimer = nil
	c.applyLocked(m, time.Now(), fmt.Sprintf("passive: fail_timeout %s elapsed", c.failTO))
}

// unlock releases mu and then logs and hands out the events recorded
// while it was held, so OnEvent may call back into the Checker.
func (c *Checker) unlock() {
	evs := c.out
	c.out = nil
	c.mu.Unlock()
	for _, e := range evs {
		c.emit(e)
	}
}

func (c *Checker) emit(e Event) {
	switch e.Change {
	case ChangeDown:
		c.log.Warn("backend down", "backend", e.Address, "reason", e.Reason)
	case ChangeUp:
		c.log.Info("backend up", "backend", e.Address, "reason", e.Reason)
	case ChangeAdded:
		c.log.Info("backend added", "backend", e.Address, "reason", e.Reason)
	case ChangeRemoved:
		c.log.Info("backend removed", "backend", e.Address, "reason", e.Reason)
	}
	if c.opt.OnEvent != nil {
		c.opt.OnEvent(e)
	}
}

// record keeps an event in the member's history (m may be nil) and the
// pool's recent log, and queues it for emit.
func (c *Checker) recordLocked(m *member, e Event) {
	e.Pool = c.name
	if m != nil {
		m.history = append(m.history, e)
		if n := len(m.history) - c.opt.History; n > 0 {
			m.history = slices.Delete(m.history, 0, n)
		}
	}
	c.recent = append(c.recent, e)
	if n := len(c.recent) - recentEvents; n > 0 {
		c.recent = slices.Delete(c.recent, 0, n)
	}
	c.out = append(c.out, e)
}

// applyLocked gives m's backend the verdict its active and passive state
// call for, and records the change if there is one. A backend that comes
// back starts its slow start before it is marked healthy, so no pick sees
// it at full weight.
func (c *Checker) applyLocked(m *member, now time.Time, reason string) {
	want := m.active != StateDown && !now.Before(m.pUntil)
	if want == m.healthy {
		if m.b.Healthy() != want {
			m.b.SetHealthy(want) // someone else's write; ours stands
		}
		return
	}
	m.healthy = want
	change := ChangeDown
	if want {
		change = ChangeUp
		c.startRampLocked(m, now)
		m.b.SetHealthy(true)
	} else {
		m.b.SetHealthy(false)
		// A ramp in progress ends; the next recovery starts a new one.
		m.rampStart = time.Time{}
	}
	c.ctr.Load().stateChanges.Add(1)
	c.recordLocked(m, Event{Time: now, Address: m.addr, Change: change, Reason: reason})
}

// observe applies the result of one active check.
func (c *Checker) observe(m *member, err error, start time.Time, dur time.Duration) {
	k := c.ctr.Load()
	k.checks.Add(1)
	if err != nil {
		k.checkFailures.Add(1)
	}
	c.mu.Lock()
	defer c.unlock()
	if c.phase != 1 || c.members[m.addr] != m {
		return
	}
	m.lastCheck, m.lastDur, m.lastErr = start, dur, ""
	reason := ""
	if err == nil {
		m.failRun = 0
		m.okRun++
		switch {
		case m.active == StateUnknown:
			m.active = StateUp
			reason = "active: first check passed"
		case m.active == StateDown && m.okRun >= max(c.cfg.Rise, 1):
			m.active = StateUp
			reason = fmt.Sprintf("active: %d checks passed", max(c.cfg.Rise, 1))
		}
	} else {
		m.lastErr = err.Error()
		m.okRun = 0
		m.failRun++
		switch {
		case m.active == StateUnknown:
			// A backend never seen healthy goes down on its first failure
			// rather than taking traffic for fall × interval.
			m.active = StateDown
			reason = "active: first check failed: " + m.lastErr
		case m.active == StateUp && m.failRun >= max(c.cfg.Fall, 1):
			m.active = StateDown
			reason = fmt.Sprintf("active: %d checks failed, last: %s", max(c.cfg.Fall, 1), m.lastErr)
		}
	}
	if reason != "" {
		c.applyLocked(m, time.Now(), reason)
	}
}

// jitter returns d spread uniformly over d × (1 ± j), given u uniform in
// [0, 1).
func jitter(d time.Duration, j, u float64) time.Duration {
	return time.Duration(float64(d) * (1 + j*(2*u-1)))
}

// firstDelay is when a backend's first check runs, given u uniform in
// [0, 1): anywhere in the first interval, so the checks of backends that
// appear together (at start, or from one DNS answer) spread out.
func firstDelay(interval time.Duration, u float64) time.Duration {
	return time.Duration(u * float64(interval))
}

// run is one backend's check loop.
func (c *Checker) run(ctx context.Context, m *member) {
	defer c.wg.Done()
	t := time.NewTimer(firstDelay(c.interval, rand.Float64()))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		start := time.Now()
		err := c.prober.probe(ctx, m.addr)
		if ctx.Err() != nil {
			return
		}
		dur := time.Since(start)
		c.observe(m, err, start, dur)
		if c.onCheck != nil {
			c.onCheck(m.addr, start, err)
		}
		// The next check is due an interval after this one started, so a
		// slow check does not stretch the fall time.
		t.Reset(max(0, jitter(c.interval, c.opt.Jitter, rand.Float64())-dur))
	}
}

// loop re-resolves names, notices backends added or removed by others,
// and steps the slow-start ramps.
func (c *Checker) loop() {
	defer c.wg.Done()
	var dnsC <-chan time.Time
	if c.hasDNS {
		t := time.NewTicker(c.opt.DNSInterval)
		defer t.Stop()
		dnsC = t.C
	}
	rec := time.NewTicker(max(c.interval, 100*time.Millisecond))
	defer rec.Stop()
	ramp := time.NewTimer(time.Hour)
	ramp.Stop()
	defer ramp.Stop()
	step := c.rampStep()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-dnsC:
			c.refresh(false)
		case <-rec.C:
			c.mu.Lock()
			c.reconcileLocked(nil)
			c.unlock()
		case <-c.kick:
			ramp.Reset(step)
		case <-ramp.C:
			if c.stepRamps(time.Now()) {
				ramp.Reset(step)
			}
		}
	}
}

// refresh resolves every DNS target (concurrently), installs the set if it
// changed (always on the first call, which also puts right weights that a
// reload elsewhere may have reset), and reconciles members.
func (c *Checker) refresh(first bool) {
	eps, errs := resolveTargets(c.ctx, c.opt.Resolver, c.opt.ResolveTimeout, c.targets)
	if c.ctx.Err() != nil && !first {
		return
	}
	c.mu.Lock()
	defer c.unlock()
	if c.phase != 1 {
		return
	}
	k := c.ctr.Load()
	for i, t := range c.targets {
		if t.kind == targetStatic {
			continue
		}
		k.resolutions.Add(1)
		name := t.cfg.Address
		if err := errs[i]; err != nil {
			k.resolveErrors.Add(1)
			msg := err.Error()
			if c.dnsErr[name] != msg {
				c.log.Warn("dns lookup failed, keeping the last good set", "name", name, "err", err, "kept", len(c.lastGood[name]))
			}
			c.dnsErr[name] = msg
			if last, ok := c.lastGood[name]; ok {
				eps[i] = last
			} else if t.kind == targetHost {
				// Never resolved: keep the name itself as a backend, which
				// the dialer resolves through the system resolver.
				eps[i] = []endpoint{{addr: name}}
			}
			continue
		}
		if _, was := c.dnsErr[name]; was {
			c.log.Info("dns lookup recovered", "name", name, "addresses", len(eps[i]))
			delete(c.dnsErr, name)
		}
		c.lastGood[name] = eps[i]
	}
	specs, source := buildSpecs(c.targets, eps, c.scale)
	if !first && slices.Equal(specs, c.installed) {
		return
	}
	if len(specs) == 0 {
		// Only SRV names that never resolved: an empty pool serves no
		// better than whatever it holds now.
		c.reconcileLocked(nil)
		return
	}
	before := map[string]bool{}
	for _, b := range c.pool.Backends() {
		before[b.Address()] = true
	}
	if err := c.pool.Update(specs); err != nil {
		k.updateErrors.Add(1)
		c.log.Error("installing the resolved backend set failed, keeping the old one", "err", err)
		return
	}
	c.installed = specs
	c.source = source
	clear(c.full)
	for _, s := range specs {
		c.full[s.Address] = s.Weight
	}
	added := map[string]bool{}
	for _, s := range specs {
		if !before[s.Address] {
			added[s.Address] = true
		}
	}
	c.reconcileLocked(added)
}

// reconcileLocked matches members to the pool's backends: new backends get
// a member (and a check loop), members of removed backends stop, and a
// backend object that was replaced gets the member's verdict.
func (c *Checker) reconcileLocked(added map[string]bool) {
	if c.phase != 1 {
		return
	}
	now := time.Now()
	live := map[string]bool{}
	k := c.ctr.Load()
	for _, b := range c.pool.Backends() {
		addr := b.Address()
		live[addr] = true
		m := c.members[addr]
		switch {
		case m == nil:
			m = &member{addr: addr, b: b, healthy: b.Healthy()}
			switch {
			case c.prober == nil:
				m.active = StateUp
			case b.Healthy():
				m.active = StateUnknown
			default:
				m.active = StateDown
			}
			c.members[addr] = m
			if c.initialized {
				k.added.Add(1)
				why := "config"
				if src := c.source[addr]; src != "" && src != addr {
					why = "dns: " + src
				}
				c.recordLocked(m, Event{Time: now, Address: addr, Change: ChangeAdded, Reason: why})
				if added[addr] && m.healthy {
					c.startRampLocked(m, now)
				}
			}
			c.applyLocked(m, now, "no active check configured")
		case m.b != b:
			// Replaced by an Update we did not make (or a new pool on a
			// reload): give the new object our verdict and ramp.
			m.b = b
			if !m.rampStart.IsZero() {
				b.SetWeight(rampWeight(c.fullOf(m), now.Sub(m.rampStart), c.cfg.SlowStart.D()))
			}
			b.SetHealthy(m.healthy)
		default:
			// Adopted from a predecessor or unchanged: push our verdict in
			// case someone else changed it.
			why := "passive: fail_timeout elapsed"
			if c.prober == nil {
				why = "active checks off"
			}
			c.applyLocked(m, now, why)
		}
		if c.prober != nil && m.cancel == nil {
			ctx, cancel := context.WithCancel(c.ctx)
			m.cancel = cancel
			c.wg.Add(1)
			go c.run(ctx, m)
		}
		if m.pTimer == nil && now.Before(m.pUntil) {
			m.pTimer = time.AfterFunc(m.pUntil.Sub(now), func() { c.passiveExpired(m) })
		}
		if !m.rampStart.IsZero() {
			c.kickRamp()
		}
	}
	for addr, m := range c.members {
		if live[addr] {
			continue
		}
		m.stopTimers()
		if m.pFails > 0 {
			c.failing.Add(-1)
		}
		delete(c.members, addr)
		delete(c.override, addr)
		k.removed.Add(1)
		why := "config"
		if c.hasDNS {
			why = "no longer resolved or configured"
		}
		c.recordLocked(nil, Event{Time: now, Address: addr, Change: ChangeRemoved, Reason: why})
	}
	c.initialized = true
}

// fullOf is m's full weight: the operator's, else the spec's.
func (c *Checker) fullOf(m *member) int {
	if w, ok := c.override[m.addr]; ok {
		return w
	}
	if w, ok := c.full[m.addr]; ok {
		return w
	}
	return max(m.b.Weight(), 1)
}

func (c *Checker) kickRamp() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// startRampLocked begins m's slow start: its weight drops to the floor
// share and climbs to full over SlowStart.
func (c *Checker) startRampLocked(m *member, now time.Time) {
	if c.cfg.SlowStart <= 0 || !c.initialized {
		return
	}
	m.rampStart = now
	m.b.SetWeight(rampWeight(c.fullOf(m), 0, c.cfg.SlowStart.D()))
	c.kickRamp()
}

// stepRamps moves every ramp to its current weight and ends those whose
// time is up. It reports whether any ramp is still running.
func (c *Checker) stepRamps(now time.Time) bool {
	c.mu.Lock()
	defer c.unlock()
	if c.phase != 1 {
		return false
	}
	more := false
	total := c.cfg.SlowStart.D()
	for _, m := range c.members {
		if m.rampStart.IsZero() {
			continue
		}
		el := now.Sub(m.rampStart)
		m.b.SetWeight(rampWeight(c.fullOf(m), el, total))
		if el >= total {
			m.rampStart = time.Time{}
			c.log.Debug("backend slow start finished", "backend", m.addr)
			continue
		}
		more = true
	}
	return more
}

// rampStep is how often ramps move: fine enough that each weight step is
// taken near its time, coarse enough not to rebuild tables needlessly
// (SetWeight is a no-op when the weight did not change).
func (c *Checker) rampStep() time.Duration {
	return min(max(c.cfg.SlowStart.D()/50, 10*time.Millisecond), 5*time.Second)
}

// rampWeight is the weight elapsed into a slow start of length total: from
// slowStartFloor × full up to full, linearly, at least 1.
func rampWeight(full int, elapsed, total time.Duration) int {
	if total <= 0 || elapsed >= total {
		return full
	}
	f := slowStartFloor + (1-slowStartFloor)*float64(max(elapsed, 0))/float64(total)
	return min(max(int(math.Round(float64(full)*f)), 1), full)
}
