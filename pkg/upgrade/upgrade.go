// Package upgrade is the zero-downtime binary upgrade: the running agent
// starts the new binary and hands it its listening sockets and every
// established connection (both sockets, with SCM_RIGHTS, and the state
// that goes with them) over a Unix socketpair, then exits.
//
// The protocol never leaves a connection without an owner:
//
//	old                                       new (started with EnvFD set)
//	 hello: version, listeners (+fds)    ──▶
//	                                     ◀──  ready: started, holds the listeners, not accepting
//	 stop accepting (sockets stay open; new clients wait in the backlog),
//	 let handshakes in progress finish; then, batch after batch:
//	 detach ≤126 connections (open, untouched)
//	 conns: their records (+2 fds each)  ──▶
//	                                     ◀──  adopted: serving them (but the rejected ones)
//	                                          (after the first: accepting)
//	 close its copies; next batch …
//	 end: count                          ──▶
//	                                          sd_notify MAINPID + READY
//	                                     ◀──  committed: pid
//	 close its listener copies, release the admin socket and metrics address
//	 released                            ──▶  open the admin socket and metrics
//	 exit
//
// A connection stops moving only while its own batch is in flight (one
// detach, one message, one adoption), and new clients wait in the backlog
// only until the first batch is adopted, not for the whole hand-off. The
// old agent keeps its descriptors of a batch until the new one says it
// adopted it, and takes back any it rejects. The first batch (or end)
// carries the Source's Meta from Pause to the Target's Paused: the agent
// uses it so that connections the new agent accepts get ids no handed-over
// one has.
//
// Failures: until the first batch is adopted (the commit point) nothing
// has moved — if the new process fails to start, exits, says "error" or
// does not answer in time, the old one stops it (SIGKILL after a grace
// period), re-attaches the batch in flight, accepts again and serves on as
// if nothing happened. That covers a binary that does not start, a
// configuration it rejects, and an adoption that fails (its first batch
// fails the same way). Should the new process die after the commit point,
// the connections it had adopted die with it (it may have moved bytes the
// old agent has not seen) and the old agent serves everything else on.
//
// Only connections on data planes that implement dataplane.Handoff can
// move; the agent refuses to start an upgrade otherwise (see the agent).
package upgrade

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// EnvFD names the environment variable that tells a new agent process the
// number of its inherited hand-off socket.
const EnvFD = "WSPLICE_UPGRADE_FD"

// ProtocolVersion is the version of the messages this package speaks. A
// new process accepts a hello of its own version or older.
const ProtocolVersion = 1

// Listener is one listening socket in a hand-off. Address is the
// configured address (the key a new configuration matches it by), not
// necessarily the bound one (":0").
type Listener struct {
	Name    string
	Address string
	File    *os.File
}

// Conn is one established connection in a hand-off: the proxy's record of
// it (opaque here) and its two sockets.
type Conn struct {
	Record  json.RawMessage
	Client  *os.File
	Backend *os.File
}

// Objects are kernel objects a new agent needs before it builds its data
// planes (the sockmap plane's maps): Meta is the data plane's own
// description, Files the descriptors, in its order.
type Objects struct {
	Meta  json.RawMessage
	Files []*os.File
}

// ObjectSource is a Source with kernel objects to hand over. Hand calls
// Objects once, before sending the listeners; the files stay the
// Source's. On a failed upgrade the Source takes them back in Resume.
type ObjectSource interface {
	Objects() (Objects, error)
}

// Source is the running (old) agent's side. Files it returns stay its own:
// Hand only sends them; Handed, Resume and Commit close them.
type Source interface {
	// Listeners returns duplicates of the listening sockets; the agent
	// keeps accepting on its own.
	Listeners() ([]Listener, error)
	// Pause stops accepting without closing the listening sockets, then
	// waits, at most until ctx ends, for handshakes in progress. meta goes
	// to the Target's Paused.
	Pause(ctx context.Context) (meta json.RawMessage, err error)
	// Detach takes up to n more established connections off their data
	// planes, open and untouched; none left to move: an empty result.
	Detach(n int) ([]Conn, error)
	// Handed: the new agent serves adopted now; rejected (a subset of
	// the same batch) are this agent's to serve on.
	Handed(adopted, rejected []Conn) error
	// Resume ends a failed upgrade: conns (detached, not handed) go back
	// on their data planes and the listeners accept again.
	Resume(conns []Conn) error
	// Commit: the new agent accepts on the listeners; let go of them.
	Commit()
}

