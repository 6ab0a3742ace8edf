package dataplane

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

var _ Handoff = (*Splice)(nil)

// spStateVersion is the version of spHandoffState this code writes; Adopt
// accepts it and every older one.
const spStateVersion = 1

// spHandoffState is a splice connection's Detached.State.
type spHandoffState struct {
	Version int `json:"v"`
	// Fin is the side whose EOF came first, if any.
	Fin          CloseReason `json:"fin,omitempty"`
	LastActivity time.Time   `json:"last_activity"`
	ClientToBack spDirState  `json:"c2b"`
	BackToClient spDirState  `json:"b2c"`
}

// spDirState is one direction of a detached connection.
type spDirState struct {
	Bytes    uint64 `json:"bytes"`
	Segments uint64 `json:"segments"`
	// EOFSent: the source's EOF was passed on (the destination is shut
	// down for writing); the adopter only watches the source for an RST.
	EOFSent bool `json:"eof_sent,omitempty"`
	// Copy: splice(2) refused this source; use read/write.
	Copy bool `json:"copy,omitempty"`
	// Pending are bytes read from the source and not yet written to the
	// destination when the direction stopped: the adopter writes them
	// before reading anything more.
	Pending []byte `json:"pending,omitempty"`
}

// spDetach is a connection's Detach in progress.
type spDetach struct {
	done chan struct{} // closed when the connection is detached or finished
	ok   bool          // detached (else it finished here, Done called)
	d    Detached
	err  error
}

// detachDeadline wakes every goroutine of a connection parked in the
// poller: Go's poller fails a wait, and any new one, once the deadline has
// passed, and touches neither the socket nor its queues.
var detachDeadline = time.Unix(1, 0)

// Detach takes connections off the plane for a hand-off (Handoff.Detach).
//
// How: each connection is marked, then a past deadline is set on both of
// its sockets. A direction parked waiting for its source (or for room in
// its destination, or watching a half-closed source) wakes with
// os.ErrDeadlineExceeded and ends without closing anything; a direction
// moving bytes finishes the read it is in, and whatever of it the
// destination did not take stays in the pipe or buffer, which is emptied
// into the state (at most one pipe per direction). The last direction to
// end duplicates both descriptors (close-on-exec) and closes the plane's
// own, which leaves the sockets open and untouched: no FIN, no RST, the
// kernel queues intact.
func (s *Splice) Detach(ids []uint64) ([]Detached, error) {
	var marked []*spliceConn
	s.mu.Lock()
	cands := make([]*spliceConn, 0, len(ids))
	for _, id := range ids {
		if sc := s.conns[id]; sc != nil {
			cands = append(cands, sc)
		}
	}
	s.mu.Unlock()
	for _, sc := range cands {
		sc.mu.Lock()
		if sc.closing || sc.ho != nil || sc.grace {
			sc.mu.Unlock()
			continue
		}
		sc.ho = &spDetach{done: make(chan struct{})}
		sc.mu.Unlock()
		// Errors mean the socket is being closed by a teardown, which then
		// finishes the connection here.
		_ = sc.client.SetDeadline(detachDeadline)
		_ = sc.backend.SetDeadline(detachDeadline)
		marked = append(marked, sc)
	}
	out := make([]Detached, 0, len(marked))
	var errs []error
	for _, sc := range marked {
		<-sc.ho.done
		switch {
		case sc.ho.ok:
			out = append(out, sc.ho.d)
		case sc.ho.err != nil:
			errs = append(errs, sc.ho.err)
		}
	}
	return out, errors.Join(errs...)
}

// spDetaching reports whether err is the deadline Detach set on a
// connection being detached (rather than a failure or a teardown).
func (sc *spliceConn) spDetaching(err error) bool {
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return false
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.ho != nil
}

// spKeepHeld moves the bytes a direction read and could not write before
// Detach stopped it out of its pipe or buffer, into d.pending, so that
// spRelease finds them empty and the state carries them.
func (d *spDir) spKeepHeld() {
	if !d.sc.spDetaching(d.perr) {
		return // a teardown: the bytes go with the connection
	}
	if d.bufN > d.bufOff {
		d.pending = append(d.pending, (*d.buf)[d.bufOff:d.bufN]...)
		d.bufOff, d.bufN = 0, 0
	}
	if p := d.pipe; p != nil && p.n > 0 {
		buf := make([]byte, p.n)
		got := 0
		for got < len(buf) {
			n, err := unix.Read(p.r, buf[got:])
			if n > 0 {
				got += n
				continue
			}
			if err == unix.EINTR {
				continue
			}
			// Cannot happen (the pipe holds p.n bytes and only this
			// goroutine reads it); losing them silently would corrupt the
			// stream, so fail the hand-off of this connection instead.
			d.local = fmt.Errorf("splice: reading %d held bytes back from the pipe: %v", p.n-got, err)
			break
		}
		d.pending = append(d.pending, buf[:got]...)
		p.n -= got
	}
}

