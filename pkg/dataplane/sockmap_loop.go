package dataplane

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// The plane's one goroutine. It sleeps in epoll_wait on every socket
// (EPOLLRDHUP|EPOLLET), the activity ring buffer and a wake-up eventfd;
// while some connection is busy it also wakes every PollInterval to poll
// the busy ones, and every scanEvery to look at all of them (idle timeout,
// missed activity). It runs on a locked OS thread inside the plane's
// network namespace, because the iter/tcp pass of a demotion walks the
// namespace of the thread that opens it.

const (
	smQuietPolls = 4 // quiet polls before a connection is no longer busy
	// smQuietParked: parked bytes a quiet connection may show (bytes
	// redirected an instant before the poll and not yet queued).
	smQuietParked  = 64 << 10
	smRateWindow   = 50 * time.Millisecond
	smCloseGrace   = 2 * time.Second // FIN close waits this long at most for parked bytes
	smStallTimeout = 2 * time.Second // FIN with bytes unaccounted for this long: integrity reset
)

func (s *Sockmap) loop(ready chan<- error) {
	defer close(s.loopDone)
	// Never unlocked: if the thread changed namespace it must die with
	// this goroutine instead of serving others.
	runtime.LockOSThread()
	if err := s.enterNetns(); err != nil {
		ready <- err
		return
	}
	ready <- nil

	evs := make([]unix.EpollEvent, 256)
	var rec ringbuf.Record
	now := monoNow()
	nextTick, lastScan := now, now
	for {
		s.mu.Lock()
		busy := len(s.hot) > 0 || len(s.demoteQ) > 0
		copying := len(s.copyQ) > 0
		// Read each time: a Start with a short IdleTimeout shortens it.
		nextScan := lastScan + int64(s.scanInterval())
		s.mu.Unlock()
		now = monoNow()
		wake := nextScan
		if busy && nextTick < wake {
			wake = nextTick
		}
		ms := 0
		if wake > now && !copying {
			ms = int((wake - now + int64(time.Millisecond) - 1) / int64(time.Millisecond))
		}
		n, err := s.ep.wait(evs, ms)
		if err != nil {
			s.log.Error("sockmap epoll_wait failed", "err", err)
			time.Sleep(10 * time.Millisecond)
		}

		s.mu.Lock()
		for i := range n {
			switch tag := epTag(&evs[i]); tag {
			case epTagWake:
				s.ep.drainWake()
			case epTagRing:
				s.drainRing(&rec)
			default:
				if c := s.byCookie[tag]; c != nil {
					side := 0
					if c.cookie[1] == tag {
						side = 1
					}
					s.sockEvent(c, side, evs[i].Events)
				}
			}
		}
		now = monoNow()
		s.runCmds(now)
		for _, c := range s.urgent {
			if _, ok := s.hot[c]; ok {
				s.poll(c, now)
			}
		}
		clear(s.urgent)
		s.urgent = s.urgent[:0]
		if len(s.copyQ) > 0 {
			q := s.copyQ
			s.copyQ = nil
			for _, c := range q {
				if s.conns[c.id] == c && c.phase == smFinish {
					s.copyStep(c)
				}
			}
		}
		if now >= nextTick {
			// Poll five times as often while some connection is filling
			// up: at loopback rates a 5ms poll lets several MiB more
			// park before the demotion (fact 5).
			if s.tick(now) {
				nextTick = now + max(int64(s.opts.PollInterval)/5, int64(time.Millisecond))
			} else {
				nextTick = now + int64(s.opts.PollInterval)
			}
		}
		if now >= lastScan+int64(s.scanInterval()) {
			s.scan(now)
			lastScan = now
		}
		if len(s.demoteQ) > 0 {
			s.runDemotions(now)
		}
		out := s.out
		s.out = nil
		exit := s.closing && len(s.conns) == 0 && len(s.cmds) == 0
		s.mu.Unlock()

		for i := range out {
			s.deliver(&out[i])
		}
		if exit {
			return
		}
	}
}

// drainRing reads every pending activity event: each names a socket that
// redirected another notify_step bytes, whose connection becomes busy.
func (s *Sockmap) drainRing(rec *ringbuf.Record) {
	if s.exported {
		return // the new agent reads it (an event may predate Export)
	}
	s.bpf.ring.SetDeadline(time.Unix(1, 0)) // in the past: never block
	for {
		if err := s.bpf.ring.ReadInto(rec); err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				s.log.Error("sockmap ring buffer read failed", "err", err)
			}
			return
		}
		if len(rec.RawSample) < 8 {
			continue
		}
		cookie := binary.NativeEndian.Uint64(rec.RawSample)
		if c := s.byCookie[cookie]; c != nil && c.phase != smFinish {
			s.makeHot(c)
			// Poll now, not at the next tick: each event is another
			// activity step redirected, and a fast sender parks several
			// MiB per tick.
			s.urgent = append(s.urgent, c)
		}
	}
}

