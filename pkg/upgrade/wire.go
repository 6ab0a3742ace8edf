package upgrade

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// MaxFDs is the most descriptors one message carries: the kernel's
// SCM_MAX_FD (include/net/scm.h), above which sendmsg fails with EINVAL.
const MaxFDs = 253

// ConnsPerBatch is how many connections (two descriptors each) one
// message carries.
const ConnsPerBatch = MaxFDs / 2

// frameSize bounds one datagram. A SOCK_SEQPACKET message must fit in the
// sender's socket buffer (net.core.wmem_default, 208 KiB by default), so
// larger messages — a batch whose connections carry bytes read and not
// yet written — are split into frames.
const frameSize = 60 << 10

// Frame header byte.
const frameMore = 1 // more frames of this message follow

// message is everything the two agents say to each other.
type message struct {
	Type    string `json:"type"`
	Version int    `json:"version,omitempty"`
	PID     int    `json:"pid,omitempty"`
	Error   string `json:"error,omitempty"`
	Count   int    `json:"count,omitempty"`
	// Listeners travel with hello, one descriptor each, in order.
	Listeners []listenerInfo `json:"listeners,omitempty"`
	// Conns travel in batches, two descriptors each (client, backend).
	Conns []json.RawMessage `json:"conns,omitempty"`
	// Rejected lists the batch's connections (by index) the new agent did
	// not take: the old one serves them on.
	Rejected []int `json:"rejected,omitempty"`
	// Meta is the Source's word to the Target after Pause (first batch, or end).
	Meta json.RawMessage `json:"meta,omitempty"`
	// Objects describe the descriptors that follow the listeners' in
	// hello: the data planes' kernel objects (ObjectSource), opaque here.
	Objects     json.RawMessage `json:"objects,omitempty"`
	ObjectFiles int             `json:"object_files,omitempty"`
}

type listenerInfo struct {
	Name    string `json:"name"`
	Address string `json:"address"`
}

// Message types, in protocol order.
const (
	msgHello     = "hello"     // old → new: version, listeners (+fds)
	msgReady     = "ready"     // new → old: started, holds the listeners, not accepting
	msgConns     = "conns"     // old → new: a batch of connections (+fds)
	msgAdopted   = "adopted"   // new → old: the batch is served here (but Rejected)
	msgEnd       = "end"       // old → new: that was all; Count connections were sent
	msgCommitted = "committed" // new → old: accepting; MAINPID sent
	msgReleased  = "released"  // old → new: admin socket and metrics address are free
	msgError     = "error"     // new → old: giving up (Error says why)
	msgAbort     = "abort"     // old → new: giving up (Error says why)
)

// Channel is one end of the hand-off socket: a SOCK_SEQPACKET Unix
// socketpair, so every message keeps its boundaries and its descriptors.
type Channel struct {
	c   *net.UnixConn
	buf []byte
	oob []byte
	// The hello, once Objects has read it (Take uses it then).
	hello      *message
	helloFiles []*os.File
	helloErr   error
}

// socketpair returns a Channel and the other end as a file for the child
// (ExtraFiles). Both are close-on-exec in this process; exec.Cmd clears
// the flag on the descriptor it passes.
func socketpair() (*Channel, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("hand-off socketpair: %w", err)
	}
	ch, err := newChannel(os.NewFile(uintptr(fds[0]), "wsplice-upgrade"))
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return ch, os.NewFile(uintptr(fds[1]), "wsplice-upgrade-child"), nil
}

// newChannel takes f (closing it) and returns a Channel on its socket.
func newChannel(f *os.File) (*Channel, error) {
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("hand-off socket: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("hand-off socket: descriptor %d is a %T, not a Unix socket", f.Fd(), c)
	}
	return channelOf(uc), nil
}

// channelOf is a Channel on a connected SOCK_SEQPACKET socket, with
// buffers for the largest frame and the most descriptors one carries.
func channelOf(c *net.UnixConn) *Channel {
	return &Channel{c: c, buf: make([]byte, frameSize+1), oob: make([]byte, unix.CmsgSpace(MaxFDs*4))}
}

// Inherited returns the channel to the agent that started this process
// for an upgrade, or nil when this process was not started that way. The
// variable is removed from the environment and the descriptor made
// close-on-exec, so neither leaks into a later upgrade's child.
func Inherited() (*Channel, error) {
	v, ok := os.LookupEnv(EnvFD)
	if !ok {
		return nil, nil
	}
	os.Unsetenv(EnvFD)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("%s=%q: not a descriptor number", EnvFD, v)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("%s=%d: %w", EnvFD, fd, err)
	}
	if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_SEQPACKET {
		return nil, fmt.Errorf("%s=%d: not the hand-off socket (SO_TYPE %d, %v)", EnvFD, fd, typ, err)
	}
	unix.CloseOnExec(fd)
	return newChannel(os.NewFile(uintptr(fd), "wsplice-upgrade"))
}

