package dataplane

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// KindCopy is the userspace copy plane: connections whose bytes must pass
// through the agent because a side is a TLS stream it terminates or
// originates (the kernel here has no kTLS to hand the records to).
const KindCopy Kind = "copy"

// Close reasons for a peer the kernel gave up on (ETIMEDOUT: keepalive
// probes went unanswered, or TCP_USER_TIMEOUT passed with data or a probe
// unacknowledged). The copy plane reports them; the splice and sockmap
// planes report such a connection as a reset today.
const (
	ReasonClientTimeout  CloseReason = "client_timeout"
	ReasonBackendTimeout CloseReason = "backend_timeout"
)

// CopyOptions configure NewCopy. The zero value is usable.
type CopyOptions struct {
	// Logger receives rare diagnostics; nil discards them.
	Logger *slog.Logger
	// BufSize is the size of the buffers lent to a direction while it
	// moves bytes. 0 means 16 KiB, one full TLS record.
	BufSize int
}

// CopyConn is a connection for the copy plane: two byte streams, each a
// *net.TCPConn or a stream over one (a *tls.Conn whose NetConn, through
// any number of NetConn wrappers, is a connection with SyscallConn). On a
// successful Start the plane owns both and closes them; Done is called
// exactly once, after both are closed.
type CopyConn struct {
	ID          uint64
	Client      net.Conn
	Backend     net.Conn
	IdleTimeout time.Duration // 0 = never
	Done        func(Result)
}

// Copy is the userspace copy plane.
//
// Each direction is one goroutine. While a direction is idle it waits in
// the Go runtime poller for the source socket to become readable, holding
// no buffer (DESIGN.md's lesson from io.Copy: idle connections must not
// pin memory); then it borrows a buffer from a pool shared by the plane,
// reads, writes everything to the destination, and — for a TLS source —
// keeps reading the records the TLS stack has already buffered (a read
// with an expired deadline returns them without touching the socket)
// before it gives the buffer back. What an idle terminated connection still
// costs is measured by BenchmarkCopyIdleTLSMemory: the two goroutines and
// crypto/tls's own per-connection state, whose record buffer keeps the
// size of the largest record read (up to about 17 KB) for the life of the
// connection — crypto/tls offers no way to shrink it.
//
// Copy is safe for concurrent use.
type Copy struct {
	log   *slog.Logger
	bufs  sync.Pool
	size  int
	epoch time.Time
	wg    sync.WaitGroup

	mu     sync.Mutex
	conns  map[uint64]*copyConn
	closed bool
}

var _ Plane = (*Copy)(nil)