// scanInterval is how often scan runs: scanEvery, or more often while the
// activity ring belongs to another process (Export). Called under mu.
func (s *Sockmap) scanInterval() time.Duration {
	if s.exported {
		return min(s.scanEvery, smExportScan)
	}
	return s.scanEvery
}

func (s *Sockmap) makeHot(c *smConn) {
	c.quiet = 0
	c.stuck = 0
	c.nextPoll = 0
	s.hot[c] = struct{}{}
}

// sockEvent handles an epoll event of one socket: errors and RST reset
// the connection (fact 4: SO_LINGER{1,0} on both), FIN is recorded and
// forwarded by the next poll once its bytes are queued.
func (s *Sockmap) sockEvent(c *smConn, side int, ev uint32) {
	if ev&unix.EPOLLRDHUP != 0 && c.flags&smFin(side) == 0 {
		c.flags |= smFin(side)
		if c.first < 0 {
			c.first = int8(side)
		}
		if c.phase != smFinish { // there copyStep sees the EOF itself
			s.makeHot(c)
			// Poll it in this iteration, not at the next tick: short
			// connections end with a FIN and should not wait a tick.
			s.urgent = append(s.urgent, c)
		}
	}
	if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		err := smSockErr(c.fd[side])
		// HUP without an error is normal once the socket received FIN
		// and the plane shut its write side; any other HUP means the
		// connection is gone.
		done := smFin(side) | smShut(side)
		if err == nil && ev&unix.EPOLLHUP != 0 && c.flags&done != done {
			err = unix.ECONNRESET
		}
		if err != nil {
			s.reset(c, smFailReason(side, err), fmt.Errorf("%s socket: epoll events %#x: %w", smSide(side), ev, err))
			return
		}
	}
	if c.phase == smFinish {
		s.copyStep(c)
	}
}

func smResetReason(side int) CloseReason {
	if side == 0 {
		return ReasonClientReset
	}
	return ReasonBackendReset
}

// smFailReason maps the error on side's socket (its SO_ERROR) to a close
// reason: ETIMEDOUT (keepalive probes or TCP_USER_TIMEOUT ran out: the
// peer died) is a timeout, anything else a reset.
func smFailReason(side int, err error) CloseReason {
	if errors.Is(err, unix.ETIMEDOUT) {
		if side == 0 {
			return ReasonClientTimeout
		}
		return ReasonBackendTimeout
	}
	return smResetReason(side)
}

func (s *Sockmap) runCmds(now int64) {
	for _, cmd := range s.cmds {
		if cmd.all {
			for _, c := range s.conns {
				s.closeWith(c, cmd.reason, now)
			}
			continue
		}
		if c := s.conns[cmd.id]; c != nil {
			if cmd.demote != "" {
				s.queueDemote(c, cmd.demote)
				continue
			}
			s.closeWith(c, cmd.reason, now)
		}
	}
	s.cmds = s.cmds[:0]
}

// closeWith starts closing c: at once with RST for a kill or a local
// error, otherwise FIN both ways once parked bytes were queued.
func (s *Sockmap) closeWith(c *smConn, reason CloseReason, now int64) {
	switch reason {
	case ReasonKill, ReasonError:
		s.reset(c, reason, nil)
	default:
		if c.phase == smClosing {
			return
		}
		c.phase = smClosing
		c.closeRs = reason
		c.phaseAt = now
		s.makeHot(c)
	}
}

// tick polls every busy connection. It reports whether one is filling up:
// live, with more than half the high-water mark parked.
func (s *Sockmap) tick(now int64) (filling bool) {
	half := s.opts.ParkedHighWater / 2
	for c := range s.hot {
		if c.nextPoll <= now {
			before := c.parked
			s.poll(c, now)
			if half > 0 && c.phase == smLive {
				for i := range 2 {
					// Past half the mark, or growing by more than an
					// eighth of it per poll.
					if c.parked[i] > half || c.parked[i]-before[i] > half/4 {
						filling = true
					}
				}
			}
		}
	}
	return filling
}

