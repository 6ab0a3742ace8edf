package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/wsplice/wsplice/pkg/admin"
	"github.com/wsplice/wsplice/pkg/dataplane"
	"github.com/wsplice/wsplice/pkg/proxy"
	"github.com/wsplice/wsplice/pkg/sdnotify"
	"github.com/wsplice/wsplice/pkg/upgrade"
)

// upgradeState is the agent's part of a binary upgrade (package upgrade
// runs the protocol, the proxy moves its listeners and connections).
type upgradeState struct {
	mu        sync.Mutex       // one upgrade at a time
	committed chan struct{}    // closed once a new process took over: Run exits
	session   *upgrade.Session // of the committed upgrade
	stop      context.Context  // ends when the agent stops: cancels an upgrade in progress
	cancel    context.CancelFunc
	inherit   *upgrade.Channel // set when this process was started by an upgrade or takes over
	objects   upgrade.Objects  // the old agent's kernel objects (its sockmap maps), from inherit
	opts      upgrade.Options
	// remote: the committed hand-off went to an agent that connected to
	// the take-over socket (another container): this one stays, idle,
	// until it is told to stop, or its container would be restarted.
	remote bool
	dialed bool // this agent connected to a running agent's take-over socket
	tsMu   sync.Mutex
	ts     *upgrade.TakeoverSocket // admin.takeover_socket, while listening
}

// initUpgrade prepares for upgrades and finds out whether this process is
// the new agent of one: started by an upgrade (upgrade.EnvFD set) or, with
// takeOver, connected to a running agent's take-over socket. It then reads
// the old agent's kernel objects, which the data planes need first.
func (a *Agent) initUpgrade(takeOver bool) error {
	a.up.committed = make(chan struct{})
	a.up.stop, a.up.cancel = context.WithCancel(context.Background())
	ch, err := upgrade.Inherited()
	if err != nil {
		return fmt.Errorf("started for an upgrade, but: %w", err)
	}
	if ch == nil && takeOver {
		path := a.cfg.Admin.TakeoverSocket
		if path == "" {
			return errors.New("--take-over needs admin.takeover_socket in the configuration")
		}
		ch, err = upgrade.DialTakeover(path)
		switch {
		case errors.Is(err, upgrade.ErrNoAgent):
			a.log.Info("take-over: no running agent; starting afresh", "socket", path)
		case err != nil:
			a.log.Warn("take-over: cannot reach the running agent; starting afresh beside it", "err", err)
		default:
			a.log.Info("take-over: taking over from the running agent", "socket", path, "pid", ch.PeerPID())
			a.up.dialed = true
		}
	}
	a.up.inherit = ch
	if ch != nil {
		// An error here reaches the old agent through Take (takeOver or
		// upgradeStartFailed); the planes then start without the objects.
		a.up.objects, _ = ch.Objects(30 * time.Second)
	}
	return nil
}

// upgradeStartFailed tells the old agent that this one could not start
// (it keeps serving), when this process was started by an upgrade.
func (a *Agent) upgradeStartFailed(err error) {
	if a.up.inherit == nil {
		return
	}
	// Take reports the error itself when it runs; this covers failures
	// before it (configuration, tuning, data planes).
	ch := a.up.inherit
	a.up.inherit = nil
	_, _ = upgrade.Take(context.Background(), ch, failingTarget{err}, upgrade.Options{Step: 5 * time.Second})
	if a.Proxy != nil {
		a.Proxy.Abandon()
	}
}

// failingTarget refuses at once: the start-up failed before the hand-off.
type failingTarget struct{ err error }

func (t failingTarget) Prepare(ls []upgrade.Listener) error {
	for _, l := range ls {
		l.File.Close()
	}
	return t.err
}
func (failingTarget) Adopt(cs []upgrade.Conn) []int {
	out := make([]int, len(cs))
	for i, c := range cs {
		c.Client.Close()
		c.Backend.Close()
		out[i] = i
	}
	return out
}
func (failingTarget) Paused(json.RawMessage) error { return errors.New("unreachable") }
func (failingTarget) Accept()                      {}
func (failingTarget) Done()                        {}

