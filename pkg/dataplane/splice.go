package dataplane

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// SpliceOptions configures NewSplice. The zero value is usable.
type SpliceOptions struct {
	// Logger receives the plane's rare diagnostics (pipe creation failures,
	// a direction falling back to read/write). Nil discards them. Per
	// connection outcomes are reported through Conn.Done, not logged.
	Logger *slog.Logger
	// PipeSize is the capacity asked of each pipe with F_SETPIPE_SZ, best
	// effort (the kernel rounds it up to a power of two pages and may refuse
	// an unprivileged request). It is also the size of the buffers used by
	// the read/write fallback. 0 means 64 KiB.
	PipeSize int
	// MaxIdlePipes bounds the empty pipes kept for reuse. Pipes lent to
	// directions that are moving bytes right now are not counted: there is
	// at most one per busy direction. 0 means 4 per CPU (at least 8); a
	// negative value keeps none.
	MaxIdlePipes int

	// spForceCopy makes every direction use the read/write fallback, as if
	// splice(2) had returned EINVAL. Tests only.
	spForceCopy bool
}

// Splice is the splice(2) data plane, the fallback when the sockmap path is
// unavailable or a connection was demoted from it.
//
// Each direction of a connection is one goroutine parked in the Go runtime
// poller (syscall.RawConn), holding no pipe and no buffer while the
// connection is idle. When the source becomes readable the direction
// borrows a pipe from a pool shared by the whole plane, splices the socket
// into it until EAGAIN (or the pipe is full), splices the pipe out into the
// destination (waiting for writability, still holding the pipe, only if the
// destination's send buffer is full) and returns the now empty pipe. An idle
// connection therefore costs two parked goroutines, one small struct and a
// timer: no thread, no pipe, no extra file descriptor — unlike io.Copy
// between *net.TCPConn, which holds a pipe pair per direction for the
// connection's whole life (DESIGN.md fact 10).
//
// Measured per idle connection (Linux 6.18, Go 1.26, 500 connections,
// BenchmarkSpliceIdleMemory): two goroutine stacks of 2 KB each (4 KB each
// once the runtime's adaptive starting stack size has grown, as it does in
// a busy process) and about 1–1.5 KB of heap; 0 pipes, no extra fds.
// io.Copy: two 4 KB stacks and 2 pipes (4 fds, about 2.6 KB of kernel slab
// per empty pipe).
//
// Splice is safe for concurrent use.
type Splice struct {
	log        *slog.Logger
	pipes      spPipePool
	bufs       sync.Pool // *[]byte of PipeSize, read/write fallback only
	bufSize    int
	forceCopy  bool
	epoch      time.Time // monotonic base of every spliceConn.last
	wg         sync.WaitGroup
	mu         sync.Mutex
	conns      map[uint64]*spliceConn
	closed     bool
	closedOnce sync.Once
}

var _ Plane = (*Splice)(nil)

// errSpliceClosed is returned by Start after Close.
var errSpliceClosed = errors.New("splice plane is closed")

