// Package proxy owns the listeners and one connection's life from accept to
// close: limits, the upgrade handshake, routing, backend choice and connect,
// and the hand-off to a data plane. It does not know how bytes move.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/dataplane"
)

// Planes are the data planes the proxy can hand connections to. Sockmap is
// nil when the kernel path is unavailable; Splice is always set.
type Planes struct {
	Sockmap dataplane.Plane
	Splice  dataplane.Plane
}

// Options configure a Server beyond the config file.
type Options struct {
	Logger *slog.Logger
	// OnClose, when set, is called once per established connection after it
	// closed (the access log).
	OnClose func(c *Conn, r dataplane.Result)
	// OnEstablish, when set, is called once per connection after a data
	// plane took it (metrics histograms).
	OnEstablish func(c *Conn)
	// OnConnectResult, when set, is told the outcome of every backend try:
	// an error for a failed connect or handshake, nil once the backend
	// answered (passive health checks). The agent's own failures (fds,
	// shutdown) are not reported.
	OnConnectResult func(pool string, b *balance.Backend, err error)
	// Specs, when set, turns a pool's configured backends into the specs
	// the balancer uses (DNS and SRV resolution by the health package);
	// otherwise the configured addresses are used as they are.
	Specs func(ctx context.Context, p config.Pool) ([]balance.BackendSpec, error)
}

// Server is the running proxy: listeners, pools and the connection table.
type Server struct {
	log     *slog.Logger
	planes  Planes
	onClose func(*Conn, dataplane.Result)
	onEstab func(*Conn)
	onTry   func(pool string, b *balance.Backend, err error)
	specs   func(ctx context.Context, p config.Pool) ([]balance.BackendSpec, error)

	state atomic.Pointer[state]
	table *table
	lim   atomic.Pointer[limiter]
	ids   atomic.Uint64

	// Counters are read by the metrics package.
	Counters Counters
	tls      tlsState     // certificates, backend TLS, copy plane (tls.go)
	ho       handoffState // binary upgrade: inherited listeners, handshakes in flight (handoff.go)

	mu        sync.Mutex         // serialises Start, Reload and Shutdown
	listeners map[string]*socket // by address
	draining  atomic.Bool
	lameDuck  atomic.Bool
	wg        sync.WaitGroup // accept loops and handshakes in progress
}

// state is everything a reload replaces at once.
type state struct {
	cfg   *config.Config
	pools map[string]*pool
}

// socket is one open listening socket. Its compiled configuration is
// swapped whole on reload; each accepted connection uses the one current
// at accept time.
type socket struct {
	ln     *net.TCPListener
	cur    atomic.Pointer[listener]
	closed atomic.Bool
}

// listener is a listener's compiled configuration: immutable once built.
type listener struct {
	cfg    config.Listener
	routes []*route
	pool   *pool // tcp mode, or websocket fallback
	plane  string
	tls    *tlsListener // nil without TLS or SNI settings (tls.go)
}

