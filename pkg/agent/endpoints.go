package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wsplice/wsplice/pkg/admin"
	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/dataplane"
	"github.com/wsplice/wsplice/pkg/health"
	"github.com/wsplice/wsplice/pkg/metrics"
	"github.com/wsplice/wsplice/pkg/proxy"
)

// endpoints are the operator-facing parts of a running agent: the metrics
// server (/metrics, /healthz, /readyz on metrics.address), the admin API on
// admin.socket, the backend state history the CLI shows, and the periodic
// access-log line for long-lived connections (log.access_interval).
type endpoints struct {
	started time.Time
	metrics *metrics.Collector // nil without metrics.address
	httpSrv *http.Server
	httpLn  net.Listener
	admin   *admin.Server
	history *backendHistory

	diagMu sync.Mutex
	diag   *admin.SockDiag // opened on the first TCP-detail request

	// closeHook and establishHook record that the proxy calls
	// connClosed / connEstablished (tests check the wiring with them).
	closeHook, establishHook atomic.Bool

	stop chan struct{}
	wg   sync.WaitGroup
}

func (a *Agent) endpoints() *endpoints { return a.ep.Load() }

// reasonOpen is the "reason" of the periodic access-log line of a
// connection that is still open (log.access_interval).
const reasonOpen dataplane.CloseReason = "open"

// startEndpoints starts the metrics server, the admin socket and the
// periodic access log, as configured. It needs a.Proxy (created, started or
// not). Calling it again is a no-op. On error nothing is left running.
//
// Call it before a.Proxy.Start when possible: a second agent started by
// mistake then fails on the admin socket before its listeners (bound with
// SO_REUSEPORT) take a share of the traffic.
func (a *Agent) startEndpoints() (err error) {
	if a.endpoints() != nil {
		return nil
	}
	if a.Proxy == nil {
		return errors.New("endpoints: the proxy must exist before the endpoints start")
	}
	ep := &endpoints{started: time.Now(), history: newBackendHistory(), stop: make(chan struct{})}
	defer func() {
		if err != nil {
			ep.close()
		}
	}()
	cfg := a.cfg
	if cfg.Metrics.Address != "" {
		ep.metrics = metrics.New(metricsSource{a}, metrics.Options{
			PerConnection: cfg.Metrics.PerConnection, MaxSeries: cfg.Metrics.MaxSeries,
		})
		ln, err := net.Listen("tcp", cfg.Metrics.Address)
		if err != nil {
			return fmt.Errorf("metrics.address: %w", err)
		}
		ep.httpLn = ln
		ep.httpSrv = &http.Server{Handler: a.metricsMux(ep), ReadHeaderTimeout: 5 * time.Second}
		ep.wg.Add(1)
		go func() {
			defer ep.wg.Done()
			_ = ep.httpSrv.Serve(ln)
		}()
		a.log.Info("metrics listening", "address", ln.Addr().String(), "per_connection", cfg.Metrics.PerConnection)
	}
	if cfg.Admin.Socket != "" {
		s, err := admin.Listen(cfg.Admin.Socket, adminHandler{a: a, ep: ep}, admin.ServerOptions{Logger: a.log})
		if err != nil {
			return fmt.Errorf("admin.socket: %w", err)
		}
		ep.admin = s
		a.log.Info("admin socket listening", "path", cfg.Admin.Socket)
	}
	ep.history.sample(a.backends(), time.Now())
	ep.wg.Add(1)
	go a.historyLoop(ep)
	if iv := cfg.Log.AccessInterval.D(); iv > 0 && a.access != nil && a.access.log != nil {
		ep.wg.Add(1)
		go a.accessLoop(ep, iv)
	}
	a.ep.Store(ep)
	return nil
}

// stopEndpoints stops what startEndpoints started. Call it after the
// proxy's drain, so /readyz answers "draining" and the CLI works until the
// end.
func (a *Agent) stopEndpoints() {
	ep := a.endpoints()
	if ep == nil {
		return
	}
	a.ep.Store(nil)
	ep.close()
}