// Target is the new agent's side.
type Target interface {
	// Prepare starts the new agent on the inherited listeners (it owns
	// their files from now on) without accepting on them.
	Prepare(listeners []Listener) error
	// Paused: the old agent no longer accepts; meta is its Source's.
	Paused(meta json.RawMessage) error
	// Adopt takes over a batch of connections and returns the indexes of
	// those it did not take, untouched (the old agent serves them on). It
	// owns every file.
	Adopt(conns []Conn) (rejected []int)
	// Accept starts accepting on the listeners: after the first batch is
	// adopted (or at the end when there was none).
	Accept()
	// Done: every connection has been handed over; tell systemd this
	// process is the main one.
	Done()
}

// Options bound each step. Zero values take the defaults.
type Options struct {
	// Ready: from starting the new binary to its "ready" (it loads its
	// configuration and data planes meanwhile). Default 60s.
	Ready time.Duration
	// Pause: for handshakes in progress to finish after accepting stops.
	// A connection established later still moves in a later batch if its
	// plane can move it; else the old agent serves it until it closes or
	// its drain_timeout. Default 5s.
	Pause time.Duration
	// Step: for each later answer (adopted, committed, released) and
	// each message. Default 30s.
	Step time.Duration
	// Grace: for a child told to abort to exit before it is killed.
	// Default 2s.
	Grace time.Duration
}

func (o Options) withDefaults() Options {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.Ready, 60*time.Second)
	def(&o.Pause, 5*time.Second)
	def(&o.Step, 30*time.Second)
	def(&o.Grace, 2*time.Second)
	return o
}

// Spec is the new binary to run.
type Spec struct {
	Path string   // absolute path of the binary
	Args []string // arguments after argv[0]
	Env  []string // environment; EnvFD is added, WATCHDOG_PID removed
	// Stdin, Stdout and Stderr are passed as they are (nil: /dev/null).
	Stdin, Stdout, Stderr *os.File
}

// Result describes a committed upgrade.
type Result struct {
	PID       int           // the new agent's process id
	Listeners int           // listening sockets handed over
	Conns     int           // connections handed over (adopted)
	Rejected  int           // connections the new agent did not take, served on by the old
	Batches   int           // messages the connections travelled in
	Pause     time.Duration // from the end of accepting here to the new agent accepting
	// MaxBatch is the longest a batch took from detach to adoption: the
	// longest any connection did not move (splice).
	MaxBatch time.Duration
	// Detaching and Adopting add up the batches' time in the old agent's
	// Detach and from sending a batch to its answer.
	Detaching, Adopting time.Duration
	Took                time.Duration // from start to committed
}

// Session is a committed hand-off's socket, kept open until the endpoints
// have moved too.
type Session struct {
	ch     *Channel
	Result Result
}

// Released tells the new agent that the admin socket and metrics address
// are free (the old agent closed them), and closes the session.
func (s *Session) Released() error {
	defer s.ch.Close()
	return s.ch.send(&message{Type: msgReleased}, nil)
}

// WaitReleased waits, at most timeout, for the old agent's Released (or
// its exit), and closes the session.
func (s *Session) WaitReleased(timeout time.Duration) error {
	defer s.ch.Close()
	m, files, err := s.ch.recv(time.Now().Add(timeout))
	closeFiles(files)
	switch {
	case isClosed(err):
		return nil // the old agent exited: everything it held is free
	case err != nil:
		return err
	case m.Type != msgReleased:
		return fmt.Errorf("hand-off: got %q, want %q", m.Type, msgReleased)
	}
	return nil
}

