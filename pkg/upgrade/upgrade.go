// Package upgrade is the zero-downtime binary upgrade: the running agent
// starts the new binary and hands it its listening sockets and every
// established connection (both sockets, with SCM_RIGHTS, and the state
// that goes with them) over a Unix socketpair, then exits.
//
// The protocol never leaves a connection without an owner:
//
//	old                                     new (started with EnvFD set)
//	 hello: version, listeners (+fds)  ──▶
//	                                   ◀──  ready: started, holds the listeners, does not accept
//	 stop accepting (sockets stay open), let handshakes in progress finish,
//	 detach every connection from its data plane (open, untouched)
//	 conns × N: ≤126 connections (+2 fds each) ──▶
//	 end: count                         ──▶
//	                                   ◀──  prepared: all received and checked
//	 commit                             ──▶
//	                                        adopt, accept, sd_notify MAINPID+READY
//	                                   ◀──  committed: pid, adopted
//	 close its copies, release the admin socket and metrics address
//	 released                           ──▶  start the admin socket and metrics
//	 exit
//
// Until commit the old agent keeps its own descriptors of everything it
// sent. If the new process fails, exits, says "error" or does not answer
// in time, the old one aborts, stops the child (SIGKILL after a grace
// period), re-attaches its connections to its data planes and accepts
// again: nothing was lost, because the new process never moved a byte
// before commit. Connections that arrive meanwhile wait in the listen
// backlog.
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

// Source is the running (old) agent's side. Files it returns stay its own:
// Hand only sends them, and Resume or Commit closes them.
type Source interface {
	// Listeners returns duplicates of the listening sockets; the agent
	// keeps accepting on its own.
	Listeners() ([]Listener, error)
	// Pause stops accepting without closing the listening sockets, then
	// waits, at most until ctx ends, for handshakes in progress.
	Pause(ctx context.Context) error
	// Detach takes every established connection off its data plane,
	// open and untouched.
	Detach() ([]Conn, error)
	// Resume undoes whatever of Listeners, Pause and Detach happened
	// (conns may be nil) and closes the files they returned: the upgrade
	// failed and the agent serves everything it had.
	Resume(conns []Conn) error
	// Commit lets go of what was handed over: the new process owns it.
	Commit(conns []Conn)
}

// Target is the new agent's side.
type Target interface {
	// Prepare starts the new agent on the inherited listeners (it owns
	// their files from now on) without accepting on them.
	Prepare(listeners []Listener) error
	// Check looks at the connections received before commit; an error
	// aborts the upgrade while the old agent can still take them back.
	Check(conns []Conn) error
	// Commit adopts the connections (it owns their files from now on),
	// starts accepting and tells systemd this process is the main one. It
	// cannot fail as a whole: the old agent lets go once it returns, so a
	// connection that cannot be adopted is the target's to report.
	Commit(conns []Conn) (adopted int)
}

// Options bound each step. Zero values take the defaults.
type Options struct {
	// Ready: from starting the new binary to its "ready" (it loads its
	// configuration and data planes meanwhile). Default 60s.
	Ready time.Duration
	// Pause: for handshakes in progress to finish after accepting stops.
	// Connections they establish afterwards stay with the old agent,
	// which serves them until they close or its drain_timeout. Default 5s.
	Pause time.Duration
	// Step: for each later answer (prepared, committed, released) and
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
	Conns     int           // connections handed over
	Adopted   int           // connections the new agent adopted
	Paused    time.Duration // from the end of accepting to committed: how long handed-over connections did not move (splice)
	Took      time.Duration // from start to committed
	// The parts of Paused: detaching, sending, the new agent's check,
	// and its adoption (commit to committed).
	Detach, Send, Check, Adopt time.Duration
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
// new process is gone; the error says at which step and why. ctx cancels
// the upgrade until commit, not after.
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
	h := &hand{ctx: ctx, ch: ch, cmd: cmd, src: src, opts: opts, exited: make(chan struct{})}
	// Reaps the child if it dies during the hand-off. After a commit the
	// child outlives this process and this goroutine with it.
	go func() {
		h.waitErr = cmd.Wait()
		close(h.exited)
	}()
	h.stopCancel = context.AfterFunc(ctx, func() { ch.c.SetReadDeadline(time.Unix(1, 0)) })
	defer h.stopCancel()
	res, err := h.run()
	res.Took = time.Since(t0)
	if err != nil {
		return nil, err
	}
	return &Session{ch: ch, Result: res}, nil
}