// NewSplice returns a splice plane configured by opts.
func NewSplice(opts SpliceOptions) *Splice {
	if opts.PipeSize <= 0 {
		opts.PipeSize = 64 << 10
	}
	switch {
	case opts.MaxIdlePipes == 0:
		opts.MaxIdlePipes = max(8, 4*runtime.GOMAXPROCS(0))
	case opts.MaxIdlePipes < 0:
		opts.MaxIdlePipes = 0
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Splice{
		log:       log,
		pipes:     spPipePool{size: opts.PipeSize, max: opts.MaxIdlePipes},
		bufSize:   opts.PipeSize,
		forceCopy: opts.spForceCopy,
		epoch:     time.Now(),
		conns:     make(map[uint64]*spliceConn),
	}
	s.bufs.New = func() any {
		b := make([]byte, s.bufSize)
		return &b
	}
	return s
}

// Kind returns KindSplice.
func (s *Splice) Kind() Kind { return KindSplice }

// Len returns the number of connections started and not yet finished
// (Done not yet called).
func (s *Splice) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Pipes returns how many empty pipes the pool keeps for reuse and how many
// pipes the plane holds in all (idle plus lent to busy directions). Each
// pipe is two file descriptors.
func (s *Splice) Pipes() (idle, total int) { return s.pipes.spCounts() }

// Start takes ownership of c's sockets and forwards both ways until both
// directions have ended, a side resets, the idle timeout fires, or Kill or
// Close is called; then it closes both sockets and calls c.Done once.
// Any *net.TCPConn works, including one made by net.FileConn from a
// descriptor handed over by another plane. Deadlines on the sockets are
// cleared. On error the caller still owns the sockets and Done is not called.
func (s *Splice) Start(c *Conn) error { return s.spBegin(c, nil) }

// spBegin is Start, and Adopt when st (a connection detached by another
// agent, splice_handoff.go) is set.
func (s *Splice) spBegin(c *Conn, st *spHandoffState) error {
	if c == nil || c.Client == nil || c.Backend == nil {
		return errors.New("splice: connection needs a client and a backend socket")
	}
	crc, err := c.Client.SyscallConn()
	if err != nil {
		return fmt.Errorf("splice: client raw conn: %w", err)
	}
	brc, err := c.Backend.SyscallConn()
	if err != nil {
		return fmt.Errorf("splice: backend raw conn: %w", err)
	}
	// A deadline left over from the handshake would make the poller wake an
	// idle direction with ErrDeadlineExceeded.
	if err := c.Client.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("splice: clearing client deadline: %w", err)
	}
	if err := c.Backend.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("splice: clearing backend deadline: %w", err)
	}

	sc := &spliceConn{s: s, c: c, client: c.Client, backend: c.Backend}
	sc.last.Store(int64(time.Since(s.epoch)))
	sc.c2b.spInit(sc, spClient, c.Client, crc, c.Backend, brc)
	sc.b2c.spInit(sc, spBackend, c.Backend, brc, c.Client, crc)
	sc.alive.Store(2)
	if st != nil {
		st.spApply(sc)
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errSpliceClosed
	}
	if _, dup := s.conns[c.ID]; dup {
		s.mu.Unlock()
		return fmt.Errorf("splice: connection %d already started", c.ID)
	}
	s.conns[c.ID] = sc
	s.wg.Add(1)
	s.mu.Unlock()

	if c.IdleTimeout > 0 {
		sc.mu.Lock()
		sc.timer = time.AfterFunc(sc.spIdleLeft(), sc.spIdleCheck)
		sc.mu.Unlock()
	}
	go sc.c2b.spRun()
	go sc.b2c.spRun()
	return nil
}

// Stats returns the live counters of connection id.
func (s *Splice) Stats(id uint64) (Stats, bool) {
	s.mu.Lock()
	sc := s.conns[id]
	s.mu.Unlock()
	if sc == nil {
		return Stats{}, false
	}
	return sc.spStats(), true
}

// Kill closes connection id with reason: for ReasonDrain, ReasonShutdown
// and ReasonIdle gracefully (spGraceful: no more reads, the bytes already
// read are written, then a FIN each way; an RST where they cannot be
// written within spCloseGrace), for any other reason with an RST to both
// (SO_LINGER{1,0}, then close). It returns false if id is unknown or
// already finished; Done follows asynchronously.
func (s *Splice) Kill(id uint64, reason CloseReason) bool {
	s.mu.Lock()
	sc := s.conns[id]
	s.mu.Unlock()
	if sc == nil {
		return false
	}
	if spResets(reason) {
		sc.spAbort(reason, nil, true)
	} else {
		sc.spGraceful(reason)
	}
	return true
}

// spCloseGrace bounds a graceful close: bytes read and not yet written by
// then cannot be delivered, and both sides get an RST instead of a FIN
// (a FIN would tell the receiver the stream ended where it did not).
const spCloseGrace = 2 * time.Second