// poll reads c's counters and its sockets' send queues, and acts: parked
// bytes or rate over the limit demote, a FIN whose bytes are all queued is
// forwarded, a drained demotion is handed off, a closing connection closes.
func (s *Sockmap) poll(c *smConn, now int64) {
	var st [2]sockmapSockState
	for i := range 2 {
		if err := s.bpf.objs.Socks.Lookup(c.cookie[i], &st[i]); err != nil {
			s.reset(c, ReasonError, fmt.Errorf("sockmap: reading counters: %w", err))
			return
		}
	}
	if st[0].Fails+st[1].Fails > 0 {
		// Fact 11: the program dropped data it could not redirect; the
		// stream cannot be exact any more.
		s.ctr.RedirectResets++
		s.log.Warn("sockmap redirect failed, resetting connection", "id", c.id,
			"client_fails", st[0].Fails, "backend_fails", st[1].Fails)
		s.reset(c, ReasonError, errSockmapRedirect)
		return
	}
	moved := false
	prevParked := c.parked
	for i := range 2 {
		if st[i].Bytes != c.last[i] {
			moved = true
			c.last[i] = st[i].Bytes
		}
		dst := 1 - i
		if c.flags&smShut(dst) != 0 {
			c.parked[i] = 0
			continue
		}
		w, err := smTxWritten(c.fd[dst], false)
		if err != nil {
			s.reset(c, smResetReason(dst), fmt.Errorf("%s socket: %w", smSide(dst), err))
			return
		}
		c.parked[i] = max(0, int64(st[i].Bytes)-int64(w-c.txBase[dst]))
	}

	progress := moved || c.parked != prevParked
	switch c.phase {
	case smDraining:
		if c.parked[0] == 0 && c.parked[1] == 0 {
			// FINs that arrived while the demotion drained are forwarded
			// here if their bytes all went through the program; if both
			// directions end this way there is nothing left to hand off.
			if _, gone := s.forwardFINs(c, &st, now, true); gone {
				return
			}
			s.completeDemotion(c, &st, now)
			return
		}
		s.backoff(c, now, progress)
		return
	case smQueued:
		return
	case smFinish:
		// Out of the maps: epoll drives it (copyStep), not polls.
		delete(s.hot, c)
		return
	case smClosing:
		if (c.parked[0] == 0 && c.parked[1] == 0) || now-c.phaseAt > int64(smCloseGrace) {
			for i := range 2 {
				_ = unix.Shutdown(c.fd[i], unix.SHUT_WR)
			}
			s.finish(c, c.closeRs, nil, false)
		}
		return
	}

	// Live. Demote at the mark, or when the growth since the last poll
	// says the mark will be passed by the next one: at loopback rates a
	// poll interval is worth several MiB of parked bytes.
	hw := s.opts.ParkedHighWater
	if hw > 0 {
		for i := range 2 {
			if c.parked[i] > hw || c.parked[i]+(c.parked[i]-prevParked[i]) > hw {
				s.queueDemote(c, DemoteParked)
				return
			}
		}
	}
	if s.opts.RateLimit > 0 {
		if c.rateAt == 0 || !moved && c.quiet > 0 {
			c.rateAt, c.rate = now, c.last
		} else if dt := now - c.rateAt; dt >= int64(smRateWindow) {
			for i := range 2 {
				r := int64(float64(st[i].Bytes-c.rate[i]) * 1e9 / float64(dt))
				if r > s.opts.RateLimit {
					s.queueDemote(c, DemoteRate)
					return
				}
			}
			c.rateAt, c.rate = now, c.last
		}
	}

	pending, gone := s.forwardFINs(c, &st, now, false)
	if gone {
		return
	}
	// Quiet: no FIN waiting and next to nothing parked. Bytes moving do
	// not keep a connection busy: the program reports it again after
	// another activity step, which bounds what can park meanwhile just
	// as for any idle connection. Otherwise every chatty connection of
	// small messages would be polled for ever, and a few thousand of
	// them keep the loop (and a CPU) busy for nothing.
	if !pending && c.parked[0] < smQuietParked && c.parked[1] < smQuietParked {
		c.quiet++
		if c.quiet >= smQuietPolls {
			delete(s.hot, c)
			c.quiet = 0
			c.rateAt = 0
		}
		return
	}
	c.quiet = 0
	s.backoff(c, now, progress)
}