// hand is one upgrade in progress on the old agent's side.
type hand struct {
	ctx     context.Context
	ch      *Channel
	cmd     *exec.Cmd
	src     Source
	opts    Options
	exited  chan struct{}
	waitErr error
	// stopCancel ends ctx's hold on the hand-off (at commit).
	stopCancel func() bool
}

func (h *hand) run() (Result, error) {
	var res Result
	res.PID = h.cmd.Process.Pid
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
	res.Listeners = len(ls)
	if err := h.ch.send(hello, files); err != nil {
		return res, h.abort("sending the listeners", err, nil)
	}
	if _, err := h.expect(msgReady, h.opts.Ready); err != nil {
		return res, h.abort("waiting for the new agent to start", err, nil)
	}

	pctx, cancel := context.WithTimeout(h.ctx, h.opts.Pause)
	err = h.src.Pause(pctx)
	cancel()
	paused := time.Now()
	if err != nil {
		return res, h.abort("pausing the listeners", err, nil)
	}
	t := time.Now()
	conns, err := h.src.Detach()
	res.Conns = len(conns)
	res.Detach, t = time.Since(t), time.Now()
	if err != nil {
		return res, h.abort("detaching connections", err, conns)
	}
	for i := 0; i < len(conns); i += ConnsPerBatch {
		batch := conns[i:min(i+ConnsPerBatch, len(conns))]
		m := &message{Type: msgConns, Conns: make([]json.RawMessage, len(batch))}
		fs := make([]*os.File, 0, 2*len(batch))
		for j, c := range batch {
			m.Conns[j] = c.Record
			fs = append(fs, c.Client, c.Backend)
		}
		if err := h.ch.send(m, fs); err != nil {
			return res, h.abort("sending connections", err, conns)
		}
	}
	if err := h.ch.send(&message{Type: msgEnd, Count: len(conns)}, nil); err != nil {
		return res, h.abort("sending connections", err, conns)
	}
	res.Send, t = time.Since(t), time.Now()
	m, err := h.expect(msgPrepared, h.opts.Step)
	res.Check, t = time.Since(t), time.Now()
	if err == nil && m.Count != len(conns) {
		err = fmt.Errorf("the new agent received %d connections, %d were sent", m.Count, len(conns))
	}
	if err == nil {
		err = h.ctx.Err()
	}
	if err != nil {
		return res, h.abort("handing connections over", err, conns)
	}

	// Commit: from here the new agent may move bytes, so this one must not
	// until it knows the other is gone. ctx no longer cancels.
	h.stopCancel()
	h.ctx = context.WithoutCancel(h.ctx)
	if err := h.ch.send(&message{Type: msgCommit}, nil); err != nil {
		return res, h.abort("committing", err, conns)
	}
	m, err = h.expect(msgCommitted, h.opts.Step)
	if err != nil {
		h.kill()
		rerr := h.src.Resume(conns)
		return res, errors.Join(fmt.Errorf("upgrade failed after commit: the new agent (pid %d) did not confirm: %w; it was stopped and this agent resumed its listeners and %d connections (bytes the new agent had read and not yet written, if any, are lost)", res.PID, err, len(conns)), rerr)
	}
	res.Adopted = m.Count
	res.Adopt = time.Since(t)
	res.Paused = time.Since(paused)
	h.src.Commit(conns)
	return res, nil
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
		return nil, h.exitError()
	case err != nil:
		return nil, err
	case m.Type == msgError:
		return nil, fmt.Errorf("the new agent failed: %s", m.Error)
	case m.Type != want:
		return nil, fmt.Errorf("protocol: got %q, want %q", m.Type, want)
	}
	return m, nil
}

// exitError describes the child's early exit.
func (h *hand) exitError() error {
	select {
	case <-h.exited:
		if h.waitErr != nil {
			return fmt.Errorf("the new agent exited: %w", h.waitErr)
		}
		return errors.New("the new agent exited with status 0")
	case <-time.After(h.opts.Grace):
		return errClosed
	}
}

