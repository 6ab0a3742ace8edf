package dataplane

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Demotion: DESIGN.md "Adaptive data plane". A connection leaves the
// kernel path once, for good (fact 14: toggling loses order):
//
//  1. queueDemote marks it; the loop batches every marked connection into
//     one iter/tcp pass that deletes its sockets from the verdict map under
//     their socket locks (fact 15: the bpf(2) delete races with softirq and
//     loses whole skbs). From then on new bytes stay in each socket's TCP
//     receive queue and its window closes when SO_RCVBUF is full (fact 13).
//  2. poll waits until the bytes parked for each direction were queued into
//     the receiving socket (parked == 0 both ways). The sockets stay in the
//     target map meanwhile, or what is parked for them would be discarded
//     (fact 12).
//  3. completeDemotion deletes both from the target map, checks
//     tcpi_bytes_received - consumed before insertion - redirected - SIOCINQ
//     == 0 for each socket (fact 15; a mismatch resets both sides and is
//     counted), and hands the sockets to Fallback, which starts with what
//     queued meanwhile.

// Values of the demote map (bpf/sockmap.h enum demote_state).
const (
	smDemotePending uint32 = 1
	smDemoteDone    uint32 = 2
)

// smDemoteBatch bounds one iter/tcp pass: two demote-map entries per
// connection, and the map holds 4096.
const smDemoteBatch = 2048

// demote asks the loop to demote connection id now, as if reason had
// triggered. Tests use it to demote at chosen moments.
func (s *Sockmap) demote(id uint64, reason string) bool {
	s.mu.Lock()
	_, ok := s.conns[id]
	if ok {
		s.cmds = append(s.cmds, smCmd{id: id, demote: reason})
	}
	s.mu.Unlock()
	if ok {
		s.ep.poke()
	}
	return ok
}

func (s *Sockmap) queueDemote(c *smConn, reason string) {
	if c.phase != smLive {
		return
	}
	c.phase = smQueued
	c.reason = reason
	switch reason {
	case DemoteParked:
		s.ctr.DemotedParked++
	case DemoteRate:
		s.ctr.DemotedRate++
	case DemoteInsert:
		s.ctr.DemotedInsert++
	}
	s.demoteQ = append(s.demoteQ, c)
	s.makeHot(c)
}

// runDemotions runs one iter/tcp pass for every queued connection. It runs
// on the loop's thread, which is in the plane's network namespace.
func (s *Sockmap) runDemotions(now int64) {
	batch := s.demoteQ
	// Two planes share the demote map while one hands over to the other
	// (Export, Inherit): each takes half, so that their passes together
	// cannot fill it.
	most := smDemoteBatch
	if s.bpf.shared {
		most /= 2
	}
	if len(batch) > most {
		batch = batch[:most]
	}
	s.demoteQ = append([]*smConn(nil), s.demoteQ[len(batch):]...)
	m := &s.bpf.objs

	live := batch[:0:0]
	for _, c := range batch {
		if c.phase != smQueued {
			continue // closed meanwhile
		}
		ok := true
		for i := range 2 {
			if c.flags&smVerdict(i) == 0 {
				continue
			}
			if err := m.Demote.Update(c.cookie[i], smDemotePending, ebpf.UpdateAny); err != nil {
				s.reset(c, ReasonError, fmt.Errorf("sockmap: demotion: %w", err))
				ok = false
				break
			}
		}
		if ok {
			live = append(live, c)
		}
	}
	if len(live) == 0 {
		return
	}

	t0 := time.Now()
	ierr := s.runIter()
	s.ctr.IterPasses++
	s.ctr.IterTime += time.Since(t0)
	if ierr != nil {
		s.log.Error("sockmap iter/tcp pass failed", "err", ierr)
	}

	for _, c := range live {
		var failed error
		retry := false
		for i := range 2 {
			if c.flags&smVerdict(i) == 0 {
				continue
			}
			var v uint32
			if err := m.Demote.Lookup(c.cookie[i], &v); err != nil {
				failed = fmt.Errorf("reading demote map: %w", err)
				continue
			}
			switch {
			case ierr != nil:
				failed = ierr
			case v == smDemoteDone:
				c.flags &^= smVerdict(i)
				_ = m.Demote.Delete(c.cookie[i])
			default:
				// Not deleted by the pass. If the socket is no longer in
				// the verdict map the kernel took it out itself, under
				// its lock: a socket that reaches CLOSE (TIME_WAIT after
				// both FINs, LAST_ACK acked) is unhashed and unlinked
				// from every sockmap, and the iterator skips unhashed
				// sockets. A userspace lookup is safe (only deletes race
				// with the verdict).
				var x uint64
				var ti unix.TCPInfo
				if err := m.VerdictMap.Lookup(c.cookie[i], &x); errors.Is(err, ebpf.ErrKeyNotExist) {
					c.flags &^= smVerdict(i)
					_ = m.Demote.Delete(c.cookie[i])
				} else if smTCPInfo(c.fd[i], &ti) == nil && ti.State == unix.BPF_TCP_CLOSE {
					// Closed (both FINs done) but still linked: it is out
					// of the TCP hash, so no segment can reach it and no
					// verdict can run; the syscall delete cannot race.
					_ = m.VerdictMap.Delete(c.cookie[i])
					c.flags &^= smVerdict(i)
					_ = m.Demote.Delete(c.cookie[i])
				} else if v == smDemotePending {
					// Still in the map and not visited: the tcp iterator
					// walks hash buckets in batches and can step over a
					// socket while others in its bucket come and go; a
					// later pass finds it.
					retry = true
				} else {
					failed = fmt.Errorf("iter/tcp could not delete the %s socket from the verdict map", smSide(i))
				}
			}
		}
		if failed == nil && retry {
			c.passes++
			if c.passes < smDemotePasses {
				s.ctr.IterRetries++
				s.demoteQ = append(s.demoteQ, c)
				continue
			}
			var st [2]uint8
			for i := range 2 {
				var ti unix.TCPInfo
				if smTCPInfo(c.fd[i], &ti) == nil {
					st[i] = ti.State
				}
			}
			failed = fmt.Errorf("iter/tcp did not visit the socket in %d passes (TCP states %d/%d, verdict flags %#x, fins %#x)",
				c.passes, st[0], st[1], c.flags&(smVerdict0|smVerdict1), c.flags&(smFin0|smFin1|smShut0|smShut1))
		}
		if failed != nil {
			// Nothing can be proven exact without the socket lock.
			for i := range 2 {
				_ = m.Demote.Delete(c.cookie[i])
			}
			s.reset(c, ReasonError, fmt.Errorf("sockmap: demotion: %w", failed))
			continue
		}
		c.phase = smDraining
		c.phaseAt = now
		s.makeHot(c)
	}
}