// forwardFINs implements fact 4: a FIN is forwarded (SHUT_WR on the peer)
// only after the bytes before it were redirected (tcpi_bytes_received
// accounted for by the program's counter) and queued into the peer (parked
// == 0). pending reports a FIN still waiting; gone that c was finished
// (both directions closed) or reset. While a demotion drains, bytes that
// stayed in the receive queue are normal: that direction is left to the
// fallback instead of being counted as a stall.
func (s *Sockmap) forwardFINs(c *smConn, st *[2]sockmapSockState, now int64, draining bool) (pending, gone bool) {
	for i := range 2 {
		dst := 1 - i
		if c.flags&smFin(i) == 0 || c.flags&smShut(dst) != 0 {
			continue
		}
		pending = true
		if c.parked[i] != 0 {
			continue
		}
		var ti unix.TCPInfo
		if err := smTCPInfo(c.fd[i], &ti); err != nil {
			s.reset(c, smResetReason(i), fmt.Errorf("%s socket: TCP_INFO: %w", smSide(i), err))
			return false, true
		}
		// tcpi_bytes_received counts the FIN's sequence number too.
		if got := ti.Bytes_received - c.rxBase[i] - 1; got != st[i].Bytes {
			if draining {
				continue
			}
			if c.stallAt == 0 {
				c.stallAt = now
			} else if now-c.stallAt > int64(smStallTimeout) {
				s.integrityReset(c, fmt.Errorf("sockmap: %s sent FIN after %d bytes, %d redirected",
					smSide(i), got, st[i].Bytes))
				return false, true
			}
			continue
		}
		c.stallAt = 0
		if err := unix.Shutdown(c.fd[dst], unix.SHUT_WR); err != nil {
			s.reset(c, smResetReason(dst), fmt.Errorf("%s socket: shutdown: %w", smSide(dst), err))
			return false, true
		}
		c.flags |= smShut(dst)
	}
	if c.flags&(smShut0|smShut1) == smShut0|smShut1 {
		reason := ReasonClientFIN
		if c.first == 1 {
			reason = ReasonBackendFIN
		}
		c.phase = smLive // ended normally, not a failed demotion
		s.finish(c, reason, nil, false)
		return false, true
	}
	return pending, false
}

// backoff spaces out the polls of a busy connection that makes no progress
// (bytes parked or a FIN waiting for them, and the receiver stalled): each
// such poll doubles the interval, up to 128 × PollInterval. Any progress,
// ring event or socket event polls it at the normal pace again.
func (s *Sockmap) backoff(c *smConn, now int64, progress bool) {
	if progress {
		c.stuck = 0
		c.nextPoll = 0
		return
	}
	c.stuck = min(c.stuck+1, 7)
	c.nextPoll = now + int64(s.opts.PollInterval)<<c.stuck
}