// spGraceful closes c with reason, without losing what was read: each
// direction stops reading (a read deadline in the past wakes one parked
// on its source), writes out what it holds (a write deadline of
// spCloseGrace bounds that), then passes a FIN on (spEnd). The last
// direction to end closes the sockets. A teardown meanwhile (an RST, a
// failed write) still wins.
func (sc *spliceConn) spGraceful(reason CloseReason) {
	sc.mu.Lock()
	if sc.closing || sc.ho != nil || sc.grace {
		sc.mu.Unlock()
		return
	}
	sc.grace, sc.reason = true, reason
	sc.mu.Unlock()
	for _, tc := range []*net.TCPConn{sc.client, sc.backend} {
		// Errors mean the socket is being closed by a teardown.
		_ = tc.SetWriteDeadline(time.Now().Add(spCloseGrace))
		_ = tc.SetReadDeadline(detachDeadline)
	}
}

// spGracing reports whether err is the deadline spGraceful set.
func (sc *spliceConn) spGracing(err error) bool {
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return false
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.grace && sc.ho == nil
}

// Close closes every connection with ReasonShutdown (FIN to both sides),
// waits until each one's Done has returned, and releases the pipe pool.
// Start fails afterwards. Close is idempotent.
func (s *Splice) Close() error {
	s.mu.Lock()
	s.closed = true
	live := make([]*spliceConn, 0, len(s.conns))
	for _, sc := range s.conns {
		live = append(live, sc)
	}
	s.mu.Unlock()
	for _, sc := range live {
		sc.spGraceful(ReasonShutdown)
	}
	s.wg.Wait()
	s.closedOnce.Do(s.pipes.spCloseAll)
	return nil
}

// spResets reports whether closing for reason sends an RST rather than a FIN.
func spResets(reason CloseReason) bool {
	switch reason {
	case ReasonDrain, ReasonShutdown, ReasonIdle:
		return false
	}
	return true
}

// spSide names one end of a connection.
type spSide uint8

const (
	spClient spSide = iota
	spBackend
)

func (sd spSide) String() string {
	if sd == spClient {
		return "client"
	}
	return "backend"
}

func (sd spSide) fin() CloseReason {
	if sd == spClient {
		return ReasonClientFIN
	}
	return ReasonBackendFIN
}

func (sd spSide) reset() CloseReason {
	if sd == spClient {
		return ReasonClientReset
	}
	return ReasonBackendReset
}

// failed maps an error on side sd's socket to a close reason: ETIMEDOUT
// (keepalive probes or TCP_USER_TIMEOUT ran out: the peer died) is a
// timeout, anything else a reset.
func (sd spSide) failed(err error) CloseReason {
	if errors.Is(err, unix.ETIMEDOUT) {
		if sd == spClient {
			return ReasonClientTimeout
		}
		return ReasonBackendTimeout
	}
	return sd.reset()
}

// spliceConn is one connection on the plane.
type spliceConn struct {
	s               *Splice
	c               *Conn
	client, backend *net.TCPConn
	c2b, b2c        spDir
	last            atomic.Int64 // time.Since(s.epoch) of the last forwarded byte
	alive           atomic.Int32 // direction goroutines still running
	closeOnce       sync.Once
	finished        atomic.Bool
	ho              *spDetach // set (under mu) while Detach takes the connection off the plane
	grace           bool      // (under mu) spGraceful is closing it

	mu       sync.Mutex
	timer    *time.Timer
	dirsDone int         // directions that reached EOF and forwarded it
	fin      CloseReason // side whose EOF came first
	closing  bool        // sockets are being closed; the reason is settled
	reason   CloseReason // teardown reason (reset, idle, kill …), overrides fin
	err      error
	rst      bool
}

func (sc *spliceConn) spTouch() {
	sc.last.Store(int64(time.Since(sc.s.epoch)))
}

func (sc *spliceConn) spStats() Stats {
	return Stats{
		Plane:           KindSplice,
		ClientToBackend: Direction{Bytes: sc.c2b.bytes.Load(), Segments: sc.c2b.segs.Load()},
		BackendToClient: Direction{Bytes: sc.b2c.bytes.Load(), Segments: sc.b2c.segs.Load()},
		LastActivity:    sc.s.epoch.Add(time.Duration(sc.last.Load())).Round(0),
	}
}