// New builds a Server from a validated config. Nothing listens until Start.
func New(cfg *config.Config, planes Planes, opts Options) (*Server, error) {
	if planes.Splice == nil {
		return nil, errors.New("proxy: the splice data plane is required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{log: log, planes: planes, onClose: opts.OnClose, onEstab: opts.OnEstablish, onTry: opts.OnConnectResult, specs: opts.Specs, table: newTable(), listeners: map[string]*socket{}}
	st, err := s.compile(cfg, nil)
	if err != nil {
		return nil, err
	}
	s.state.Store(st)
	if err := s.prepareTLS(cfg); err != nil {
		return nil, err
	}
	l := cfg.Limits
	s.lim.Store(newLimiter(l.MaxConns, l.PerIPConns, l.PerIPRate, l.PerIPBurst, l.IPv6Prefix))
	return s, nil
}

// compile turns config pools into balance pools. Pools whose name survives
// a reload are updated in place, so their backends keep their counters and
// existing connections stay where they are.
func (s *Server) compile(cfg *config.Config, old *state) (*state, error) {
	st := &state{cfg: cfg, pools: map[string]*pool{}}
	for _, pc := range cfg.Pools {
		specs, err := s.poolSpecs(pc)
		if err != nil {
			return nil, fmt.Errorf("pool %s: %w", pc.Name, err)
		}
		opt := balance.Options{
			Algorithm: balance.Algorithm(pc.Balance), Fallback: balance.Algorithm(pc.HashFallback),
			TableSize: pc.MaglevTableSize, BalanceFactor: pc.BalanceFactor,
		}
		if old != nil {
			if p := old.pools[pc.Name]; p != nil && p.cfg.Balance == pc.Balance && p.cfg.MaglevTableSize == pc.MaglevTableSize &&
				p.cfg.BalanceFactor == pc.BalanceFactor && p.cfg.HashFallback == pc.HashFallback {
				if err := p.Pool.Update(specs); err != nil {
					return nil, fmt.Errorf("pool %s: %w", pc.Name, err)
				}
				st.pools[pc.Name] = &pool{Pool: p.Pool, cfg: pc, key: parseHashKey(pc.HashKey)}
				continue
			}
		}
		bp, err := balance.NewPool(pc.Name, specs, opt)
		if err != nil {
			return nil, fmt.Errorf("pool %s: %w", pc.Name, err)
		}
		st.pools[pc.Name] = &pool{Pool: bp, cfg: pc, key: parseHashKey(pc.HashKey)}
	}
	return st, nil
}

// poolSpecs resolves a pool's backends through Options.Specs, or takes the
// configured addresses as they are.
func (s *Server) poolSpecs(pc config.Pool) ([]balance.BackendSpec, error) {
	if s.specs != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return s.specs(ctx, pc)
	}
	specs := make([]balance.BackendSpec, len(pc.Backends))
	for i, b := range pc.Backends {
		specs[i] = balance.BackendSpec{Address: b.Address, Weight: b.Weight, Backup: b.Backup, Down: b.Down, MaxConns: b.MaxConns}
	}
	return specs, nil
}

func (s *Server) compileListener(lc config.Listener, st *state) *listener {
	l := &listener{cfg: lc, plane: lc.Dataplane}
	l.tls = s.compileTLS(lc, st)
	if lc.Pool != "" {
		l.pool = st.pools[lc.Pool]
	}
	for _, rc := range lc.Routes {
		p := st.pools[rc.Pool]
		r := &route{
			host: rc.Host, pool: p, upgradeOnly: rc.UpgradeOnly, origins: rc.AllowedOrigins, key: p.key,
		}
		r.path, r.exact = rc.Path, false
		if after, ok := cutPrefix(rc.Path, "="); ok {
			r.path, r.exact = after, true
		}
		if rc.HashKey != "" {
			r.key = parseHashKey(rc.HashKey)
		}
		r.name = rc.Host + rc.Path
		if r.name == "" {
			r.name = "/"
		}
		l.routes = append(l.routes, r)
	}
	return l
}

func cutPrefix(s, p string) (string, bool) {
	if len(s) >= len(p) && s[:len(p)] == p {
		return s[len(p):], true
	}
	return s, false
}

// Start opens every listener and starts accepting. On error nothing is left
// listening.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.state.Load()
	opened, err := s.openForStart(st) // those Open prepared, else open (handoff.go)
	if err != nil {
		return err
	}
	for _, sk := range opened {
		s.listeners[sk.cur.Load().cfg.Address] = sk
		s.serve(sk)
	}
	s.wg.Add(1)
	go s.sweepLoop()
	s.startTLS()
	return nil
}

// open opens sockets for lcs; on error it closes those it opened.
func (s *Server) open(lcs []config.Listener, st *state) ([]*socket, error) {
	var opened []*socket
	for _, lc := range lcs {
		ln, err := s.listen(lc) // an inherited socket, or Listen (handoff.go)
		if err != nil {
			for _, o := range opened {
				o.ln.Close()
			}
			return nil, err
		}
		sk := &socket{ln: ln}
		sk.cur.Store(s.compileListener(lc, st))
		opened = append(opened, sk)
	}
	return opened, nil
}