// NewCopy returns a copy plane.
func NewCopy(opts CopyOptions) *Copy {
	if opts.BufSize <= 0 {
		opts.BufSize = 16 << 10
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Copy{log: log, size: opts.BufSize, epoch: time.Now(), conns: make(map[uint64]*copyConn)}
	p.bufs.New = func() any {
		b := make([]byte, p.size)
		return &b
	}
	return p
}

// Kind returns KindCopy.
func (p *Copy) Kind() Kind { return KindCopy }

// Len returns the number of connections not yet finished.
func (p *Copy) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

// Start moves a plain TCP pair (it satisfies Plane; the proxy sends such
// pairs to splice or sockmap, which do it with less work).
func (p *Copy) Start(c *Conn) error {
	if c == nil || c.Client == nil || c.Backend == nil {
		return errors.New("copy: connection needs a client and a backend socket")
	}
	return p.StartStreams(&CopyConn{ID: c.ID, Client: c.Client, Backend: c.Backend, IdleTimeout: c.IdleTimeout, Done: c.Done})
}

// StartStreams takes ownership of c's streams and copies both ways until
// both directions have ended (each EOF is passed on as a TLS close_notify,
// for a TLS stream, and a TCP FIN), a side fails, the idle timeout fires,
// or Kill or Close is called. Deadlines are cleared. On error the caller
// still owns the streams and Done is not called.
func (p *Copy) StartStreams(c *CopyConn) error {
	if c == nil || c.Client == nil || c.Backend == nil {
		return errors.New("copy: connection needs a client and a backend stream")
	}
	cc := &copyConn{p: p, c: c}
	var err error
	if cc.rawClient, cc.rcClient, err = cpRaw(c.Client); err != nil {
		return fmt.Errorf("copy: client: %w", err)
	}
	if cc.rawBackend, cc.rcBackend, err = cpRaw(c.Backend); err != nil {
		return fmt.Errorf("copy: backend: %w", err)
	}
	if err := c.Client.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("copy: clearing client deadline: %w", err)
	}
	if err := c.Backend.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("copy: clearing backend deadline: %w", err)
	}
	cc.c2b = copyDir{cc: cc, from: cpClient, src: c.Client, rawSrc: cc.rawClient, rc: cc.rcClient, dst: c.Backend, rawDst: cc.rawBackend}
	cc.b2c = copyDir{cc: cc, from: cpBackend, src: c.Backend, rawSrc: cc.rawBackend, rc: cc.rcBackend, dst: c.Client, rawDst: cc.rawClient}
	cc.touch()
	cc.alive.Store(2)

	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return errors.New("copy plane is closed")
	}
	if _, dup := p.conns[c.ID]; dup {
		p.mu.Unlock()
		return fmt.Errorf("copy: connection %d already started", c.ID)
	}
	p.conns[c.ID] = cc
	p.wg.Add(1)
	p.mu.Unlock()

	if c.IdleTimeout > 0 {
		cc.mu.Lock()
		cc.timer = time.AfterFunc(c.IdleTimeout, cc.idleCheck)
		cc.mu.Unlock()
	}
	go cc.c2b.run()
	go cc.b2c.run()
	return nil
}

// Stats returns the live counters of connection id.
func (p *Copy) Stats(id uint64) (Stats, bool) {
	p.mu.Lock()
	cc := p.conns[id]
	p.mu.Unlock()
	if cc == nil {
		return Stats{}, false
	}
	return cc.stats(), true
}

// Kill closes connection id: FIN (after a TLS close_notify on TLS streams)
// for ReasonDrain, ReasonShutdown and ReasonIdle, RST otherwise. Done
// follows asynchronously. False if id is unknown or finished.
func (p *Copy) Kill(id uint64, reason CloseReason) bool {
	p.mu.Lock()
	cc := p.conns[id]
	p.mu.Unlock()
	if cc == nil {
		return false
	}
	go cc.abort(reason, nil, cpResets(reason))
	return true
}

// Close closes every connection with ReasonShutdown and returns once each
// one's Done has returned. Start fails afterwards.
func (p *Copy) Close() error {
	p.mu.Lock()
	p.closed = true
	live := make([]*copyConn, 0, len(p.conns))
	for _, cc := range p.conns {
		live = append(live, cc)
	}
	p.mu.Unlock()
	for _, cc := range live {
		go cc.abort(ReasonShutdown, nil, false)
	}
	p.wg.Wait()
	return nil
}

func cpResets(reason CloseReason) bool {
	switch reason {
	case ReasonDrain, ReasonShutdown, ReasonIdle:
		return false
	}
	return true
}

type cpSide uint8

const (
	cpClient cpSide = iota
	cpBackend
)

func (s cpSide) fin() CloseReason {
	if s == cpClient {
		return ReasonClientFIN
	}
	return ReasonBackendFIN
}

// failed maps an error on side s's socket to a close reason.
func (s cpSide) failed(err error) CloseReason {
	if errors.Is(err, syscall.ETIMEDOUT) {
		if s == cpClient {
			return ReasonClientTimeout
		}
		return ReasonBackendTimeout
	}
	if s == cpClient {
		return ReasonClientReset
	}
	return ReasonBackendReset
}

// cpRaw finds the socket under a stream: unwraps NetConn() until a
// connection with SyscallConn.
func cpRaw(c net.Conn) (net.Conn, syscall.RawConn, error) {
	for range 8 {
		if sc, ok := c.(syscall.Conn); ok {
			rc, err := sc.SyscallConn()
			if err != nil {
				return nil, nil, err
			}
			return c, rc, nil
		}
		u, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = u.NetConn()
	}
	return nil, nil, fmt.Errorf("%T has no socket underneath (no SyscallConn or NetConn)", c)
}