// spExitDetached finishes a connection whose directions ended because of
// Detach: the plane lets go of it without closing the sockets. It reports
// false if the connection is to be finished the usual way (it was not
// being detached, or something closed it meanwhile).
func (sc *spliceConn) spExitDetached() bool {
	sc.mu.Lock()
	ho := sc.ho
	if ho == nil || sc.closing {
		sc.mu.Unlock()
		return false
	}
	// The other direction's fields are safe to read: it has ended (alive
	// reached 0 through an atomic both updated).
	if err := errors.Join(sc.c2b.local, sc.b2c.local); err != nil {
		sc.closing, sc.reason, sc.err, sc.rst = true, ReasonError, err, true
		sc.mu.Unlock()
		ho.err = fmt.Errorf("connection %d: %w", sc.c.ID, err)
		return false
	}
	// From here nothing may close the sockets through the plane (Kill,
	// Close, the idle timer all check closing).
	sc.closing = true
	t := sc.timer
	st := spHandoffState{
		Version: spStateVersion, Fin: sc.fin,
		LastActivity: sc.s.epoch.Add(time.Duration(sc.last.Load())).Round(0),
		ClientToBack: sc.c2b.spState(), BackToClient: sc.b2c.spState(),
	}
	sc.mu.Unlock()
	if t != nil {
		t.Stop()
	}
	state, err := json.Marshal(st)
	var cf, bf *os.File
	if err == nil {
		cf, err = sc.client.File()
	}
	if err == nil {
		if bf, err = sc.backend.File(); err != nil {
			cf.Close()
		}
	}
	if err != nil {
		// Out of descriptors: the connection cannot move and its
		// goroutines are gone. Close it (RST) and report it here.
		sc.mu.Lock()
		sc.reason, sc.err, sc.rst = ReasonError, fmt.Errorf("splice: detaching for a hand-off: %w", err), true
		sc.mu.Unlock()
		ho.err = fmt.Errorf("connection %d: %w", sc.c.ID, err)
		return false
	}
	// Plain close(2) of the plane's descriptors: the duplicates keep the
	// sockets open, so the peers see nothing.
	_ = sc.client.Close()
	_ = sc.backend.Close()
	sc.finished.Store(true)
	ho.ok = true
	ho.d = Detached{ID: sc.c.ID, Kind: KindSplice, Client: cf, Backend: bf, IdleTimeout: sc.c.IdleTimeout, State: state}
	s := sc.s
	s.mu.Lock()
	delete(s.conns, sc.c.ID)
	s.mu.Unlock()
	close(ho.done)
	s.wg.Done()
	return true
}

// spDetachSettled tells a Detach waiting on this connection that it
// finished here instead (called after Done).
func (sc *spliceConn) spDetachSettled() {
	sc.mu.Lock()
	ho := sc.ho
	sc.mu.Unlock()
	if ho != nil {
		close(ho.done)
	}
}

func (d *spDir) spState() spDirState {
	return spDirState{
		Bytes: d.bytes.Load(), Segments: d.segs.Load(),
		EOFSent: d.eofSent, Copy: d.copyMode, Pending: d.pending,
	}
}

// Adopt resumes a connection detached by a splice plane of this or an
// earlier agent process (Handoff.Adopt): the counters continue from the
// state's, pending bytes are written before anything more is read, and a
// direction that had already passed its EOF on only watches for an RST.
func (s *Splice) Adopt(c *Conn, state json.RawMessage) error {
	var st spHandoffState
	if err := json.Unmarshal(state, &st); err != nil {
		return fmt.Errorf("splice: adopting connection: reading its state: %w", err)
	}
	if st.Version < 1 || st.Version > spStateVersion {
		return fmt.Errorf("splice: adopting connection: state version %d is not one this agent knows (1 to %d): upgrade to a newer binary, not an older one", st.Version, spStateVersion)
	}
	if st.ClientToBack.EOFSent && st.BackToClient.EOFSent {
		return errors.New("splice: adopting connection: both directions already ended")
	}
	return s.spBegin(c, &st)
}

// spApply sets a new connection up from a detached one's state.
func (st *spHandoffState) spApply(sc *spliceConn) {
	if !st.LastActivity.IsZero() {
		sc.last.Store(int64(st.LastActivity.Sub(sc.s.epoch)))
	}
	sc.fin = st.Fin
	for _, x := range []struct {
		d  *spDir
		ds spDirState
	}{{&sc.c2b, st.ClientToBack}, {&sc.b2c, st.BackToClient}} {
		x.d.bytes.Store(x.ds.Bytes)
		x.d.segs.Store(x.ds.Segments)
		x.d.copyMode = x.d.copyMode || x.ds.Copy
		x.d.pending = x.ds.Pending
		x.d.eofSent = x.ds.EOFSent
		if x.ds.EOFSent {
			sc.dirsDone++
		}
	}
}

// spIdleLeft is the time until the idle timeout of a new connection:
// IdleTimeout, less the time since the last byte for an adopted one.
func (sc *spliceConn) spIdleLeft() time.Duration {
	idle := time.Since(sc.s.epoch) - time.Duration(sc.last.Load())
	return max(sc.c.IdleTimeout-max(idle, 0), 0)
}

// spResume runs first in every direction goroutine: for an adopted
// connection it writes the pending bytes, and sends a direction whose EOF
// was already passed on straight to watching. It reports whether to go on
// moving bytes.
func (d *spDir) spResume() bool {
	if len(d.pending) == 0 && !d.eofSent {
		return true
	}
	if len(d.pending) > 0 {
		d.perr, d.werr = nil, nil
		d.perr = d.dstRC.Write(d.spWritePending)
		if d.perr != nil || d.werr != nil {
			d.spEnd() // a new Detach keeps d.pending; an error tears down
			return false
		}
		d.pending = nil
	}
	if d.eofSent {
		d.spWatch()
		return false
	}
	return true
}

// spWritePending writes d.pending to the destination; false waits for room.
func (d *spDir) spWritePending(fd uintptr) bool {
	n, done := d.spWrite(fd, d.pending)
	d.pending = d.pending[n:]
	return done
}