// Reload applies a new, validated configuration without dropping any
// established connection: pools that keep their name keep their backends'
// state (existing connections stay where they are), listeners whose address
// stays keep their socket and get the new routes for new connections, new
// addresses are opened and removed ones closed. If a new listener cannot
// be opened nothing changes and the error says why.
func (s *Server) Reload(cfg *config.Config) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining.Load() {
		return errors.New("reload: the agent is draining")
	}
	if err := s.handoffBusy(); err != nil { // (handoff.go)
		return err
	}
	// Certificates load first: a file that does not load changes nothing.
	if err := s.prepareTLS(cfg); err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	old := s.state.Load()
	var added []config.Listener
	keep := map[string]bool{}
	for _, lc := range cfg.Listeners {
		keep[lc.Address] = true
		if s.listeners[lc.Address] == nil {
			added = append(added, lc)
		}
	}
	// Open new sockets before touching anything, so a port in use leaves
	// the running config untouched.
	opened, err := s.open(added, old)
	if err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	st, err := s.compile(cfg, old)
	if err != nil {
		for _, o := range opened {
			o.ln.Close()
		}
		return fmt.Errorf("reload: %w", err)
	}
	s.state.Store(st)
	l := cfg.Limits
	s.lim.Load().set(l.MaxConns, l.PerIPConns, l.PerIPRate, l.PerIPBurst, l.IPv6Prefix)
	for _, lc := range cfg.Listeners {
		if sk := s.listeners[lc.Address]; sk != nil {
			sk.cur.Store(s.compileListener(lc, st))
		}
	}
	for _, sk := range opened {
		lc := sk.cur.Load().cfg
		sk.cur.Store(s.compileListener(lc, st))
		s.listeners[lc.Address] = sk
		s.serve(sk)
	}
	for addr, sk := range s.listeners {
		if !keep[addr] {
			sk.closed.Store(true)
			sk.ln.Close()
			delete(s.listeners, addr)
			s.log.Info("listener closed by reload", "address", addr)
		}
	}
	s.log.Info("configuration reloaded", "listeners", len(s.listeners), "pools", len(st.pools))
	return nil
}

func (s *Server) serve(sk *socket) {
	l := sk.cur.Load()
	s.log.Info("listening", "listener", l.cfg.Name, "address", sk.ln.Addr().String(), "mode", l.cfg.Mode, "dataplane", l.plane)
	s.wg.Add(1)
	go s.acceptLoop(sk)
}

// Addrs returns the bound addresses by listener name (useful with ":0").
func (s *Server) Addrs() map[string]net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]net.Addr{}
	for _, sk := range s.listeners {
		out[sk.cur.Load().cfg.Name] = sk.ln.Addr()
	}
	return out
}