// scan looks at every connection that is not busy: one that moved a
// quarter activity step since it was last polled (a lost ring event)
// becomes busy, one idle past its IdleTimeout is closed with FIN. It reads the counters of all sockets
// with batched lookups (one syscall per 1,024 sockets), so a scan of many
// idle connections stays cheap.
func (s *Sockmap) scan(now int64) {
	if len(s.conns) == 0 {
		return
	}
	if s.scanKeys == nil {
		s.scanKeys = make([]uint64, smScanBatch)
		s.scanVals = make([]sockmapSockState, smScanBatch)
	}
	var cursor ebpf.MapBatchCursor
	for {
		n, err := s.bpf.objs.Socks.BatchLookup(&cursor, s.scanKeys, s.scanVals, nil)
		for i := range n {
			c := s.byCookie[s.scanKeys[i]]
			if c == nil {
				continue
			}
			st := &s.scanVals[i]
			side := 0
			if c.cookie[1] == s.scanKeys[i] {
				side = 1
			}
			c.seenNs = max(c.seenNs, int64(st.LastNs))
			// A quarter step moved since the last poll: an activity
			// report may have been lost (ring full), or the ring is the
			// new agent's (exported). Less is normal chatter.
			if st.Bytes >= c.last[side]+s.step/4 || st.Fails != 0 {
				s.makeHot(c)
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			s.log.Error("sockmap scan: batch lookup failed", "err", err)
			break
		}
	}
	// Idle: no byte redirected either way for IdleTimeout (a connection
	// parked behind a stalled reader counts as idle too), or, while a
	// demotion waits for parked bytes, no progress since it began.
	for _, c := range s.conns {
		if c.idle <= 0 || (c.phase != smLive && c.phase != smDraining) {
			continue
		}
		last := max(c.startNs, c.seenNs)
		if c.phase == smDraining {
			last = max(last, c.phaseAt)
		}
		if now-last > int64(c.idle) {
			s.closeWith(c, ReasonIdle, now)
		}
	}
}

const smScanBatch = 1024

// reset closes both sockets with RST (SO_LINGER{1,0}). err is the cause:
// returned in Result.Err for ReasonError and ReasonIntegrity, logged at
// debug level for the others (whose Result.Err is nil by contract).
func (s *Sockmap) reset(c *smConn, reason CloseReason, err error) {
	if reason != ReasonError && reason != ReasonIntegrity {
		if err != nil {
			s.log.Debug("sockmap connection reset", "id", c.id, "reason", reason, "cause", err)
		}
		err = nil
	}
	s.finish(c, reason, err, true)
}

// integrityReset resets a connection whose bytes cannot be proven exact.
func (s *Sockmap) integrityReset(c *smConn, err error) {
	s.ctr.IntegrityResets++
	s.log.Error("sockmap integrity check failed, resetting both sides", "id", c.id, "err", err)
	s.finish(c, ReasonIntegrity, err, true)
}

// finish closes both sockets (the kernel removes them from the sockhashes
// on close), deletes their map entries and queues Done.
func (s *Sockmap) finish(c *smConn, reason CloseReason, err error, rst bool) {
	var st [2]sockmapSockState
	for i := range 2 {
		_ = s.bpf.objs.Socks.Lookup(c.cookie[i], &st[i])
	}
	for i := range 2 {
		if rst && c.fd[i] >= 0 {
			smLingerZero(c.fd[i])
		}
	}
	if c.phase == smQueued || c.phase == smDraining {
		s.ctr.DemoteFailures++
	}
	// Closed first: that takes the sockets out of the sockhashes, so no
	// skb can meet a missing socks entry (which the program would count
	// as a redirect failure).
	s.forget(c)
	for i := range 2 {
		_ = s.bpf.objs.Socks.Delete(c.cookie[i])
		_ = s.bpf.objs.Demote.Delete(c.cookie[i])
	}
	if reason == ReasonError && err == nil {
		err = errors.New("sockmap: local error")
	}
	s.out = append(s.out, smOut{done: c.done, res: Result{Stats: c.stats(&st), Reason: reason, Err: err}})
}

// deliver runs, outside mu, a Done call or a hand-off to Fallback.
func (s *Sockmap) deliver(o *smOut) {
	if o.handoff == nil {
		o.done(o.res)
		return
	}
	c := o.handoff
	fail := func(err error, conns ...*net.TCPConn) {
		for _, tc := range conns {
			if tc != nil {
				tc.SetLinger(0)
				tc.Close()
			}
		}
		for i := range 2 {
			if c.fd[i] >= 0 {
				smLingerZero(c.fd[i])
				unix.Close(c.fd[i])
			}
		}
		s.mu.Lock()
		delete(s.demoted, c.id)
		s.ctr.DemoteFailures++
		s.mu.Unlock()
		s.log.Error("sockmap hand-off to fallback failed, connection reset", "id", c.id, "err", err)
		c.done(Result{Stats: o.base, Reason: ReasonError, Err: err})
	}
	var tcs [2]*net.TCPConn
	for i := range 2 {
		tc, err := smFileConn(c.fd[i])
		c.fd[i] = -1 // closed by smFileConn either way
		if err != nil {
			fail(fmt.Errorf("sockmap: %s socket back to Go: %w", smSide(i), err), tcs[:]...)
			return
		}
		tcs[i] = tc
	}
	d := &smDemoted{base: o.base}
	s.mu.Lock()
	s.demoted[c.id] = d
	s.mu.Unlock()
	s.demotedWG.Add(1)
	err := s.opts.Fallback.Start(&Conn{
		ID:          c.id,
		Client:      tcs[0],
		Backend:     tcs[1],
		IdleTimeout: c.idle,
		Done:        s.demotedDone(c.id, d, c.done),
	})
	if err != nil {
		s.demotedWG.Done()
		fail(fmt.Errorf("sockmap: fallback %s refused the connection: %w", s.opts.Fallback.Kind(), err), tcs[:]...)
	}
}

// smFileConn turns a plane-owned fd back into a *net.TCPConn (for the
// fallback). net.FileConn duplicates it; the plane's copy is closed.
func smFileConn(fd int) (*net.TCPConn, error) {
	f := os.NewFile(uintptr(fd), "")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		nc.Close()
		return nil, fmt.Errorf("not a TCP connection: %T", nc)
	}
	return tc, nil
}