// copyConn is one connection on the plane.
type copyConn struct {
	p                     *Copy
	c                     *CopyConn
	rawClient, rawBackend net.Conn
	rcClient, rcBackend   syscall.RawConn
	c2b, b2c              copyDir
	last                  atomic.Int64 // time.Since(p.epoch) of the last byte moved
	alive                 atomic.Int32
	closeOnce             sync.Once
	finished              atomic.Bool

	mu       sync.Mutex
	timer    *time.Timer
	dirsDone int
	fin      CloseReason
	closing  bool
	reason   CloseReason
	err      error
	rst      bool
}

func (cc *copyConn) touch() { cc.last.Store(int64(time.Since(cc.p.epoch))) }

func (cc *copyConn) stats() Stats {
	return Stats{
		Plane:           KindCopy,
		ClientToBackend: Direction{Bytes: cc.c2b.bytes.Load(), Segments: cc.c2b.segs.Load()},
		BackendToClient: Direction{Bytes: cc.b2c.bytes.Load(), Segments: cc.b2c.segs.Load()},
		LastActivity:    cc.p.epoch.Add(time.Duration(cc.last.Load())).Round(0),
	}
}

func (cc *copyConn) idleCheck() {
	if cc.finished.Load() {
		return
	}
	cc.mu.Lock()
	t, closing := cc.timer, cc.closing
	cc.mu.Unlock()
	if closing || t == nil {
		return
	}
	idle := time.Since(cc.p.epoch) - time.Duration(cc.last.Load())
	if left := cc.c.IdleTimeout - idle; left > 0 {
		t.Reset(left)
		return
	}
	cc.abort(ReasonIdle, nil, false)
}

// abort settles the reason (unless one is settled) and closes both sides:
// RST when rst, else a TLS close_notify where a side is TLS, then FIN.
func (cc *copyConn) abort(reason CloseReason, err error, rst bool) {
	cc.mu.Lock()
	if cc.closing {
		cc.mu.Unlock()
		return
	}
	cc.closing, cc.reason, cc.err, cc.rst = true, reason, err, rst
	cc.mu.Unlock()
	cc.closeAll()
}

func (cc *copyConn) sawFIN(from cpSide) {
	cc.mu.Lock()
	if cc.fin == "" {
		cc.fin = from.fin()
	}
	cc.mu.Unlock()
}

func (cc *copyConn) dirDone() {
	cc.mu.Lock()
	cc.dirsDone++
	both := cc.dirsDone == 2 && !cc.closing
	if both {
		cc.closing = true
	}
	cc.mu.Unlock()
	if both {
		cc.closeAll()
	}
}

// closeAll closes both sides once; concurrent callers wait for the first.
func (cc *copyConn) closeAll() {
	cc.closeOnce.Do(func() {
		cc.mu.Lock()
		rst := cc.rst
		cc.mu.Unlock()
		for _, s := range []struct {
			stream, raw net.Conn
			rc          syscall.RawConn
		}{{cc.c.Client, cc.rawClient, cc.rcClient}, {cc.c.Backend, cc.rawBackend, cc.rcBackend}} {
			if rst {
				if l, ok := s.raw.(interface{ SetLinger(int) error }); ok {
					_ = l.SetLinger(0)
				}
			} else {
				if s.stream != s.raw {
					// A writer blocked on a full socket holds the TLS
					// write lock: bound it so close_notify can go out.
					_ = s.raw.SetWriteDeadline(time.Now().Add(time.Second))
					if cw, ok := s.stream.(interface{ CloseWrite() error }); ok {
						_ = cw.CloseWrite()
					}
				}
				_ = s.rc.Control(func(fd uintptr) { _ = unix.Shutdown(int(fd), unix.SHUT_RDWR) })
			}
			_ = s.raw.Close()
		}
	})
}