// Hand runs the upgrade from the old agent's side: it starts spec, hands
// src's listeners and connections over, and returns once the new process
// has committed. On error the upgrade was rolled back (src.Resume) and the
// new process is gone; the error says at which step and why, and how many
// connections, if any, were lost with a new process that died part-way.
// ctx cancels the upgrade until the commit point, not after.
func Hand(ctx context.Context, spec Spec, src Source, opts Options) (*Session, error) {
	opts = opts.withDefaults()
	t0 := time.Now()
	ch, childEnd, err := socketpair()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(spec.Path, spec.Args...)
	cmd.Env = append(childEnv(spec.Env), fmt.Sprintf("%s=%d", EnvFD, 3))
	cmd.ExtraFiles = []*os.File{childEnd}
	if spec.Stdin != nil {
		cmd.Stdin = spec.Stdin
	}
	if spec.Stdout != nil {
		cmd.Stdout = spec.Stdout
	}
	if spec.Stderr != nil {
		cmd.Stderr = spec.Stderr
	}
	err = cmd.Start()
	childEnd.Close()
	if err != nil {
		ch.Close()
		return nil, fmt.Errorf("upgrade: starting %s: %w", spec.Path, err)
	}
	p := &peer{pid: cmd.Process.Pid, exited: make(chan struct{})}
	p.kill = func() {
		_ = cmd.Process.Kill()
		<-p.exited
	}
	// Reaps the child if it dies during the hand-off. After a commit the
	// child outlives this process and this goroutine with it.
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	return handOver(ctx, t0, ch, p, src, opts)
}

// HandConn runs the upgrade, like Hand, to a new agent that connected to
// this one's take-over socket (Listener) instead of being started by it:
// another container on the same host, started with --take-over. This
// agent cannot wait for that process nor stop it, so where Hand would
// kill the child before taking back a batch in flight whose answer never
// came, HandConn ends those connections instead (shutdown both ways): the
// other process may have adopted them, and two agents must never move
// bytes of one connection. ch is closed in every case.
func HandConn(ctx context.Context, ch *Channel, src Source, opts Options) (*Session, error) {
	opts = opts.withDefaults()
	return handOver(ctx, time.Now(), ch, &peer{pid: ch.PeerPID()}, src, opts)
}

func handOver(ctx context.Context, t0 time.Time, ch *Channel, p *peer, src Source, opts Options) (*Session, error) {
	h := &hand{ctx: ctx, ch: ch, peer: p, src: src, opts: opts}
	h.stopCancel = context.AfterFunc(ctx, func() { ch.c.SetReadDeadline(time.Unix(1, 0)) })
	defer h.stopCancel()
	res, err := h.run()
	res.Took = time.Since(t0)
	if err != nil {
		return nil, err
	}
	return &Session{ch: ch, Result: res}, nil
}

// peer is the new agent's process: a child this agent started (Hand),
// which it can wait for and kill, or one that connected to its take-over
// socket (HandConn), which it can only tell to stop.
type peer struct {
	pid     int           // 0 if unknown (another PID namespace)
	exited  chan struct{} // closed once it exited; nil: cannot tell
	waitErr error
	kill    func() // stops it for good and waits; nil: cannot
}

// hand is one upgrade in progress on the old agent's side.
type hand struct {
	ctx  context.Context
	ch   *Channel
	peer *peer
	src  Source
	opts Options
	// stopCancel ends ctx's hold on the hand-off (at the commit point).
	stopCancel func() bool
	committed  bool // the new agent has adopted a batch: no way back for those
	handed     int
	// peerGone: the new agent said it gave up, or closed the socket: it
	// adopts nothing more.
	peerGone bool
}