// spIdleCheck runs on the connection's one timer. Activity only stores a
// timestamp; the timer compares it and re-arms itself for the remainder, so
// moving bytes never touches the timer.
func (sc *spliceConn) spIdleCheck() {
	if sc.finished.Load() {
		return
	}
	sc.mu.Lock()
	t, closing := sc.timer, sc.closing || sc.grace
	sc.mu.Unlock()
	if closing || t == nil {
		return
	}
	idle := time.Since(sc.s.epoch) - time.Duration(sc.last.Load())
	if left := sc.c.IdleTimeout - idle; left > 0 {
		t.Reset(left)
		return
	}
	sc.spAbort(ReasonIdle, nil, false)
}

// spAbort settles the close reason, unless one is settled already, and
// closes both sockets: with SO_LINGER{1,0} when rst (the peers see RST),
// after shutdown(SHUT_RDWR) otherwise (the peers see FIN). The direction
// goroutines wake with net.ErrClosed and exit.
func (sc *spliceConn) spAbort(reason CloseReason, err error, rst bool) {
	sc.mu.Lock()
	if sc.closing {
		sc.mu.Unlock()
		return
	}
	sc.closing, sc.reason, sc.err, sc.rst = true, reason, err, rst
	sc.mu.Unlock()
	sc.spCloseSockets()
}

// spSawFIN records the side whose EOF came first.
func (sc *spliceConn) spSawFIN(from spSide) {
	sc.mu.Lock()
	if sc.fin == "" {
		sc.fin = from.fin()
	}
	sc.mu.Unlock()
}

// spDirDone records that one direction forwarded its EOF. When both have,
// the connection is over: both sockets are closed with nothing left to send.
func (sc *spliceConn) spDirDone() {
	sc.mu.Lock()
	sc.dirsDone++
	both := sc.dirsDone == 2 && !sc.closing
	if both {
		sc.closing = true
	}
	sc.mu.Unlock()
	if both {
		sc.spCloseSockets()
	}
}

// spCloseSockets closes both sockets once. Concurrent callers wait for the
// first to finish (sync.Once), and net.TCPConn.Close returns only after
// close(2), so a caller that returns from here knows both are closed.
func (sc *spliceConn) spCloseSockets() {
	sc.closeOnce.Do(func() {
		sc.mu.Lock()
		rst := sc.rst
		sc.mu.Unlock()
		for _, tc := range []*net.TCPConn{sc.client, sc.backend} {
			if rst {
				_ = tc.SetLinger(0)
			} else if rc, err := tc.SyscallConn(); err == nil {
				_ = rc.Control(func(fd uintptr) { _ = unix.Shutdown(int(fd), unix.SHUT_RDWR) })
			}
			_ = tc.Close()
		}
	})
}

// spExit is called by each direction goroutine as it ends; the last one
// finishes the connection.
func (sc *spliceConn) spExit() {
	if sc.alive.Add(-1) != 0 {
		return
	}
	if sc.spExitDetached() { // handed over: not closed, no Done (splice_handoff.go)
		return
	}
	// Every exit path closed the sockets or settled a reason that did; make
	// sure, and wait for a close still in progress on another goroutine.
	sc.mu.Lock()
	if !sc.closing {
		sc.closing, sc.reason, sc.err, sc.rst = true, ReasonError, errors.New("splice: directions ended without closing"), true
	}
	t := sc.timer
	sc.mu.Unlock()
	sc.spCloseSockets()
	sc.finished.Store(true)
	if t != nil {
		t.Stop()
	}

	s := sc.s
	s.mu.Lock()
	delete(s.conns, sc.c.ID)
	s.mu.Unlock()

	sc.mu.Lock()
	res := Result{Reason: sc.reason, Err: sc.err}
	if res.Reason == "" {
		res.Reason = sc.fin
	}
	sc.mu.Unlock()
	res.Stats = sc.spStats()
	if res.Reason == "" {
		res.Reason = ReasonError
		res.Err = errors.New("splice: connection ended without a reason")
	}
	if sc.c.Done != nil {
		sc.c.Done(res)
	}
	sc.spDetachSettled()
	s.wg.Done()
}

