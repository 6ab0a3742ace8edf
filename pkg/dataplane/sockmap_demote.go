package dataplane

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/cilium/ebpf"
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
	if len(batch) > smDemoteBatch {
		batch = batch[:smDemoteBatch]
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
			case v == smDemotePending:
				// Not visited. The tcp iterator walks hash buckets in
				// batches and can step over a socket while others in its
				// bucket come and go; a later pass finds it.
				retry = true
			default:
				// Visited, but not in the verdict map. A lookup is safe
				// (only deletes race with the verdict).
				var x uint64
				if err := m.VerdictMap.Lookup(c.cookie[i], &x); errors.Is(err, ebpf.ErrKeyNotExist) {
					c.flags &^= smVerdict(i)
					_ = m.Demote.Delete(c.cookie[i])
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
			failed = fmt.Errorf("iter/tcp did not visit the socket in %d passes", c.passes)
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
		consumed, inq, err := smRxConsumed(c.fd[i], c.flags&smFin(i) != 0)
		if err != nil {
			s.reset(c, smResetReason(i), nil)
			return
		}
		if got := consumed - c.rxBase[i]; got != st[i].Bytes {
			s.integrityReset(c, fmt.Errorf(
				"sockmap: %s socket: %d bytes received since insertion, %d redirected, %d queued: %d unaccounted",
				smSide(i), got+inq, st[i].Bytes, inq, int64(got)-int64(st[i].Bytes)))
			return
		}
	}
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