func (ep *endpoints) close() {
	close(ep.stop)
	if ep.admin != nil {
		_ = ep.admin.Close() // the socket is gone either way
	}
	if ep.httpSrv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		if ep.httpSrv.Shutdown(ctx) != nil {
			ep.httpSrv.Close()
		}
		cancel()
	}
	ep.wg.Wait()
	ep.diagMu.Lock()
	if ep.diag != nil {
		ep.diag.Close()
	}
	ep.diagMu.Unlock()
}

// metricsMux serves /metrics, and /healthz (liveness: the agent answers) and
// /readyz (readiness: false while draining) for the orchestrator.
func (a *Agent) metricsMux(ep *endpoints) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", metrics.Handler(metrics.NewRegistry(ep.metrics)))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if a.Proxy.Draining() {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "draining")
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// connClosed is the proxy's OnClose: the access-log line, then the
// metrics (final byte counts join the totals; the lifetime goes to the
// duration histogram).
//
// Wiring (lead): proxy.Options{OnClose: a.connClosed}.
func (a *Agent) connClosed(c *proxy.Conn, r dataplane.Result) {
	a.access.write(c, r)
	ep := a.endpoints()
	if ep == nil {
		return
	}
	ep.closeHook.Store(true)
	if ep.metrics == nil {
		return
	}
	ep.metrics.ObserveClosed(metrics.Closed{
		Conn:     metricsConn(c, r.Stats, true),
		Reason:   string(r.Reason),
		Duration: time.Since(c.Start),
	})
}

// connEstablished records the handshake and backend connect times of a
// connection just handed to a data plane.
//
// Wiring (lead): a proxy hook called once per established connection,
// e.g. proxy.Options{OnEstablish: a.connEstablished}, and the connect time
// of the successful try in proxy.Conn (see connectTime).
func (a *Agent) connEstablished(c *proxy.Conn) {
	ep := a.endpoints()
	if ep == nil {
		return
	}
	ep.establishHook.Store(true)
	if ep.metrics == nil {
		return
	}
	ep.metrics.ObserveEstablished(metrics.Established{
		Listener: c.Listener, Pool: c.Pool, Backend: c.Backend,
		Handshake: c.Handshake, Connect: connectTime(c),
	})
}

// connectTime is the backend TCP connect time of c's successful try.
func connectTime(c *proxy.Conn) time.Duration { return c.Connect }

// accessLoop writes an access-log line, with reason "open" and the counters
// so far, for every connection older than iv, every iv.
func (a *Agent) accessLoop(ep *endpoints, iv time.Duration) {
	defer ep.wg.Done()
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		select {
		case <-ep.stop:
			return
		case now := <-t.C:
			a.logOpenConns(now, iv)
		}
	}
}

// logOpenConns writes the periodic line of every connection open for at
// least iv at now.
func (a *Agent) logOpenConns(now time.Time, iv time.Duration) {
	for _, c := range a.Proxy.Conns() {
		if now.Sub(c.Start) < iv {
			continue
		}
		st, ok := a.Proxy.Stats(c)
		if !ok {
			continue // closing: its close line follows
		}
		a.access.write(c, dataplane.Result{Stats: st, Reason: reasonOpen})
	}
}

// historyLoop samples backend states once a second, so the history also
// shows changes made by health checks and reloads.
func (a *Agent) historyLoop(ep *endpoints) {
	defer ep.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ep.stop:
			return
		case now := <-t.C:
			ep.history.sample(a.backends(), now)
		}
	}
}

// poolBackend is one backend with its pool's name.
type poolBackend struct {
	pool string
	b    *balance.Backend
}

func (pb poolBackend) state() string {
	return admin.BackendState(pb.b.Healthy(), pb.b.Draining(), pb.b.Down())
}