func (h *hand) run() (Result, error) {
	var res Result
	res.PID = h.peer.pid
	ls, err := h.src.Listeners()
	if err != nil {
		return res, h.abort("collecting the listening sockets", err, nil)
	}
	hello := &message{Type: msgHello, Version: ProtocolVersion, PID: os.Getpid()}
	files := make([]*os.File, len(ls))
	for i, l := range ls {
		hello.Listeners = append(hello.Listeners, listenerInfo{Name: l.Name, Address: l.Address})
		files[i] = l.File
	}
	if osrc, ok := h.src.(ObjectSource); ok {
		objs, err := osrc.Objects()
		if err != nil {
			return res, h.abort("collecting the data planes' kernel objects", err, nil)
		}
		if len(objs.Files) > 0 || len(objs.Meta) > 0 {
			hello.Objects, hello.ObjectFiles = objs.Meta, len(objs.Files)
			files = append(files, objs.Files...)
		}
	}
	res.Listeners = len(ls)
	if err := h.ch.send(hello, files); err != nil {
		return res, h.abort("sending the listeners", h.sendErr(err), nil)
	}
	if _, err := h.expect(msgReady, h.opts.Ready); err != nil {
		return res, h.abort("waiting for the new agent to start", err, nil)
	}

	pctx, cancel := context.WithTimeout(h.ctx, h.opts.Pause)
	meta, err := h.src.Pause(pctx)
	cancel()
	paused := time.Now()
	if err != nil {
		return res, h.abort("pausing the listeners", err, nil)
	}
	for {
		if err := h.ctx.Err(); err != nil && !h.committed {
			return res, h.abort("handing connections over", fmt.Errorf("cancelled: %w", context.Cause(h.ctx)), nil)
		}
		t := time.Now()
		conns, err := h.src.Detach(ConnsPerBatch)
		if err != nil {
			return res, h.abort("detaching connections", err, conns)
		}
		if len(conns) == 0 {
			break
		}
		td := time.Now()
		res.Detaching += td.Sub(t)
		m := &message{Type: msgConns, Conns: make([]json.RawMessage, len(conns)), Meta: meta}
		meta = nil // the first message carries it
		fs := make([]*os.File, 0, 2*len(conns))
		for j, c := range conns {
			m.Conns[j] = c.Record
			fs = append(fs, c.Client, c.Backend)
		}
		if err := h.ch.send(m, fs); err != nil {
			return res, h.abort("sending connections", h.sendErr(err), conns)
		}
		a, err := h.expect(msgAdopted, h.opts.Step)
		res.Adopting += time.Since(td)
		if err != nil {
			return res, h.abort("handing connections over", err, conns)
		}
		adopted, rejected, err := split(conns, a.Rejected)
		if err != nil {
			return res, h.abort("handing connections over", err, conns)
		}
		if !h.committed && len(adopted) > 0 {
			// The commit point: the new agent moves bytes now, and accepts.
			res.Pause = time.Since(paused)
			h.committed = true
			h.stopCancel()
			h.ctx = context.WithoutCancel(h.ctx)
		}
		h.handed += len(adopted)
		res.Batches++
		res.Conns += len(adopted)
		res.Rejected += len(rejected)
		res.MaxBatch = max(res.MaxBatch, time.Since(t))
		if err := h.src.Handed(adopted, rejected); err != nil {
			return res, h.abort("taking back connections the new agent rejected", err, nil)
		}
	}
	if err := h.ch.send(&message{Type: msgEnd, Count: h.handed, Meta: meta}, nil); err != nil {
		return res, h.abort("ending the hand-off", h.sendErr(err), nil)
	}
	h.stopCancel()
	h.ctx = context.WithoutCancel(h.ctx)
	if _, err := h.expect(msgCommitted, h.opts.Step); err != nil {
		return res, h.abort("waiting for the new agent to accept", err, nil)
	}
	if res.Pause == 0 {
		res.Pause = time.Since(paused)
	}
	h.src.Commit()
	return res, nil
}

// split divides a batch by the indexes the new agent rejected.
func split(conns []Conn, rejected []int) (adopted, back []Conn, err error) {
	no := make(map[int]bool, len(rejected))
	for _, i := range rejected {
		if i < 0 || i >= len(conns) || no[i] {
			return nil, nil, fmt.Errorf("protocol: rejected index %d of a batch of %d", i, len(conns))
		}
		no[i] = true
	}
	for i, c := range conns {
		if no[i] {
			back = append(back, c)
		} else {
			adopted = append(adopted, c)
		}
	}
	return adopted, back, nil
}

// expect waits for a message of type want; "error" from the child, its
// exit, the deadline or the context all fail.
func (h *hand) expect(want string, within time.Duration) (*message, error) {
	m, files, err := h.ch.recv(time.Now().Add(within))
	closeFiles(files)
	switch {
	case err != nil && h.ctx.Err() != nil:
		return nil, fmt.Errorf("cancelled: %w", context.Cause(h.ctx))
	case isClosed(err):
		h.peerGone = true
		return nil, h.exitError()
	case err != nil:
		return nil, err
	case m.Type == msgError:
		h.peerGone = true
		return nil, fmt.Errorf("the new agent failed: %s", m.Error)
	case m.Type != want:
		return nil, fmt.Errorf("protocol: got %q, want %q", m.Type, want)
	}
	return m, nil
}