// abort ends a failed upgrade before commit: the child is told, given
// Grace to exit, then killed; src resumes with conns.
func (h *hand) abort(step string, cause error, conns []Conn) error {
	_ = h.ch.c.SetWriteDeadline(time.Now().Add(time.Second))
	_ = h.ch.send(&message{Type: msgAbort, Error: cause.Error()}, nil)
	h.ch.Close()
	select {
	case <-h.exited:
	case <-time.After(h.opts.Grace):
		h.kill()
	}
	err := fmt.Errorf("upgrade failed %s: %w", step, cause)
	if rerr := h.src.Resume(conns); rerr != nil {
		return errors.Join(err, fmt.Errorf("resuming: %w", rerr))
	}
	return err
}

// kill stops the child for good and waits until it is gone, so that it
// can no longer touch a socket this agent takes back.
func (h *hand) kill() {
	_ = h.cmd.Process.Kill()
	<-h.exited
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
// Inherited: it receives the listeners and prepares t, receives and checks
// the connections, and on commit lets t adopt them. On error before commit
// it tells the old agent, which keeps serving, and the caller should exit.
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
	m, files, err := ch.recv(time.Now().Add(opts.Step))
	if err == nil && m.Type != msgHello {
		err = fmt.Errorf("protocol: got %q, want %q", m.Type, msgHello)
	}
	if err == nil && (m.Version < 1 || m.Version > ProtocolVersion) {
		err = fmt.Errorf("the running agent speaks hand-off version %d, this binary %d or older: it cannot take over from a newer agent", m.Version, ProtocolVersion)
	}
	if err == nil && len(files) != len(m.Listeners) {
		err = fmt.Errorf("protocol: %d listeners with %d descriptors", len(m.Listeners), len(files))
	}
	if err != nil {
		closeFiles(files)
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

	var conns []Conn
	closeConns := func() {
		for _, c := range conns {
			c.Client.Close()
			c.Backend.Close()
		}
	}
	for {
		m, files, err := ch.recv(time.Now().Add(opts.Step))
		if err == nil && m.Type == msgConns && len(files) != 2*len(m.Conns) {
			err = fmt.Errorf("protocol: %d connections with %d descriptors", len(m.Conns), len(files))
		}
		if err != nil || m.Type != msgConns {
			closeFiles(files)
		}
		if err == nil && m.Type == msgAbort {
			err = fmt.Errorf("the running agent aborted the upgrade: %s", m.Error)
		}
		if err == nil && m.Type != msgConns && m.Type != msgEnd {
			err = fmt.Errorf("protocol: got %q, want %q or %q", m.Type, msgConns, msgEnd)
		}
		if err == nil && m.Type == msgEnd && m.Count != len(conns) {
			err = fmt.Errorf("the running agent sent %d connections and announced %d", len(conns), m.Count)
		}
		if err != nil {
			closeConns()
			return fail("receiving connections", err)
		}
		if m.Type == msgEnd {
			break
		}
		for i, rec := range m.Conns {
			conns = append(conns, Conn{Record: rec, Client: files[2*i], Backend: files[2*i+1]})
		}
	}
	if err := t.Check(conns); err != nil {
		closeConns()
		return fail("checking connections", err)
	}
	if err := ch.send(&message{Type: msgPrepared, Count: len(conns)}, nil); err != nil {
		closeConns()
		return nil, fmt.Errorf("upgrade: %w", err)
	}
	m, files, err = ch.recv(time.Now().Add(opts.Step))
	closeFiles(files)
	if err == nil && m.Type == msgAbort {
		err = fmt.Errorf("the running agent aborted the upgrade: %s", m.Error)
	}
	if err == nil && m.Type != msgCommit {
		err = fmt.Errorf("protocol: got %q, want %q", m.Type, msgCommit)
	}
	if err != nil {
		closeConns()
		return fail("waiting for the commit", err)
	}
	n := t.Commit(conns)
	s := &Session{ch: ch, Result: Result{PID: os.Getpid(), Listeners: len(ls), Conns: len(conns), Adopted: n}}
	// The old agent lets go on this message. If it cannot be sent, either
	// the old agent is gone (this one must serve on) or it will time out,
	// kill this process and resume: serving on is right both ways.
	if err := ch.send(&message{Type: msgCommitted, PID: os.Getpid(), Count: n}, nil); err != nil {
		return s, fmt.Errorf("%w: %w", ErrUnconfirmed, err)
	}
	return s, nil
}

// ErrUnconfirmed is returned by Take, with a Session, when the commit was
// carried out but could not be confirmed to the old agent: keep serving.
var ErrUnconfirmed = errors.New("upgrade committed but not confirmed to the old agent")