// backends lists every backend of every pool, pools in config order.
func (a *Agent) backends() []poolBackend {
	pools := a.Proxy.Pools()
	var out []poolBackend
	seen := map[string]bool{}
	add := func(name string) {
		p := pools[name]
		if p == nil || seen[name] {
			return
		}
		seen[name] = true
		for _, b := range p.Backends() {
			out = append(out, poolBackend{pool: name, b: b})
		}
	}
	for _, pc := range a.Proxy.Config().Pools {
		add(pc.Name)
	}
	rest := make([]string, 0, len(pools))
	for n := range pools {
		rest = append(rest, n)
	}
	slices.Sort(rest)
	for _, n := range rest {
		add(n)
	}
	return out
}

// metricsConn converts a proxy connection and its counters.
func metricsConn(c *proxy.Conn, st dataplane.Stats, ok bool) metrics.Conn {
	m := metrics.Conn{
		ID: c.ID, Listener: c.Listener, Route: c.Route, Pool: c.Pool, Backend: c.Backend,
		Client: c.Client.String(), Start: c.Start,
	}
	if c.Plane != nil {
		m.Dataplane = string(c.Plane.Kind())
	}
	if ok {
		m.ToBackend = metrics.Flow{Bytes: st.ClientToBackend.Bytes, Segments: st.ClientToBackend.Segments}
		m.ToClient = metrics.Flow{Bytes: st.BackendToClient.Bytes, Segments: st.BackendToClient.Segments}
	}
	return m
}

// metricsSource is the agent as the metrics collector reads it.
type metricsSource struct{ a *Agent }

func (s metricsSource) EachConn(fn func(*metrics.Conn)) {
	for _, c := range s.a.Proxy.Conns() {
		st, ok := s.a.Proxy.Stats(c)
		m := metricsConn(c, st, ok)
		fn(&m)
	}
}

func (s metricsSource) Backends() []metrics.Backend {
	bs := s.a.backends()
	out := make([]metrics.Backend, len(bs))
	for i, pb := range bs {
		b := pb.b
		out[i] = metrics.Backend{Pool: pb.pool, Address: b.Address(), Weight: b.Weight(), Active: b.Active(),
			Healthy: b.Healthy(), Draining: b.Draining(), Down: b.Down(), Backup: b.Backup()}
	}
	return out
}

func (s metricsSource) Proxy() metrics.ProxyCounters {
	c := &s.a.Proxy.Counters
	return metrics.ProxyCounters{
		Accepted: c.Accepted.Load(), Established: c.Established.Load(), ConnectFails: c.ConnectFails.Load(),
		PlaneFallbacks: c.PlaneFallbacks.Load(), Refusals: c.Refusals(),
	}
}

func (s metricsSource) Draining() bool { return s.a.Proxy.Draining() }

func (s metricsSource) Sockmap() (metrics.SockmapCounters, bool, error) {
	if s.a.Sockmap == nil {
		return metrics.SockmapCounters{}, false, nil
	}
	c := s.a.Sockmap.Counters()
	return metrics.SockmapCounters{
		Active: c.Active, Demoted: c.Demoted,
		Demotions:      map[string]uint64{"parked": c.DemotedParked, "rate": c.DemotedRate, "insert": c.DemotedInsert},
		DemoteFailures: c.DemoteFailures, IntegrityResets: c.IntegrityResets, InsertFailures: c.InsertFailures,
		RedirectFailures: c.RedirectFailures, RedirectResets: c.RedirectResets, ParkedBytes: c.ParkedBytes,
		IterPasses: c.IterPasses, IterTime: c.IterTime, DrainTime: c.DrainTime,
	}, true, nil
}

func (s metricsSource) Splice() (metrics.SpliceStats, bool) {
	if s.a.Splice == nil {
		return metrics.SpliceStats{}, false
	}
	idle, total := s.a.Splice.Pipes()
	return metrics.SpliceStats{Conns: s.a.Splice.Len(), PipesIdle: idle, PipesTotal: total}, true
}