// Close closes the channel; the peer reads EOF.
func (ch *Channel) Close() error { return ch.c.Close() }

// PeerPID is the other agent's process id as this process sees it
// (SO_PEERCRED), 0 if it is in another PID namespace or unknown.
func (ch *Channel) PeerPID() int {
	rc, err := ch.c.SyscallConn()
	if err != nil {
		return 0
	}
	var cred *unix.Ucred
	_ = rc.Control(func(fd uintptr) { cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if cred == nil {
		return 0
	}
	return int(cred.Pid)
}

// Objects reads the old agent's hello early, before Take, and returns the
// data planes' kernel objects it carries (see ObjectSource): the new
// agent needs them to build its planes, which Take's Target uses. The
// files are the caller's. Take then goes on from the same hello; an error
// here is reported to the old agent by Take (call it with a Target that
// fails), and Objects returns it too.
func (ch *Channel) Objects(timeout time.Duration) (Objects, error) {
	m, files, err := ch.readHello(timeout, true)
	if err != nil {
		return Objects{}, err
	}
	n := len(m.Listeners)
	objs := Objects{Meta: m.Objects, Files: files[n:]}
	ch.helloFiles = files[:n:n]
	return objs, nil
}

// readHello returns the hello (once: the first call reads it, later calls
// get what it got, but only the listener descriptors). It checks the
// version and that the descriptors add up. Without objects, the objects'
// descriptors are closed.
func (ch *Channel) readHello(timeout time.Duration, objects bool) (*message, []*os.File, error) {
	if ch.hello != nil || ch.helloErr != nil {
		files := ch.helloFiles
		ch.helloFiles = nil
		return ch.hello, files, ch.helloErr
	}
	m, files, err := ch.recv(time.Now().Add(timeout))
	if err == nil && m.Type != msgHello {
		err = fmt.Errorf("protocol: got %q, want %q", m.Type, msgHello)
	}
	if err == nil && (m.Version < 1 || m.Version > ProtocolVersion) {
		err = fmt.Errorf("the running agent speaks hand-off version %d, this binary %d or older: it cannot take over from a newer agent", m.Version, ProtocolVersion)
	}
	if err == nil && (m.ObjectFiles < 0 || len(files) != len(m.Listeners)+m.ObjectFiles) {
		err = fmt.Errorf("protocol: %d listeners and %d objects with %d descriptors", len(m.Listeners), m.ObjectFiles, len(files))
	}
	if err != nil {
		closeFiles(files)
		ch.helloErr = err
		return nil, nil, err
	}
	ch.hello = m
	ch.helloFiles = nil
	if m.ObjectFiles > 0 && !objects {
		closeFiles(files[len(m.Listeners):])
		files = files[:len(m.Listeners)]
	}
	return m, files, nil
}

// TakeoverSocket is where a running agent waits for a new agent started
// with --take-over (another container on the host, such as the next pod
// of a DaemonSet update) that asks to be handed everything (HandConn).
type TakeoverSocket struct {
	ln *net.UnixListener
}

// ListenTakeover listens on path (a SOCK_SEQPACKET Unix socket, mode
// 0600), replacing a stale socket file left there. Closing it does not
// remove the file, which the next agent may already have bound again.
func ListenTakeover(path string) (*TakeoverSocket, error) {
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("take-over socket %s: exists and is not a socket", path)
		}
		if c, err := net.Dial("unixpacket", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("take-over socket %s: another agent listens there", path)
		}
		_ = os.Remove(path)
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("take-over socket: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("take-over socket: %w", err)
	}
	return &TakeoverSocket{ln: ln}, nil
}

// Accept waits for a new agent. Only root and this process's own user
// may take over (SO_PEERCRED); others are refused and Accept waits on.
func (t *TakeoverSocket) Accept() (*Channel, error) {
	for {
		c, err := t.ln.AcceptUnix()
		if err != nil {
			return nil, err
		}
		rc, err := c.SyscallConn()
		var cred *unix.Ucred
		if err == nil {
			_ = rc.Control(func(fd uintptr) { cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
		}
		if err != nil || cred == nil || (cred.Uid != 0 && int(cred.Uid) != os.Geteuid()) {
			c.Close()
			continue
		}
		return channelOf(c), nil
	}
}

// Close stops listening (the socket file stays).
func (t *TakeoverSocket) Close() error { return t.ln.Close() }

// ErrNoAgent is returned (wrapped) by DialTakeover when no agent listens.
var ErrNoAgent = errors.New("no running agent to take over from")

// DialTakeover connects to a running agent's take-over socket. The
// channel then goes to Objects and Take, as Inherited's does.
func DialTakeover(path string) (*Channel, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("%w (%s): %v", ErrNoAgent, path, err)
		}
		return nil, fmt.Errorf("take-over socket %s: %w", path, err)
	}
	return channelOf(c), nil
}

// send writes m with files attached to its first frame. The descriptors
// are taken with SyscallConn().Control, never Fd(): Fd would switch the
// shared open file description to blocking mode under the listeners and
// sockets this agent may still be serving.
func (ch *Channel) send(m *message, files []*os.File) error {
	if len(files) > MaxFDs {
		return fmt.Errorf("hand-off: %d descriptors in one message, the kernel takes at most %d", len(files), MaxFDs)
	}
	body, err := json.Marshal(m)
	if err != nil {
		return err
	}
	fds := make([]int, 0, len(files))
	for _, f := range files {
		rc, err := f.SyscallConn()
		if err != nil {
			return fmt.Errorf("hand-off: %s: %w", f.Name(), err)
		}
		if err := rc.Control(func(fd uintptr) { fds = append(fds, int(fd)) }); err != nil {
			return fmt.Errorf("hand-off: %s: %w", f.Name(), err)
		}
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	frame := make([]byte, 0, frameSize+1)
	for first := true; first || len(body) > 0; first = false {
		k := min(len(body), frameSize)
		flags := byte(0)
		if k < len(body) {
			flags = frameMore
		}
		frame = append(append(frame[:0], flags), body[:k]...)
		body = body[k:]
		if _, _, err := ch.c.WriteMsgUnix(frame, oob, nil); err != nil {
			return fmt.Errorf("hand-off: sending %s: %w", m.Type, err)
		}
		oob = nil
	}
	// The descriptors must stay open (no finalizer may close them) until
	// sendmsg has taken its references.
	runtime.KeepAlive(files)
	return nil
}

// errClosed is what recv returns when the peer closed its end (it exited).
var errClosed = errors.New("the other agent closed the hand-off socket (it exited)")

// recv reads one message and the descriptors sent with it, as files
// (close-on-exec: Go receives with MSG_CMSG_CLOEXEC). A zero deadline
// waits forever.
func (ch *Channel) recv(deadline time.Time) (*message, []*os.File, error) {
	if err := ch.c.SetReadDeadline(deadline); err != nil {
		return nil, nil, err
	}
	var body []byte
	var files []*os.File
	fail := func(err error) (*message, []*os.File, error) {
		closeFiles(files)
		return nil, nil, err
	}
	for {
		n, oobn, flags, _, err := ch.c.ReadMsgUnix(ch.buf, ch.oob)
		if oobn > 0 {
			fs, perr := parseRights(ch.oob[:oobn])
			files = append(files, fs...)
			if perr != nil && err == nil {
				err = perr
			}
		}
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			return fail(fmt.Errorf("hand-off: timed out waiting for the other agent: %w", err))
		case err != nil:
			return fail(fmt.Errorf("hand-off: receiving: %w", err))
		case n == 0:
			return fail(errClosed)
		case flags&unix.MSG_TRUNC != 0:
			return fail(errors.New("hand-off: a frame was larger than the receive buffer"))
		case flags&unix.MSG_CTRUNC != 0:
			return fail(errors.New("hand-off: descriptors were dropped (MSG_CTRUNC): is the open-file limit too low?"))
		}
		body = append(body, ch.buf[1:n]...)
		if ch.buf[0]&frameMore == 0 {
			break
		}
	}
	var m message
	if err := json.Unmarshal(body, &m); err != nil {
		return fail(fmt.Errorf("hand-off: decoding a message: %w", err))
	}
	return &m, files, nil
}

func parseRights(oob []byte) ([]*os.File, error) {
	cms, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("hand-off: control message: %w", err)
	}
	var files []*os.File
	var errs []error
	for _, cm := range cms {
		fds, err := unix.ParseUnixRights(&cm)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "handed-over"))
		}
	}
	return files, errors.Join(errs...)
}

func closeFiles(fs []*os.File) {
	for _, f := range fs {
		if f != nil {
			f.Close()
		}
	}
}

// isClosed reports whether err means the peer went away.
func isClosed(err error) bool {
	return errors.Is(err, errClosed) || errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