// spDir is one direction of a connection, run by one goroutine. The fields
// below the counters are touched only by that goroutine (and by the
// callbacks it passes to RawConn, which run on it).
type spDir struct {
	sc           *spliceConn
	from, to     spSide
	dst          *net.TCPConn
	srcRC, dstRC syscall.RawConn
	bytes, segs  atomic.Uint64

	copyMode bool // splice(2) refused this source (EINVAL): read/write
	pipe     *spPipe
	buf      *[]byte
	bufOff   int
	bufN     int
	eof      bool
	rerr     error  // error reading the source (its side reset)
	werr     error  // error writing the destination (its side reset)
	local    error  // local failure (no pipe): ReasonError
	perr     error  // the poller's error (net.ErrClosed after a teardown)
	pending  []byte // hand-off: read from the source by another agent, written first
	eofSent  bool   // the source's EOF was passed on (CloseWrite on dst)
	dropped  int    // bytes read and not written when the last move stopped

	// Method values bound once so that waiting on the poller does not
	// allocate a closure per event.
	readSpliceFn, writeSpliceFn, readCopyFn, writeCopyFn, watchFn func(uintptr) bool
}

func (d *spDir) spInit(sc *spliceConn, from spSide, src *net.TCPConn, srcRC syscall.RawConn, dst *net.TCPConn, dstRC syscall.RawConn) {
	d.sc, d.from, d.to = sc, from, 1-from
	d.dst, d.srcRC, d.dstRC = dst, srcRC, dstRC
	d.copyMode = sc.s.forceCopy
	d.readSpliceFn = d.spReadSplice
	d.writeSpliceFn = d.spWriteSplice
	d.readCopyFn = d.spReadCopy
	d.writeCopyFn = d.spWriteCopy
	d.watchFn = d.spWatchCB
}

// spHeld returns the bytes read from the source and not yet written.
func (d *spDir) spHeld() int {
	n := d.bufN - d.bufOff
	if d.pipe != nil {
		n += d.pipe.n
	}
	return n
}

// spRelease gives back the pipe or buffer. A pipe still holding bytes is
// closed by the pool, never reused.
func (d *spDir) spRelease() {
	if d.pipe != nil {
		d.sc.s.pipes.spPut(d.pipe)
		d.pipe = nil
	}
	if d.buf != nil {
		d.sc.s.bufs.Put(d.buf)
		d.buf, d.bufOff, d.bufN = nil, 0, 0
	}
}

const spFlags = unix.SPLICE_F_NONBLOCK | unix.SPLICE_F_MOVE

// spRun forwards from the source to the destination until EOF or an error.
//
// While parked in the poller, this goroutine's stack holds only spRun's and
// spMove's frames (plus the poller's), kept small on purpose: the goroutine
// stack is most of what an idle connection costs, and the runtime shrinks a
// stack at GC only when less than a quarter of it is in use. The rare
// paths (errors, EOF, fallback) live in spEnd.
func (d *spDir) spRun() {
	defer d.sc.spExit()
	if !d.spResume() {
		return
	}
	for {
		for d.spMove() {
		}
		switch d.spEnd() {
		case spStop:
			return
		case spWatchSrc:
			d.spWatch()
			return
		}
	}
}

// spMove waits until the source is readable, moves what it holds into the
// destination and gives back the pipe or buffer. It reports whether to go
// on; if not, the fields say why.
func (d *spDir) spMove() bool {
	d.eof, d.rerr, d.werr, d.local, d.perr = false, nil, nil, nil, nil
	readFn, writeFn := d.readSpliceFn, d.writeSpliceFn
	if d.copyMode {
		readFn, writeFn = d.readCopyFn, d.writeCopyFn
	}
	d.perr = d.srcRC.Read(readFn)
	if d.perr == nil && d.rerr == nil && d.local == nil && d.spHeld() > 0 {
		d.perr = d.dstRC.Write(writeFn)
	}
	if d.perr != nil && d.spHeld() > 0 {
		d.spKeepHeld() // a Detach stopped the write: the bytes go with the connection
	}
	d.dropped = d.spHeld() // a teardown, or a graceful close that ran out of time
	d.spRelease()
	return d.perr == nil && d.rerr == nil && d.werr == nil && d.local == nil && !d.eof
}