// smDemotePasses bounds the iter/tcp passes one demotion may take.
const smDemotePasses = 8

// runIter runs the iter/tcp program once over the namespace's sockets.
func (s *Sockmap) runIter() error {
	rd, err := s.bpf.iter.Open()
	if err != nil {
		return fmt.Errorf("opening iter/tcp: %w", err)
	}
	defer rd.Close()
	if _, err := io.Copy(io.Discard, rd); err != nil {
		return fmt.Errorf("reading iter/tcp: %w", err)
	}
	return nil
}

// completeDemotion runs once both directions' parked bytes were queued.
// st holds the final counters (the program no longer sees these sockets).
func (s *Sockmap) completeDemotion(c *smConn, st *[2]sockmapSockState, now int64) {
	m := &s.bpf.objs
	for i := range 2 {
		if err := m.TargetMap.Delete(c.cookie[i]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			s.reset(c, ReasonError, fmt.Errorf("sockmap: demotion: target map delete: %w", err))
			return
		}
	}
	// Fact 15's check, now that recv and SIOCINQ see the TCP queue again
	// (fact 13): every byte received since insertion was either
	// redirected by the program or is still in the receive queue.
	for i := range 2 {
		// A reset socket is a reset, not an integrity failure.
		if err := smSockErr(c.fd[i]); err != nil {
			s.reset(c, smResetReason(i), fmt.Errorf("%s socket: %w", smSide(i), err))
			return
		}
	}
	for i := range 2 {
		consumed, inq, err := smRxConsumed(c.fd[i])
		if err != nil {
			s.reset(c, smResetReason(i), fmt.Errorf("%s socket: %w", smSide(i), err))
			return
		}
		if got := consumed - c.rxBase[i]; got != st[i].Bytes {
			s.integrityReset(c, fmt.Errorf(
				"sockmap: %s socket: %d bytes received since insertion, %d redirected, %d queued: %d unaccounted",
				smSide(i), got+inq, st[i].Bytes, inq, int64(got)-int64(st[i].Bytes)))
			return
		}
	}
	// A direction the plane already finished (FIN forwarded with
	// shutdown(2)) cannot go to a fallback that would pass its EOF on
	// again: once the peer socket has closed both ways, that second
	// shutdown fails and the fallback resets the connection. Finish the
	// one open direction here instead.
	for i := range 2 {
		if c.flags&smShut(i) != 0 {
			// Socket i's write side is shut: the direction from the
			// other side is done, the one from i is still open.
			s.startFinish(c, i)
			return
		}
	}
	s.log.Debug("sockmap demotion complete", "id", c.id, "reason", c.reason,
		"client_bytes", st[0].Bytes, "backend_bytes", st[1].Bytes,
		"fin_client", c.flags&smFin0 != 0, "fin_backend", c.flags&smFin1 != 0,
		"shut_client", c.flags&smShut0 != 0, "shut_backend", c.flags&smShut1 != 0)
	drain := time.Duration(now - c.phaseAt)
	s.ctr.DrainTime += drain
	s.ctr.DrainMax = max(s.ctr.DrainMax, drain)

	base := c.stats(st)
	base.Plane = s.opts.Fallback.Kind()
	base.Demoted = true
	base.DemoteReason = c.reason
	for i := range 2 {
		s.ep.del(c.fd[i])
		_ = m.Socks.Delete(c.cookie[i])
		delete(s.byCookie, c.cookie[i])
	}
	delete(s.conns, c.id)
	delete(s.hot, c)
	// Reserve the id as demoted now, so Stats and Len never miss it
	// between here and the hand-off.
	s.demoted[c.id] = &smDemoted{base: base}
	s.out = append(s.out, smOut{handoff: c, base: base})
}