func (cc *copyConn) exit() {
	if cc.alive.Add(-1) != 0 {
		return
	}
	cc.mu.Lock()
	if !cc.closing {
		cc.closing, cc.reason, cc.err, cc.rst = true, ReasonError, errors.New("copy: directions ended without closing"), true
	}
	t := cc.timer
	cc.mu.Unlock()
	cc.closeAll()
	cc.finished.Store(true)
	if t != nil {
		t.Stop()
	}
	p := cc.p
	p.mu.Lock()
	delete(p.conns, cc.c.ID)
	p.mu.Unlock()

	cc.mu.Lock()
	res := Result{Reason: cc.reason, Err: cc.err}
	if res.Reason == "" {
		res.Reason = cc.fin
	}
	cc.mu.Unlock()
	res.Stats = cc.stats()
	if res.Reason == "" {
		res.Reason, res.Err = ReasonError, errors.New("copy: connection ended without a reason")
	}
	if cc.c.Done != nil {
		cc.c.Done(res)
	}
	p.wg.Done()
}

// copyDir is one direction of a connection.
type copyDir struct {
	cc          *copyConn
	from        cpSide // side of src
	src, dst    net.Conn
	rawSrc      net.Conn
	rawDst      net.Conn
	rc          syscall.RawConn // of rawSrc
	bytes, segs atomic.Uint64
	peek        [1]byte
}

func (d *copyDir) other() cpSide { return 1 - d.from }

func (d *copyDir) run() {
	defer d.cc.exit()
	// A TLS stack may hold records it has already read from the socket:
	// the handshake code read the request or response head through it,
	// and the bytes the peer sent right behind may be waiting there with
	// nothing left in the socket to wake the poller. Drain them first.
	buffered := d.src != d.rawSrc
	first := buffered
	for {
		if !first {
			if err := d.waitReadable(); err != nil {
				d.cc.abort(d.from.failed(err), nil, true)
				return
			}
		}
		bp := d.cc.p.bufs.Get().(*[]byte)
		done := d.move(*bp, buffered, first)
		d.cc.p.bufs.Put(bp)
		if done {
			return
		}
		first = false
	}
}

// waitReadable parks until the source socket has bytes, EOF or an error,
// holding no buffer. The one-byte MSG_PEEK leaves the bytes in place.
func (d *copyDir) waitReadable() error {
	var serr error
	err := d.rc.Read(func(fd uintptr) bool {
		_, _, e := unix.Recvfrom(int(fd), d.peek[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch e {
		case unix.EAGAIN, unix.EINTR:
			return false
		case nil:
			return true
		}
		// Reading the socket error clears it (after ETIMEDOUT the next
		// read returns 0, like a FIN): report it from here.
		serr = e
		return true
	})
	if err != nil {
		return err
	}
	return serr
}

// move reads what is available into buf and writes it on, until the
// source would block. With drainOnly it reads only what a TLS stack holds
// already. It returns true when the direction is over.
func (d *copyDir) move(buf []byte, buffered, drainOnly bool) bool {
	drain := false
	if drainOnly {
		drain = true
		_ = d.src.SetReadDeadline(time.Unix(1, 0))
	}
	defer func() {
		if drain {
			_ = d.src.SetReadDeadline(time.Time{})
		}
	}()
	for {
		n, err := d.src.Read(buf)
		if n > 0 {
			d.bytes.Add(uint64(n))
			d.segs.Add(1)
			d.cc.touch()
			if _, werr := d.dst.Write(buf[:n]); werr != nil {
				d.cc.abort(d.other().failed(werr), nil, true)
				return true
			}
		}
		switch {
		case err == nil:
		case drain && errors.Is(err, os.ErrDeadlineExceeded):
			return false // nothing more buffered: back to waiting
		case errors.Is(err, io.EOF):
			d.cc.sawFIN(d.from)
			d.halfClose()
			d.cc.dirDone()
			return true
		default:
			d.cc.abort(d.from.failed(err), nil, true)
			return true
		}
		if !buffered {
			return false
		}
		if !drain {
			// Records the TLS stack already holds come back without a
			// socket read; an incomplete one ends the loop at once.
			drain = true
			_ = d.src.SetReadDeadline(time.Unix(1, 0))
		}
	}
}

// halfClose passes an EOF on: close_notify on a TLS destination, then FIN.
func (d *copyDir) halfClose() {
	if d.dst != d.rawDst {
		if cw, ok := d.dst.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}
	if cw, ok := d.rawDst.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}