// What spRun does after spEnd.
const (
	spStop     = iota // the direction is over
	spContinue        // go on moving bytes (switched to read/write)
	spWatchSrc        // EOF forwarded: watch the source for an RST
)

// spEnd handles whatever stopped spMove.
func (d *spDir) spEnd() int {
	sc := d.sc
	switch {
	case d.perr != nil && d.sc.spDetaching(d.perr):
		// Detach set a deadline: stop here, the sockets stay open.
	case d.perr != nil && sc.spGracing(d.perr):
		return d.spEndGraceful()
	case d.perr != nil:
		// net.ErrClosed after a teardown (a no-op: the reason is
		// settled) or a poller failure.
		sc.spAbort(ReasonError, fmt.Errorf("splice: waiting on %s socket: %w", d.from, d.perr), true)
	case d.local != nil:
		sc.s.log.Warn("splice direction failed", "conn", sc.c.ID, "err", d.local)
		sc.spAbort(ReasonError, d.local, true)
	case errors.Is(d.rerr, unix.EINVAL) && !d.copyMode && d.segs.Load() == 0:
		// The source's protocol has no splice_read (refused on the first
		// call, so nothing was lost with the empty pipe): copy through a
		// pooled buffer instead, for the rest of this direction's life.
		d.copyMode = true
		sc.s.log.Debug("splice refused, copying with read/write", "conn", sc.c.ID, "from", d.from.String())
		return spContinue
	case d.rerr != nil:
		sc.spAbort(d.from.failed(d.rerr), nil, true)
	case d.werr != nil:
		sc.spAbort(d.to.failed(d.werr), nil, true)
	case d.eof:
		// Every byte read before the EOF has been written: pass the FIN
		// on. The other direction keeps flowing. The FIN is recorded
		// first: once passed on, the peer may answer with its own before
		// this goroutine runs again.
		sc.spSawFIN(d.from)
		if err := d.dst.CloseWrite(); err != nil {
			sc.spAbort(d.to.reset(), nil, true)
			return spStop
		}
		d.eofSent = true
		sc.spDirDone()
		return spWatchSrc
	}
	return spStop
}

// spReadSplice runs when the source may be readable: borrow a pipe and
// splice into it until EAGAIN, EOF or a full pipe. Returning false (nothing
// to move) gives the pipe back and parks the goroutine in the poller.
func (d *spDir) spReadSplice(fd uintptr) bool {
	if d.pipe == nil {
		p, err := d.sc.s.pipes.spGet()
		if err != nil {
			d.local = err
			return true
		}
		d.pipe = p
	}
	p := d.pipe
	for p.n < p.cap {
		n, err := unix.Splice(int(fd), nil, p.w, nil, p.cap-p.n, spFlags)
		switch {
		case n > 0:
			p.n += int(n)
			d.segs.Add(1)
			d.sc.spTouch()
		case err == nil:
			d.eof = true
			return true
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			// Either the socket is drained or the pipe ran out of slots
			// (one per skb fragment, so it can be "full" below cap). With
			// bytes held, write them and come straight back; with none,
			// the socket is drained: wait without a pipe.
			if p.n > 0 {
				return true
			}
			d.sc.s.pipes.spPut(p)
			d.pipe = nil
			return false
		default:
			d.rerr = err
			return true
		}
	}
	return true
}