// takeOver is the new agent's start after its data planes and proxy
// exist: it takes the old agent's listeners and connections (see package
// upgrade), starts accepting, becomes systemd's main process, and opens
// the admin socket and metrics address once the old agent let go of them.
// An error before the first connection is adopted leaves the old agent
// serving; after it, this process serves whatever happens, so nothing
// after it fails start.
func (a *Agent) takeOver() error {
	ch := a.up.inherit
	a.up.inherit = nil
	t0 := time.Now()
	s, err := upgrade.Take(context.Background(), ch, &target{a: a}, a.up.opts)
	if s == nil {
		a.Proxy.Abandon()
		return fmt.Errorf("taking over from the running agent: %w", err)
	}
	if err != nil {
		a.log.Error("upgrade: serving what was handed over, but the hand-off did not end cleanly", "err", err)
	}
	r := s.Result
	a.log.Info("upgrade: took over from the previous agent", "listeners", r.Listeners, "connections", r.Conns,
		"rejected", r.Rejected, "batches", r.Batches, "took", time.Since(t0).Round(time.Microsecond))
	if err := s.WaitReleased(10 * time.Second); err != nil {
		a.log.Warn("upgrade: the old agent did not say it released the admin socket; trying anyway", "err", err)
	}
	// The old agent has closed them; a retry covers a slow release.
	var eerr error
	for i := 0; i < 50; i++ {
		if eerr = a.startEndpoints(); eerr == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	a.log.Error("upgrade: serving without the admin socket and metrics endpoint", "err", eerr)
	return nil
}

// target is the new agent's side of package upgrade.
type target struct {
	a       *Agent
	serving bool
}

func (t *target) Prepare(ls []upgrade.Listener) error {
	fs := make([]proxy.ListenerFile, len(ls))
	for i, l := range ls {
		fs[i] = proxy.ListenerFile{Name: l.Name, Address: l.Address, File: l.File}
	}
	t.a.Proxy.Inherit(fs)
	return t.a.Proxy.Open()
}

func (t *target) Adopt(conns []upgrade.Conn) []int {
	var rejected []int
	for i, c := range conns {
		if err := t.a.Proxy.Adopt(c.Record, c.Client, c.Backend); err != nil {
			t.a.log.Warn("upgrade: connection not adopted; the old agent keeps it", "err", err)
			rejected = append(rejected, i)
		}
	}
	return rejected
}

func (t *target) Paused(meta json.RawMessage) error {
	var m handoffMeta
	if err := json.Unmarshal(meta, &m); err != nil {
		return fmt.Errorf("the old agent's hand-off summary: %w", err)
	}
	t.a.Proxy.ReserveIDs(m.NextID)
	return nil
}

func (t *target) Accept() {
	if t.serving {
		return
	}
	t.serving = true
	if err := t.a.Proxy.Start(); err != nil {
		t.a.log.Error("upgrade: accepting on the inherited listeners", "err", err)
	}
}

func (t *target) Done() {
	a := t.a
	if a.up.dialed {
		return // from another container: systemd's main process is not in question
	}
	// Type=notify with NotifyAccess=all: this process becomes the main PID
	// before the old one exits, so systemd does not take that exit for the
	// service's (see deploy/systemd/wsplice.service).
	if _, err := sdnotify.Notify("MAINPID=" + strconv.Itoa(os.Getpid()) + "\n" + sdnotify.StateReady); err != nil {
		a.log.Warn("sd_notify MAINPID failed", "err", err)
	}
}

// Upgrade replaces this agent with a new process of binary (empty: the
// executable this agent was started from, read again from disk, with the
// same arguments), handing it the listeners and every established
// connection (package upgrade). It returns once the new process serves;
// Run then releases the admin socket and metrics address to it and
// returns nil. On error the agent keeps serving everything it had.
//
// Connections that cannot move (TLS-terminated) stay with this agent,
// which serves them until they close or drain_timeout; with strict they
// refuse the upgrade instead.
func (a *Agent) Upgrade(ctx context.Context, binary string, strict bool) (upgrade.Result, error) {
	path, err := upgradeBinary(binary)
	if err != nil {
		return upgrade.Result{}, err
	}
	return a.handOff(ctx, strict, false, func(ctx context.Context, src *source) (*upgrade.Session, error) {
		a.log.Info("upgrade: starting the new agent", "binary", path, "connections", a.Proxy.Active())
		return upgrade.Hand(ctx, upgrade.Spec{
			Path: path, Args: os.Args[1:], Env: os.Environ(),
			Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr,
		}, src, a.up.opts)
	})
}

// handOff runs one hand-off to a new agent (run: Hand for a process this
// agent starts, HandConn for one that connected to the take-over socket).
// On error this agent keeps serving everything it had.
func (a *Agent) handOff(ctx context.Context, strict, remote bool, run func(context.Context, *source) (*upgrade.Session, error)) (upgrade.Result, error) {
	if !a.up.mu.TryLock() {
		return upgrade.Result{}, errors.New("an upgrade is already in progress")
	}
	defer a.up.mu.Unlock()
	select {
	case <-a.up.committed:
		return upgrade.Result{}, errors.New("this agent has already handed over to a new process")
	default:
	}
	stay, err := a.Proxy.BeginHandoff(strict)
	if err != nil {
		return upgrade.Result{}, err
	}
	if stay != "" {
		a.log.Warn("upgrade: connections that cannot move stay with this agent until they close or drain_timeout", "connections", stay)
	}
	// The new agent listens on the take-over socket once it serves.
	a.stopTakeover()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(a.up.stop, cancel)()
	src := &source{a: a}
	defer src.closeObjects()
	s, err := run(ctx, src)
	if err != nil {
		if !src.resumed {
			_ = a.Proxy.ResumeHandoff(nil, nil) // failed before anything moved
		}
		if src.exported != nil {
			// The new process is gone (Hand waits for it; a connected one
			// gave up or was told to): the activity ring is this plane's
			// alone again.
			a.Sockmap.Unexport()
		}
		a.startTakeover()
		a.log.Error("upgrade failed; this agent keeps serving", "err", err)
		return upgrade.Result{}, err
	}
	a.up.session = s
	a.up.remote = remote
	close(a.up.committed)
	r := s.Result
	a.log.Info("upgrade: the new agent serves", "pid", r.PID, "listeners", r.Listeners, "connections", r.Conns,
		"rejected", r.Rejected, "batches", r.Batches, "max_batch", r.MaxBatch.Round(time.Microsecond),
		"detaching", r.Detaching.Round(time.Microsecond), "adopting", r.Adopting.Round(time.Microsecond),
		"accept_pause", r.Pause.Round(time.Microsecond), "took", r.Took.Round(time.Microsecond))
	return r, nil
}

// startTakeover listens on admin.takeover_socket, if configured, for a
// new agent started with --take-over (the next pod of a DaemonSet
// update), and hands everything to the first that connects.
func (a *Agent) startTakeover() {
	path := a.cfg.Admin.TakeoverSocket
	if path == "" {
		return
	}
	a.up.tsMu.Lock()
	defer a.up.tsMu.Unlock()
	if a.up.ts != nil {
		return
	}
	ts, err := upgrade.ListenTakeover(path)
	if err != nil {
		a.log.Error("take-over socket not opened: a new agent cannot take over from this one", "err", err)
		return
	}
	a.up.ts = ts
	go func() {
		for {
			ch, err := ts.Accept()
			if err != nil {
				return // closed
			}
			a.log.Info("upgrade: a new agent asks to take over", "socket", path, "pid", ch.PeerPID())
			if _, err := a.handOff(a.up.stop, false, true, func(ctx context.Context, src *source) (*upgrade.Session, error) {
				return upgrade.HandConn(ctx, ch, src, a.up.opts)
			}); err != nil {
				ch.Close() // if the hand-off never started
				a.log.Error("upgrade: take-over refused or failed", "err", err)
			}
		}
	}()
}

// stopTakeover stops listening on the take-over socket (the file stays,
// for the next agent to bind again).
func (a *Agent) stopTakeover() {
	a.up.tsMu.Lock()
	defer a.up.tsMu.Unlock()
	if a.up.ts != nil {
		a.up.ts.Close()
		a.up.ts = nil
	}
}

// upgradeOnSignal runs an upgrade for SIGUSR2 in the background.
func (a *Agent) upgradeOnSignal() {
	go func() {
		if _, err := a.Upgrade(a.up.stop, "", false); err != nil {
			a.log.Error("SIGUSR2: upgrade not done", "err", err)
		}
	}()
}

// settleUpgrade cancels an upgrade in progress when the agent is told to
// stop, waits for it, and reports whether one committed (then Run must
// exit through finishUpgrade, not drain).
func (a *Agent) settleUpgrade() bool {
	a.up.cancel()
	a.up.mu.Lock()
	defer a.up.mu.Unlock()
	select {
	case <-a.up.committed:
		return true
	default:
		return false
	}
}

// finishUpgrade is the old agent's exit after a committed upgrade: the
// admin socket and metrics address go to the new agent, connections that
// handshakes established after the pause are served until they close (at
// most drain_timeout), then everything stops. No STOPPING=1: the unit is
// not stopping, its main process changed.
//
// After a take-over by another container (remote), the agent first waits
// for stop (SIGTERM: Kubernetes deletes the old pod once the new one is
// ready), serving what stayed meanwhile: exiting at once would have the
// kubelet restart its container.
func (a *Agent) finishUpgrade(stop context.Context) error {
	s := a.up.session
	a.stopEndpoints()
	if err := s.Released(); err != nil {
		a.log.Warn("upgrade: telling the new agent the endpoints are free", "err", err)
	}
	if a.up.remote {
		a.log.Info("upgrade: handed over to another container; serving what stayed until told to stop", "connections", a.Proxy.Active())
		<-stop.Done()
	}
	ctx, cancel := context.WithTimeout(context.Background(), a.cfg.DrainTimeout.D())
	defer cancel()
	// A signal after the one that stopped the agent (or, when none did,
	// after the first) closes everything at once, as in Run's drain.
	go func() {
		select {
		case <-stop.Done():
		case <-ctx.Done():
			return
		}
		again := make(chan os.Signal, 1)
		signal.Notify(again, os.Interrupt, syscall.SIGTERM)
		defer signal.Stop(again)
		select {
		case <-again:
			a.log.Warn("second signal: closing every connection now")
			cancel()
		case <-ctx.Done():
		}
	}()
	if n := a.Proxy.Active(); n > 0 {
		a.log.Info("upgrade: serving the connections that stayed (TLS-terminated, rejected by the new agent or established during the hand-off) until they close or drain_timeout", "connections", n)
	}
	a.Proxy.Shutdown(ctx, min(a.cfg.DrainTimeout.D()/10, 5*time.Second))
	a.Health.Stop()
	a.stopPlanes()
	a.access.close()
	a.log.Info("stopped: handed over", "pid", s.Result.PID)
	return nil
}

// source is the old agent's side of package upgrade.
type source struct {
	a        *Agent
	ls       []proxy.ListenerFile
	batch    map[*os.File]*proxy.Handed // by client socket, the batch in flight
	resumed  bool
	exported *dataplane.SockmapExport // the sockmap objects sent, if any
}

func (s *source) Listeners() ([]upgrade.Listener, error) {
	ls, err := s.a.Proxy.ListenerFiles()
	if err != nil {
		return nil, err
	}
	s.ls = ls
	out := make([]upgrade.Listener, len(ls))
	for i, l := range ls {
		out[i] = upgrade.Listener{Name: l.Name, Address: l.Address, File: l.File}
	}
	return out, nil
}

func (s *source) Pause(ctx context.Context) (json.RawMessage, error) {
	return json.Marshal(handoffMeta{NextID: s.a.Proxy.PauseAccepting(ctx)})
}

// handoffMeta is what the old agent tells the new one once it has paused.
type handoffMeta struct {
	// NextID is above every connection id the old agent used.
	NextID uint64 `json:"next_id"`
}

func (s *source) Detach(n int) ([]upgrade.Conn, error) {
	hs, err := s.a.Proxy.Detach(n)
	s.batch = make(map[*os.File]*proxy.Handed, len(hs))
	out := make([]upgrade.Conn, len(hs))
	for i, h := range hs {
		s.batch[h.Client] = h
		out[i] = upgrade.Conn{Record: h.Record, Client: h.Client, Backend: h.Backend}
	}
	return out, err
}

func (s *source) handed(cs []upgrade.Conn) []*proxy.Handed {
	out := make([]*proxy.Handed, 0, len(cs))
	for _, c := range cs {
		if h := s.batch[c.Client]; h != nil {
			out = append(out, h)
		}
	}
	return out
}

func (s *source) Handed(adopted, rejected []upgrade.Conn) error {
	err := s.a.Proxy.Handed(s.handed(adopted), s.handed(rejected))
	s.batch = nil
	return err
}

// Objects exports the sockmap plane's maps and attachment: the new
// agent builds its plane on them, so kernel-path connections move without
// their sockets leaving the maps.
func (s *source) Objects() (upgrade.Objects, error) {
	if s.a.Sockmap == nil {
		return upgrade.Objects{}, nil
	}
	x, err := s.a.Sockmap.Export()
	if err != nil {
		return upgrade.Objects{}, err
	}
	s.exported = x
	return upgrade.Objects{Meta: x.Meta(), Files: x.Files}, nil
}

func (s *source) closeObjects() {
	if s.exported != nil {
		s.exported.Close()
	}
}

func (s *source) Resume(conns []upgrade.Conn) error {
	s.resumed = true
	return s.a.Proxy.ResumeHandoff(s.ls, s.handed(conns))
}

func (s *source) Commit() { s.a.Proxy.CommitListeners(s.ls) }

// upgradeBinary resolves and checks the binary an upgrade runs. It runs
// with the agent's privileges, so it must be a regular executable file
// that only root or the agent's user can change.
func upgradeBinary(binary string) (string, error) {
	path := binary
	if path == "" {
		// On Linux this reads /proc/self/exe, minus " (deleted)": the path
		// the agent was started from, where the new binary was installed.
		exe, err := os.Executable()
		if err != nil {
			return "", fmt.Errorf("upgrade: finding the agent's executable: %w (name one with --binary)", err)
		}
		path = exe
	}
	if !filepath.IsAbs(path) {
		return "", fmt.Errorf("upgrade: binary %q: must be an absolute path", path)
	}
	st, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("upgrade: binary: %w", err)
	}
	mode := st.Mode()
	switch {
	case !mode.IsRegular():
		return "", fmt.Errorf("upgrade: binary %s is not a regular file", path)
	case mode.Perm()&0o111 == 0:
		return "", fmt.Errorf("upgrade: binary %s is not executable", path)
	case mode.Perm()&0o022 != 0:
		return "", fmt.Errorf("upgrade: binary %s is writable by group or others (mode %v): anyone who can change it would run as the agent", path, mode.Perm())
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		if uid := int(sys.Uid); uid != 0 && uid != os.Geteuid() {
			return "", fmt.Errorf("upgrade: binary %s is owned by uid %d, neither root nor the agent's user", path, uid)
		}
	}
	return path, nil
}

// Upgrade is the admin API's upgrade verb.
func (h adminHandler) Upgrade(ctx context.Context, req admin.UpgradeRequest) (admin.UpgradeResult, error) {
	r, err := h.a.Upgrade(ctx, req.Binary, req.Strict)
	if err != nil {
		if errors.Is(err, proxy.ErrCannotHandOff) || errors.Is(err, fs.ErrNotExist) {
			return admin.UpgradeResult{}, admin.Invalidf("%v", err)
		}
		return admin.UpgradeResult{}, err
	}
	return admin.UpgradeResult{
		Stayed: h.a.Proxy.Active(),
		OldPID: os.Getpid(), NewPID: r.PID, Listeners: r.Listeners, Connections: r.Conns, Rejected: r.Rejected,
		Batches: r.Batches, MaxBatch: r.MaxBatch.Seconds(), AcceptPause: r.Pause.Seconds(), Seconds: r.Took.Seconds(),
	}, nil
}