func (s metricsSource) TLS() (metrics.TLSStats, bool) {
	t := s.a.Proxy.TLSStats()
	out := metrics.TLSStats{
		Handshakes: t.Handshakes, PassthroughFallbacks: t.PassthroughFallbacks,
		Reloads: t.Reloads, ReloadFailures: t.ReloadFailures,
	}
	if cp := s.a.Proxy.CopyPlane(); cp != nil {
		out.CopyPlane, out.CopyConns = true, cp.Len()
	}
	return out, true
}

// backendHistory keeps the last state changes of each backend, newest
// first: what the admin API changed, and what the sampler observed.
type backendHistory struct {
	mu     sync.Mutex
	last   map[string]string // pool/address → state
	events map[string][]admin.Transition
}

// historyLen bounds the transitions kept per backend.
const historyLen = 16

func newBackendHistory() *backendHistory {
	return &backendHistory{last: map[string]string{}, events: map[string][]admin.Transition{}}
}

func historyKey(pool, addr string) string { return pool + "/" + addr }

// record adds a transition unless it repeats the last state without a
// reason.
func (h *backendHistory) record(key, state, cause, reason string, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.recordLocked(key, state, cause, reason, now)
}

func (h *backendHistory) recordLocked(key, state, cause, reason string, now time.Time) {
	if h.last[key] == state && reason == "" {
		return
	}
	h.last[key] = state
	ev := append([]admin.Transition{{Time: now, State: state, Cause: cause, Reason: reason}}, h.events[key]...)
	if len(ev) > historyLen {
		ev = ev[:historyLen]
	}
	h.events[key] = ev
}

// sample records observed state changes and forgets backends that left.
func (h *backendHistory) sample(bs []poolBackend, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	present := make(map[string]bool, len(bs))
	for _, pb := range bs {
		k := historyKey(pb.pool, pb.b.Address())
		present[k] = true
		h.recordLocked(k, pb.state(), "observed", "", now)
	}
	for k := range h.last {
		if !present[k] {
			delete(h.last, k)
			delete(h.events, k)
		}
	}
}

func (h *backendHistory) get(key string) []admin.Transition {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.events[key])
}

// adminHandler is the agent side of the admin API.
type adminHandler struct {
	a  *Agent
	ep *endpoints
}

var _ admin.Handler = adminHandler{}

func (h adminHandler) Status(context.Context) (admin.Status, error) {
	a := h.a
	st := admin.Status{
		Version: metrics.Version(), PID: os.Getpid(), Started: h.ep.started, Draining: a.Proxy.Draining(),
		Dataplane: string(dataplane.KindSplice),
	}
	if a.Sockmap != nil {
		st.Dataplane = string(dataplane.KindSockmap)
	}
	cfg := a.Proxy.Config()
	addrs := a.Proxy.Addrs()
	for _, l := range cfg.Listeners {
		addr := l.Address
		if ba, ok := addrs[l.Name]; ok {
			addr = ba.String()
		}
		st.Listeners = append(st.Listeners, admin.Listener{Name: l.Name, Address: addr, Mode: l.Mode, Dataplane: l.Dataplane})
	}
	for _, c := range a.Proxy.Conns() {
		st.Connections.Active++
		switch {
		case c.Plane == nil:
		case c.Plane.Kind() == dataplane.KindSockmap:
			st.Connections.Sockmap++
		case c.Plane.Kind() == dataplane.KindCopy:
			st.Connections.TLS++
		default:
			st.Connections.Splice++
		}
	}
	pc := &a.Proxy.Counters
	st.Counters = admin.Counters{
		Accepted: pc.Accepted.Load(), Established: pc.Established.Load(), ConnectFails: pc.ConnectFails.Load(),
		PlaneFallbacks: pc.PlaneFallbacks.Load(), Refusals: pc.Refusals(),
	}
	byPool := map[string]*admin.PoolSummary{}
	for _, pb := range a.backends() {
		ps := byPool[pb.pool]
		if ps == nil {
			st.Pools = append(st.Pools, admin.PoolSummary{Name: pb.pool})
			ps = &st.Pools[len(st.Pools)-1]
			byPool[pb.pool] = ps
		}
		ps.Backends++
		switch pb.state() {
		case admin.StateUp:
			ps.Up++
		case admin.StateDraining:
			ps.Draining++
		}
		ps.Active += pb.b.Active()
	}
	if a.Sockmap != nil {
		c := a.Sockmap.Counters()
		st.Connections.Demoted = c.Demoted
		st.Sockmap = &admin.SockmapStatus{
			Active: c.Active, Demoted: c.Demoted, ParkedBytes: c.ParkedBytes,
			Demotions:       map[string]uint64{"parked": c.DemotedParked, "rate": c.DemotedRate, "insert": c.DemotedInsert},
			IntegrityResets: c.IntegrityResets, InsertFailures: c.InsertFailures, RedirectFailures: c.RedirectFailures,
		}
	}
	if h.ep.httpLn != nil {
		st.Metrics = h.ep.httpLn.Addr().String()
	}
	return st, nil
}