// spWriteSplice splices everything the pipe holds into the destination;
// false (send buffer full) waits for writability with the pipe still lent.
func (d *spDir) spWriteSplice(fd uintptr) bool {
	p := d.pipe
	for p.n > 0 {
		n, err := unix.Splice(p.r, nil, int(fd), nil, p.n, spFlags)
		switch {
		case n > 0:
			p.n -= int(n)
			d.bytes.Add(uint64(n))
			d.sc.spTouch()
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			return false
		case err == nil:
			d.werr = errors.New("splice to socket wrote nothing")
			return true
		default:
			d.werr = err
			return true
		}
	}
	return true
}

// spReadCopy is spReadSplice for the read/write fallback.
func (d *spDir) spReadCopy(fd uintptr) bool {
	if d.buf == nil {
		d.buf = d.sc.s.bufs.Get().(*[]byte)
	}
	for {
		n, err := unix.Read(int(fd), *d.buf)
		switch {
		case n > 0:
			d.bufOff, d.bufN = 0, n
			d.segs.Add(1)
			d.sc.spTouch()
			return true
		case err == nil:
			d.eof = true
			return true
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			d.sc.s.bufs.Put(d.buf)
			d.buf = nil
			return false
		default:
			d.rerr = err
			return true
		}
	}
}

// spWriteCopy is spWriteSplice for the read/write fallback.
func (d *spDir) spWriteCopy(fd uintptr) bool {
	n, done := d.spWrite(fd, (*d.buf)[d.bufOff:d.bufN])
	d.bufOff += n
	return done
}

// spWrite writes b to fd, counting what moved. It returns how much it wrote
// and false when the send buffer is full (wait for writability); true when
// b is written or the write failed (d.werr set).
func (d *spDir) spWrite(fd uintptr, b []byte) (int, bool) {
	w := 0
	for w < len(b) {
		n, err := unix.Write(int(fd), b[w:])
		switch {
		case n > 0:
			w += n
			d.bytes.Add(uint64(n))
			d.sc.spTouch()
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			return w, false
		case err == nil:
			d.werr = errors.New("write to socket wrote nothing")
			return w, true
		default:
			d.werr = err
			return w, true
		}
	}
	return w, true
}

// spWatch keeps the goroutine of a direction that has forwarded its EOF
// parked on the source until the connection ends, so that an RST arriving
// after the FIN (sk_err is EPIPE in CLOSE_WAIT, ECONNRESET otherwise) is
// propagated to the other side instead of leaving it half-open. Nothing is
// read: the source is at EOF, so every wake-up only checks SO_ERROR.
func (d *spDir) spWatch() {
	d.rerr = nil
	err := d.srcRC.Read(d.watchFn)
	switch {
	case err != nil && d.sc.spDetaching(err):
	case err != nil && d.sc.spGracing(err):
		// Its FIN went on already; the other direction ends the close.
	case err != nil:
		d.sc.spAbort(ReasonError, fmt.Errorf("splice: watching %s socket: %w", d.from, err), true)
	case d.rerr != nil:
		d.sc.spAbort(d.from.failed(d.rerr), nil, true)
	}
}

// spEndGraceful ends a direction that spGraceful stopped: with everything
// it read written, the FIN goes on; with bytes it could not write in time,
// both sides get an RST, so that neither takes the cut for the stream's end.
func (d *spDir) spEndGraceful() int {
	sc := d.sc
	if d.dropped > 0 {
		sc.s.log.Warn("splice: bytes not delivered within the close grace period, resetting instead of FIN",
			"conn", sc.c.ID, "from", d.from.String(), "bytes", d.dropped)
		sc.mu.Lock()
		reason := sc.reason
		sc.mu.Unlock()
		sc.spAbort(reason, nil, true)
		return spStop
	}
	if !d.eofSent {
		if err := d.dst.CloseWrite(); err != nil {
			sc.spAbort(d.to.reset(), nil, true)
			return spStop
		}
		d.eofSent = true
		sc.spDirDone()
	}
	return spStop
}

func (d *spDir) spWatchCB(fd uintptr) bool {
	v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
	switch {
	case err != nil:
		d.rerr = err
		return true
	case v != 0:
		d.rerr = syscall.Errno(v)
		return true
	}
	return false
}