// sendErr explains a failed send: most likely the child exited.
func (h *hand) sendErr(err error) error {
	if isClosed(err) {
		h.peerGone = true
		return h.exitError()
	}
	return err
}

// exitError describes the child's early exit.
func (h *hand) exitError() error {
	if h.peer.exited == nil {
		return errClosed
	}
	select {
	case <-h.peer.exited:
		if h.peer.waitErr != nil {
			return fmt.Errorf("the new agent exited: %w", h.peer.waitErr)
		}
		return errors.New("the new agent exited with status 0")
	case <-time.After(h.opts.Grace):
		return errClosed
	}
}

// abort ends a failed upgrade: the child is told, given Grace to exit (at
// once after the commit point: it must not move a byte of what is taken
// back), then killed; src resumes with conns, the batch in flight.
func (h *hand) abort(step string, cause error, conns []Conn) error {
	_ = h.ch.c.SetWriteDeadline(time.Now().Add(time.Second))
	_ = h.ch.send(&message{Type: msgAbort, Error: cause.Error()}, nil)
	h.ch.Close()
	err := fmt.Errorf("upgrade failed %s: %w", step, cause)
	if h.peer.kill == nil {
		// A process this agent did not start: it cannot be stopped, so a
		// batch in flight it may have adopted is ended, not taken back.
		if len(conns) > 0 && !h.peerGone {
			endConns(conns)
			if herr := h.src.Handed(conns, nil); herr != nil {
				err = errors.Join(err, herr)
			}
			err = fmt.Errorf("%w; the %d connections of the batch in flight were closed (the new agent may have adopted them)", err, len(conns))
			conns = nil
		}
		if h.committed {
			err = fmt.Errorf("%w; the new agent keeps the %d connections it had adopted and listens too, this agent serves everything else on", err, h.handed)
		}
	} else {
		if h.committed {
			h.peer.kill()
		} else {
			select {
			case <-h.peer.exited:
			case <-time.After(h.opts.Grace):
				h.peer.kill()
			}
		}
		if h.committed {
			err = fmt.Errorf("%w; the new agent (pid %d) was stopped: the %d connections it had adopted were lost with it, this agent serves everything else on (bytes the new agent had read and not written for the batch in flight, if any, are lost)", err, h.peer.pid, h.handed)
		}
	}
	if rerr := h.src.Resume(conns); rerr != nil {
		return errors.Join(err, fmt.Errorf("resuming: %w", rerr))
	}
	return err
}

// endConns shuts down both sockets of each connection, both ways: the
// connection ends for whichever process holds it (its peers see FIN).
func endConns(conns []Conn) {
	for _, c := range conns {
		for _, f := range []*os.File{c.Client, c.Backend} {
			if rc, err := f.SyscallConn(); err == nil {
				_ = rc.Control(func(fd uintptr) { _ = unix.Shutdown(int(fd), unix.SHUT_RDWR) })
			}
		}
	}
}

// childEnv is env without the hand-off variable and WATCHDOG_PID (the
// old process's; the watchdog belongs to whichever is the main PID).
func childEnv(env []string) []string {
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if strings.HasPrefix(kv, EnvFD+"=") || strings.HasPrefix(kv, "WATCHDOG_PID=") {
			continue
		}
		out = append(out, kv)
	}
	return out
}