func (s *Server) acceptLoop(sk *socket) {
	defer s.wg.Done()
	var backoff time.Duration
	for {
		c, err := sk.ln.AcceptTCP()
		l := sk.cur.Load()
		if err != nil {
			if sk.closed.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of fds (EMFILE/ENFILE) or memory: pause accepting rather
			// than spin or exit; the backlog holds new clients meanwhile.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed, pausing", "listener", l.cfg.Name, "err", err, "pause", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		s.Counters.Accepted.Add(1)
		s.wg.Add(1)
		s.ho.inflight.Add(1) // an upgrade waits for handshakes (handoff.go)
		go func() {
			defer s.wg.Done()
			defer s.ho.inflight.Add(-1)
			s.handle(l, c)
		}()
	}
}

func (s *Server) sweepLoop() {
	defer s.wg.Done()
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for !s.draining.Load() {
		select {
		case now := <-t.C:
			s.lim.Load().sweep(now)
		case <-time.After(time.Second):
		}
	}
}

// Conns returns a snapshot of the established connections, oldest first.
func (s *Server) Conns() []*Conn { return s.table.snapshot() }

// Active returns the number of established connections.
func (s *Server) Active() int { return s.table.len() }

// Stats returns the data-plane counters of connection c.
func (s *Server) Stats(c *Conn) (dataplane.Stats, bool) { return c.Plane.Stats(c.ID) }

// Kill closes connection id (RST both ways). False if it is not open.
func (s *Server) Kill(id uint64) bool {
	c := s.table.get(id)
	if c == nil {
		return false
	}
	return c.Plane.Kill(id, dataplane.ReasonKill)
}

// Pools returns the live pools by name.
func (s *Server) Pools() map[string]*balance.Pool {
	st := s.state.Load()
	out := make(map[string]*balance.Pool, len(st.pools))
	for n, p := range st.pools {
		out[n] = p.Pool
	}
	return out
}

// Config returns the running configuration.
func (s *Server) Config() *config.Config { return s.state.Load().cfg }

// Draining reports whether readiness is false: Shutdown has begun or the
// agent was put in lame duck.
func (s *Server) Draining() bool { return s.draining.Load() || s.lameDuck.Load() }

// SetLameDuck turns readiness false (on) or back while the listeners keep
// accepting: the step before a stop, so load balancers move new clients
// elsewhere before any port refuses them.
func (s *Server) SetLameDuck(on bool) { s.lameDuck.Store(on) }

// Shutdown stops accepting, waits for established connections to finish
// until ctx is done, then closes the rest gradually (spread over up to
// spread, so clients do not all reconnect at the same instant) and returns
// when every connection is closed.
func (s *Server) Shutdown(ctx context.Context, spread time.Duration) {
	s.draining.Store(true)
	s.mu.Lock()
	for _, sk := range s.listeners {
		sk.closed.Store(true)
		sk.ln.Close()
	}
	s.listeners = map[string]*socket{}
	s.mu.Unlock()
	s.log.Info("draining", "connections", s.table.len())

	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
wait:
	for s.table.len() > 0 {
		select {
		case <-ctx.Done():
			break wait
		case <-tick.C:
		}
	}
	rest := s.table.snapshot()
	if len(rest) > 0 {
		s.log.Info("drain deadline reached, closing connections", "connections", len(rest), "over", spread)
		var gap time.Duration
		if len(rest) > 1 {
			gap = spread / time.Duration(len(rest))
		}
		for _, c := range rest {
			c.Plane.Kill(c.ID, dataplane.ReasonDrain)
			if gap > 0 {
				time.Sleep(gap)
			}
		}
	}
	s.wg.Wait()
	// Kill is asynchronous on some planes: wait for the last Done, but not
	// forever — the planes' own Close (after this) closes what is left.
	for deadline := time.Now().Add(10 * time.Second); s.table.len() > 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			s.log.Warn("connections still open after their close was requested; the data planes will close them", "connections", s.table.len())
			break
		}
	}
}

// clientAddr returns the peer of c as a netip.AddrPort.
func clientAddr(c net.Conn) netip.AddrPort { return tcpAddr(c.RemoteAddr()) }

// CloseGradually closes b's established connections (reason drain), spread
// evenly over d, so their clients reconnect elsewhere a few at a time. It
// returns at once; the closing stops early if b stops draining.
func (s *Server) CloseGradually(b *balance.Backend, d time.Duration) {
	var conns []*Conn
	for _, c := range s.table.snapshot() {
		if c.backend == b {
			conns = append(conns, c)
		}
	}
	if len(conns) == 0 {
		return
	}
	gap := d / time.Duration(len(conns))
	s.log.Info("closing a drained backend's connections gradually", "backend", b.Address(), "connections", len(conns), "over", d)
	go func() {
		for i, c := range conns {
			if i > 0 {
				time.Sleep(gap)
			}
			if !b.Draining() {
				s.log.Info("gradual close stopped: the backend is no longer draining", "backend", b.Address(), "closed", i)
				return
			}
			c.Plane.Kill(c.ID, dataplane.ReasonDrain)
		}
	}()
}