func (h adminHandler) Conns(ctx context.Context, q admin.ConnQuery) ([]admin.Conn, error) {
	client, err := admin.ParseClientFilter(q.Client)
	if err != nil {
		return nil, err
	}
	var diag *admin.SockDiag
	if q.TCP {
		if diag, err = h.sockDiag(); err != nil {
			return nil, err
		}
	}
	now := time.Now()
	var out []admin.Conn
	for _, c := range h.a.Proxy.Conns() {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if (q.Backend != "" && !admin.MatchBackend(q.Backend, c.Pool, c.Backend)) ||
			(q.Route != "" && q.Route != c.Route) || !client(c.Client) {
			continue
		}
		st, ok := h.a.Proxy.Stats(c)
		if !ok {
			continue // closing
		}
		ac := admin.Conn{
			ID: c.ID, Listener: c.Listener, Route: c.Route, Pool: c.Pool, Backend: c.Backend,
			Client: c.Client.String(), Local: addrString(c.Local), BackendLocal: addrString(c.BackendFrom),
			Dataplane: string(st.Plane), Demoted: st.Demoted, DemoteReason: st.DemoteReason, Status: c.Status,
			Started: c.Start, AgeSeconds: now.Sub(c.Start).Seconds(), HandshakeSeconds: c.Handshake.Seconds(),
			BytesToBackend: st.ClientToBackend.Bytes, BytesToClient: st.BackendToClient.Bytes,
			SegmentsToBackend: st.ClientToBackend.Segments, SegmentsToClient: st.BackendToClient.Segments,
		}
		if ac.Dataplane == "" && c.Plane != nil {
			ac.Dataplane = string(c.Plane.Kind())
		}
		last := st.LastActivity
		if last.IsZero() || last.Before(c.Start) {
			last = c.Start
		}
		ac.IdleSeconds = max(now.Sub(last).Seconds(), 0)
		if diag != nil {
			ac.ClientTCP = lookupTCP(diag, c.Local, c.Client)
			ac.BackendTCP = lookupTCP(diag, c.BackendFrom, c.BackendTo)
		}
		out = append(out, ac)
	}
	return out, nil
}