// Take runs the upgrade from the new agent's side, on the channel from
// Inherited: it receives the listeners and prepares t, adopts the
// connections batch by batch, then lets t serve. An error before the
// first adoption has been reported to the old agent, which serves on: the
// caller should exit. After it, Take returns a Session whatever happens —
// this process serves what it adopted — with ErrUnconfirmed if the end
// of the hand-off went wrong.
func Take(ctx context.Context, ch *Channel, t Target, opts Options) (*Session, error) {
	opts = opts.withDefaults()
	stop := context.AfterFunc(ctx, func() { ch.c.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	fail := func(step string, err error) (*Session, error) {
		_ = ch.c.SetWriteDeadline(time.Now().Add(time.Second))
		_ = ch.send(&message{Type: msgError, Error: fmt.Sprintf("%s: %v", step, err)}, nil)
		ch.Close()
		return nil, fmt.Errorf("upgrade: %s: %w", step, err)
	}
	m, files, err := ch.readHello(opts.Step, false)
	if err != nil {
		return fail("receiving the listeners", err)
	}
	ls := make([]Listener, len(files))
	for i, li := range m.Listeners {
		ls[i] = Listener{Name: li.Name, Address: li.Address, File: files[i]}
	}
	if err := t.Prepare(ls); err != nil {
		return fail("starting", err)
	}
	if err := ch.send(&message{Type: msgReady, PID: os.Getpid()}, nil); err != nil {
		return nil, fmt.Errorf("upgrade: %w", err)
	}

	res := Result{PID: os.Getpid(), Listeners: len(ls)}
	s := &Session{ch: ch}
	// unconfirmed: after the first adoption this process serves on, so a
	// failure only ends the hand-off; the old agent stops this process if
	// it thinks the upgrade failed.
	accepting, paused := false, false
	unconfirmed := func(step string, err error) (*Session, error) {
		// If the old agent is gone nobody else serves; if it is not, it
		// stops this process.
		if !accepting {
			t.Accept()
		}
		t.Done()
		s.Result = res
		return s, fmt.Errorf("%w: %s: %w", ErrUnconfirmed, step, err)
	}
	for {
		m, files, err := ch.recv(time.Now().Add(opts.Step))
		if err == nil && m.Type == msgConns && len(files) != 2*len(m.Conns) {
			err = fmt.Errorf("protocol: %d connections with %d descriptors", len(m.Conns), len(files))
		}
		if err == nil && m.Type == msgAbort {
			err = fmt.Errorf("the running agent aborted the upgrade: %s", m.Error)
		}
		if err == nil && m.Type != msgConns && m.Type != msgEnd {
			err = fmt.Errorf("protocol: got %q, want %q or %q", m.Type, msgConns, msgEnd)
		}
		if err == nil && m.Type == msgEnd && m.Count != res.Conns {
			err = fmt.Errorf("the running agent counted %d connections handed over, this one %d", m.Count, res.Conns)
		}
		if err != nil {
			closeFiles(files)
			if res.Conns == 0 {
				return fail("receiving connections", err)
			}
			return unconfirmed("receiving connections", err)
		}
		if !paused {
			paused = true
			if err := t.Paused(m.Meta); err != nil {
				closeFiles(files)
				return fail("taking over", err)
			}
		}
		if m.Type == msgEnd {
			break
		}
		conns := make([]Conn, len(m.Conns))
		for i, rec := range m.Conns {
			conns[i] = Conn{Record: rec, Client: files[2*i], Backend: files[2*i+1]}
		}
		rejected := t.Adopt(conns)
		res.Batches++
		res.Conns += len(conns) - len(rejected)
		res.Rejected += len(rejected)
		if err := ch.send(&message{Type: msgAdopted, Count: len(conns) - len(rejected), Rejected: rejected}, nil); err != nil {
			return unconfirmed("confirming a batch", err)
		}
		if !accepting && res.Conns > 0 {
			accepting = true
			t.Accept()
		}
	}
	if !accepting {
		t.Accept()
	}
	t.Done()
	s.Result = res
	// The old agent lets go of the listeners on this message. If it cannot
	// be sent, either the old agent is gone (this one must serve on) or it
	// will time out, stop this process and resume.
	if err := ch.send(&message{Type: msgCommitted, PID: os.Getpid(), Count: res.Conns}, nil); err != nil {
		return s, fmt.Errorf("%w: %w", ErrUnconfirmed, err)
	}
	return s, nil
}

// ErrUnconfirmed is returned by Take, with a Session, when connections
// were adopted but the hand-off did not end cleanly: keep serving.
var ErrUnconfirmed = errors.New("upgrade: connections adopted, but the hand-off did not end cleanly")