// startFinish moves a half-closed connection whose sockets left both maps
// to userspace: the loop copies the one open direction, src to the other
// socket, driven by epoll (EPOLLIN on src, EPOLLOUT on dst), with a pooled
// buffer held only in this phase, then forwards its FIN. No goroutine.
func (s *Sockmap) startFinish(c *smConn, src int) {
	dst := 1 - src
	c.phase = smFinish
	c.flags |= smUser
	c.fdir = int8(src)
	delete(s.hot, c)
	s.ctr.Finished++
	s.log.Debug("sockmap finishing half-closed connection in userspace", "id", c.id, "from", smSide(src))
	if err := s.ep.mod(c.fd[src], unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLET, c.cookie[src]); err != nil {
		s.reset(c, ReasonError, fmt.Errorf("sockmap: %w", err))
		return
	}
	if err := s.ep.mod(c.fd[dst], unix.EPOLLOUT|unix.EPOLLRDHUP|unix.EPOLLET, c.cookie[dst]); err != nil {
		s.reset(c, ReasonError, fmt.Errorf("sockmap: %w", err))
		return
	}
	s.copyStep(c)
}

// smCopyBudget bounds the bytes one copyStep moves before yielding to the
// rest of the loop.
const smCopyBudget = 1 << 20

// copyStep copies from the open direction's source to its destination
// until EAGAIN either way, EOF (then FIN, and the connection is finished)
// or the budget (then it is queued for the next loop iteration: with
// EPOLLET no new edge would come for bytes already readable).
func (s *Sockmap) copyStep(c *smConn) {
	src, dst := int(c.fdir), 1-int(c.fdir)
	if c.buf == nil {
		c.buf = smBufPool.Get().(*[]byte)
	}
	b := *c.buf
	for budget := smCopyBudget; budget > 0; {
		if c.bufLo < c.bufHi {
			n, err := unix.Write(c.fd[dst], b[c.bufLo:c.bufHi])
			if n > 0 {
				c.bufLo += int32(n)
				c.pre[src].Bytes += uint64(n)
				budget -= n
			}
			switch {
			case err == nil, err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return
			default:
				s.reset(c, smResetReason(dst), fmt.Errorf("%s socket: write: %w", smSide(dst), err))
				return
			}
		}
		n, _, err := unix.Recvfrom(c.fd[src], b, unix.MSG_DONTWAIT)
		switch {
		case n > 0:
			c.bufLo, c.bufHi = 0, int32(n)
			c.pre[src].Segments++
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			return
		case err != nil:
			s.reset(c, smResetReason(src), fmt.Errorf("%s socket: read: %w", smSide(src), err))
			return
		default: // EOF: every byte is written, pass the FIN on.
			if err := unix.Shutdown(c.fd[dst], unix.SHUT_WR); err != nil {
				s.reset(c, smResetReason(dst), fmt.Errorf("%s socket: shutdown: %w", smSide(dst), err))
				return
			}
			c.flags |= smShut(dst)
			if c.first < 0 {
				c.first = int8(src)
			}
			reason := ReasonClientFIN
			if c.first == 1 {
				reason = ReasonBackendFIN
			}
			s.finish(c, reason, nil, false)
			return
		}
	}
	s.copyQ = append(s.copyQ, c)
}