func addrString(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// lookupTCP returns the TCP detail of one socket, nil when it is gone or
// unknown (a missing detail is not worth failing the listing for).
func lookupTCP(d *admin.SockDiag, local, remote netip.AddrPort) *admin.TCPInfo {
	if !local.IsValid() || !remote.IsValid() {
		return nil
	}
	info, err := d.Lookup(local, remote)
	if err != nil {
		return nil
	}
	return info
}

func (h adminHandler) sockDiag() (*admin.SockDiag, error) {
	h.ep.diagMu.Lock()
	defer h.ep.diagMu.Unlock()
	if h.ep.diag == nil {
		d, err := admin.OpenSockDiag()
		if err != nil {
			return nil, err
		}
		h.ep.diag = d
	}
	return h.ep.diag, nil
}

func (h adminHandler) Backends(context.Context) ([]admin.Backend, error) {
	bs := h.a.backends()
	out := make([]admin.Backend, len(bs))
	for i, pb := range bs {
		out[i] = h.backend(pb)
	}
	return out, nil
}

func (h adminHandler) backend(pb poolBackend) admin.Backend {
	b := pb.b
	return admin.Backend{
		Pool: pb.pool, Address: b.Address(), State: pb.state(), Healthy: b.Healthy(), Draining: b.Draining(),
		Down: b.Down(), Backup: b.Backup(), Weight: b.Weight(), Active: b.Active(),
		History: h.ep.history.get(historyKey(pb.pool, b.Address())),
	}
}

// matching returns the backends spec names, or ErrNotFound.
func (h adminHandler) matching(spec string) ([]poolBackend, error) {
	var out []poolBackend
	for _, pb := range h.a.backends() {
		if admin.MatchBackend(spec, pb.pool, pb.b.Address()) {
			out = append(out, pb)
		}
	}
	if len(out) == 0 {
		var known []string
		for _, pb := range h.a.backends() {
			known = append(known, historyKey(pb.pool, pb.b.Address()))
		}
		return nil, admin.NotFoundf("no backend matches %q (backends: %s)", spec, strings.Join(known, ", "))
	}
	return out, nil
}

func (h adminHandler) Drain(_ context.Context, spec string, on bool, closeOver time.Duration) ([]admin.Backend, error) {
	bs, err := h.matching(spec)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	out := make([]admin.Backend, len(bs))
	for i, pb := range bs {
		pb.b.SetDraining(on)
		if on && closeOver > 0 {
			h.a.Proxy.CloseGradually(pb.b, closeOver)
		}
		h.ep.history.record(historyKey(pb.pool, pb.b.Address()), pb.state(), "admin", "", now)
		out[i] = h.backend(pb)
	}
	return out, nil
}

func (h adminHandler) SetWeight(_ context.Context, spec string, w int) ([]admin.Backend, error) {
	bs, err := h.matching(spec)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	out := make([]admin.Backend, len(bs))
	for i, pb := range bs {
		old := pb.b.Weight()
		// Through the health set, which knows slow-start ramps and their
		// weight scale; directly only if the pool has no checker.
		if err := h.a.Health.SetWeight(pb.pool, pb.b.Address(), w); err != nil {
			pb.b.SetWeight(w)
		}
		if old != w {
			h.ep.history.record(historyKey(pb.pool, pb.b.Address()), pb.state(), "admin", fmt.Sprintf("weight %d→%d", old, w), now)
		}
		out[i] = h.backend(pb)
	}
	return out, nil
}

func (h adminHandler) Kill(_ context.Context, id uint64) error {
	if !h.a.Proxy.Kill(id) {
		return admin.NotFoundf("no open connection %d", id)
	}
	return nil
}

func (h adminHandler) Reload(context.Context) error {
	if err := h.a.Reload(); err != nil {
		return admin.Invalidf("%v", err)
	}
	return nil
}

func (h adminHandler) LameDuck(_ context.Context, on bool) error {
	h.a.Proxy.SetLameDuck(on)
	return nil
}

// healthEvent records a health state change in the backend history, with
// its reason, for `wsplice backends`.
func (a *Agent) healthEvent(e health.Event) {
	if ep := a.endpoints(); ep != nil {
		ep.history.record(historyKey(e.Pool, e.Address), string(e.Change), "health", e.Reason, e.Time)
	}
}
