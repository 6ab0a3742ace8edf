package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/dataplane"
	"golang.org/x/time/rate"
)

// The proxy's part of a binary upgrade (package upgrade runs the
// protocol, the agent wires the two). The old agent: BeginHandoff,
// ListenerFiles, PauseAccepting, then Detach and Handed batch after batch,
// then CommitListeners or, if the upgrade failed, ResumeHandoff. The new
// agent: Inherit, Open, Adopt each connection, then Start.

// handoffState is the Server's hand-off bookkeeping.
type handoffState struct {
	inflight atomic.Int64 // handshakes between accept and the data plane

	mu        sync.Mutex
	active    bool                // an upgrade runs: reloads are refused
	done      bool                // handed over: nothing to serve any more
	inherited map[string]*os.File // new agent: listening sockets by configured address
	opened    []*socket           // new agent: opened by Open, served by Start
	isOpened  bool
	orphans   map[string]*balance.Pool // backends of adopted connections that are in no pool
	queue     []*Conn                  // old agent: connections to detach next (candidates)
	rejected  map[uint64]bool          // old agent: refused by the new one, not offered again
}

// ListenerFile is a listening socket in a hand-off: the listener's name,
// its configured address (what a configuration matches it by) and a
// duplicate of its descriptor.
type ListenerFile struct {
	Name    string
	Address string
	File    *os.File
}

// Handed is one established connection detached for a hand-off: the
// record the new agent adopts it from, and its two sockets (duplicates
// owned by the holder).
type Handed struct {
	Record  json.RawMessage
	Client  *os.File
	Backend *os.File
	conn    *Conn // the old agent's entry, for Handed and ResumeHandoff
	plane   dataplane.Handoff
	state   json.RawMessage
	idle    time.Duration
}

// handoffRecord is a connection as it travels to the new agent.
type handoffRecord struct {
	ID          uint64          `json:"id"`
	Listener    string          `json:"listener"`
	Route       string          `json:"route"`
	Pool        string          `json:"pool"`
	Backend     string          `json:"backend"`
	Client      netip.AddrPort  `json:"client"`
	Local       netip.AddrPort  `json:"local"`
	BackendTo   netip.AddrPort  `json:"backend_to"`
	BackendFrom netip.AddrPort  `json:"backend_from"`
	Start       time.Time       `json:"start"`
	Upgrade     bool            `json:"upgrade,omitempty"`
	Status      int             `json:"status,omitempty"`
	Handshake   time.Duration   `json:"handshake"`
	Connect     time.Duration   `json:"connect"`
	IdleTimeout time.Duration   `json:"idle_timeout,omitempty"`
	Plane       dataplane.Kind  `json:"plane"`
	State       json.RawMessage `json:"state"`
}

// BeginHandoff starts a hand-off and blocks reloads until ResumeHandoff
// or CommitListeners. Connections on planes that cannot move them
// (TLS-terminated ones: their session state lives in this process) stay
// with this agent, which serves them until they close or its drain
// deadline; stay describes them ("" if none). With strict they refuse the
// hand-off instead (ErrCannotHandOff), and nothing changes.
func (s *Server) BeginHandoff(strict bool) (stay string, err error) {
	s.mu.Lock() // no Reload or Shutdown in between
	defer s.mu.Unlock()
	if s.draining.Load() {
		return "", errors.New("the agent is draining")
	}
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	if s.ho.active || s.ho.done {
		return "", errors.New("an upgrade is already in progress")
	}
	stay = s.unmovable()
	if stay != "" && strict {
		return "", fmt.Errorf("%w: %s; the running agent keeps serving (without --strict they would stay with it until they close or its drain deadline)", ErrCannotHandOff, stay)
	}
	s.ho.active = true
	return stay, nil
}

// unmovable describes the connections on planes that cannot hand over.
func (s *Server) unmovable() string {
	stuck := map[dataplane.Kind]int{}
	for _, c := range s.table.snapshot() {
		if _, ok := c.Plane.(dataplane.Handoff); !ok {
			stuck[c.Plane.Kind()]++
		}
	}
	if len(stuck) == 0 {
		return ""
	}
	var parts []string
	for k, n := range stuck {
		why := "it cannot hand connections to another process"
		switch k {
		case dataplane.KindCopy:
			why = "their TLS session state lives in this process"
		}
		parts = append(parts, fmt.Sprintf("%d on the %s data plane (%s)", n, k, why))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

// ErrCannotHandOff is returned (wrapped) by a strict BeginHandoff when a
// connection is on a data plane that cannot move it.
var ErrCannotHandOff = errors.New("upgrade refused: connections that cannot move to a new process")

// handoffBusy is the reload guard (Reload).
func (s *Server) handoffBusy() error {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	switch {
	case s.ho.done:
		return errors.New("reload: the agent has handed over to a new process")
	case s.ho.active:
		return errors.New("reload: an upgrade is in progress; try again once it has finished")
	}
	return nil
}

// ListenerFiles returns a duplicate of every listening socket, which keeps
// accepting here meanwhile.
func (s *Server) ListenerFiles() ([]ListenerFile, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []ListenerFile
	for addr, sk := range s.listeners {
		f, err := sk.ln.File()
		if err != nil {
			for _, o := range out {
				o.File.Close()
			}
			return nil, fmt.Errorf("duplicating listener %s: %w", addr, err)
		}
		out = append(out, ListenerFile{Name: sk.cur.Load().cfg.Name, Address: addr, File: f})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Address < out[j].Address })
	return out, nil
}

// PauseAccepting stops every accept loop by closing this process's
// listener descriptors — the sockets stay open through the duplicates
// from ListenerFiles, and new clients wait in their backlog — then waits
// for handshakes in progress until ctx ends. A handshake still running
// then establishes its connection here later (Detach hands it over too,
// if its plane can). It returns an id above every connection this Server
// has numbered or will number: the new agent numbers from there
// (ReserveIDs), so ids stay unique across the hand-off.
func (s *Server) PauseAccepting(ctx context.Context) (nextID uint64) {
	defer func() {
		// Each handshake still running takes at most one id.
		nextID = s.ids.Load() + uint64(max(s.ho.inflight.Load(), 0)) + 1
	}()
	s.mu.Lock()
	for _, sk := range s.listeners {
		sk.closed.Store(true)
		sk.ln.Close()
	}
	s.mu.Unlock()
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for s.ho.inflight.Load() > 0 {
		select {
		case <-ctx.Done():
			s.log.Warn("upgrade: handshakes still in progress after the pause", "handshakes", s.ho.inflight.Load())
			return
		case <-t.C:
		}
	}
	return
}

// ReserveIDs makes the ids of new connections start above next (from the
// old agent's PauseAccepting).
func (s *Server) ReserveIDs(next uint64) {
	for {
		cur := s.ids.Load()
		if cur+1 >= next || s.ids.CompareAndSwap(cur, next-1) {
			return
		}
	}
}

// Detach takes up to n established connections, lowest ids first, off
// their data planes (open and untouched) and out of the table. An empty
// result means none is left that can move: connections on planes that
// cannot hand over (a handshake that finished after the pause may have
// put one there) and connections that are closing anyway stay here.
func (s *Server) Detach(n int) ([]*Handed, error) {
	// Candidates that are closing are picked again until they are gone
	// (Done removes them in a moment), so that the caller's loop ends.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		out, tried, err := s.detach(n)
		if len(out) > 0 || tried == 0 || err != nil || time.Now().After(deadline) {
			return out, err
		}
	}
}

// detach is one pass of Detach; tried counts the candidates.
func (s *Server) detach(n int) (out []*Handed, tried int, err error) {
	byPlane := map[dataplane.Handoff][]uint64{}
	conns := map[uint64]*Conn{}
	k := 0
	for _, c := range s.candidates(n) {
		h := c.Plane.(dataplane.Handoff)
		byPlane[h] = append(byPlane[h], c.ID)
		conns[c.ID] = c
		k++
	}
	var errs []error
	for h, ids := range byPlane {
		ds, err := h.Detach(ids)
		if err != nil {
			errs = append(errs, err)
		}
		for _, d := range ds {
			c := conns[d.ID]
			rec, err := json.Marshal(handoffRecord{
				ID: c.ID, Listener: c.Listener, Route: c.Route, Pool: c.Pool, Backend: c.Backend,
				Client: c.Client, Local: c.Local, BackendTo: c.BackendTo, BackendFrom: c.BackendFrom,
				Start: c.Start, Upgrade: c.Upgrade, Status: c.Status, Handshake: c.Handshake, Connect: c.Connect,
				IdleTimeout: d.IdleTimeout, Plane: d.Kind, State: d.State,
			})
			s.table.remove(c.ID)
			ho := &Handed{Record: rec, Client: d.Client, Backend: d.Backend, conn: c, plane: h, state: d.State, idle: d.IdleTimeout}
			if err != nil { // cannot happen: put it back
				errs = append(errs, s.reattach(ho))
				continue
			}
			out = append(out, ho)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].conn.ID < out[j].conn.ID })
	return out, k, errors.Join(errs...)
}

// candidates returns up to n connections to detach next, lowest ids
// first, from a queue filled from the table when it runs dry (one sorted
// snapshot per pass over the table, not one per batch). Connections that
// closed meanwhile are skipped; a closing one left behind comes round
// again in the next pass; one the new agent rejected never does.
func (s *Server) candidates(n int) []*Conn {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	var out []*Conn
	for len(out) < n {
		if len(s.ho.queue) == 0 {
			if len(out) > 0 {
				break // finish this batch before the next pass
			}
			for _, c := range s.table.snapshot() {
				if _, ok := c.Plane.(dataplane.Handoff); ok && !s.ho.rejected[c.ID] {
					s.ho.queue = append(s.ho.queue, c)
				}
			}
			if len(s.ho.queue) == 0 {
				break
			}
		}
		c := s.ho.queue[0]
		s.ho.queue = s.ho.queue[1:]
		if s.table.get(c.ID) == c && !s.ho.rejected[c.ID] {
			out = append(out, c)
		}
	}
	return out
}

// Handed settles a batch the new agent answered for: it serves adopted
// now — this Server lets go of their limiter slots, backend counts and
// files, without reporting a close (the new agent reports it when they
// end) — and rejected go back on their data planes here.
func (s *Server) Handed(adopted, rejected []*Handed) error {
	for _, h := range adopted {
		s.lim.Load().release(h.conn.clientKey)
		h.conn.backend.Release()
		h.Client.Close()
		h.Backend.Close()
	}
	var errs []error
	if len(rejected) > 0 {
		s.ho.mu.Lock()
		if s.ho.rejected == nil {
			s.ho.rejected = map[uint64]bool{}
		}
		for _, h := range rejected {
			s.ho.rejected[h.conn.ID] = true
		}
		s.ho.mu.Unlock()
	}
	for _, h := range rejected {
		if err := s.reattach(h); err != nil {
			errs = append(errs, fmt.Errorf("connection %d: %w", h.conn.ID, err))
		}
	}
	if len(rejected) > 0 {
		s.log.Warn("upgrade: the new agent rejected connections; this agent serves them until they close or its drain deadline", "connections", len(rejected))
	}
	return errors.Join(errs...)
}

// ResumeHandoff undoes a failed upgrade: the connections of the batch in
// flight (hs) go back on their data planes with their own Done (the
// process that was to adopt them is gone, so the sockets have not moved a
// byte elsewhere), every listener accepts again from ls, and all the
// files are closed. A connection that cannot be re-attached is closed and
// reported.
func (s *Server) ResumeHandoff(ls []ListenerFile, hs []*Handed) error {
	var errs []error
	for _, h := range hs {
		if err := s.reattach(h); err != nil {
			errs = append(errs, fmt.Errorf("connection %d: %w", h.conn.ID, err))
		}
	}
	s.mu.Lock()
	for _, l := range ls {
		sk := s.listeners[l.Address]
		if sk == nil || !sk.closed.Load() {
			l.File.Close()
			continue // not paused (Pause never ran)
		}
		ln, err := net.FileListener(l.File)
		l.File.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("listener %s: %w", l.Address, err))
			continue
		}
		nsk := &socket{ln: ln.(*net.TCPListener)}
		nsk.cur.Store(sk.cur.Load())
		s.listeners[l.Address] = nsk
		s.serve(nsk)
	}
	s.mu.Unlock()
	s.ho.mu.Lock()
	s.ho.active, s.ho.queue, s.ho.rejected = false, nil, nil
	s.ho.mu.Unlock()
	return errors.Join(errs...)
}

func (s *Server) reattach(h *Handed) error {
	defer h.Client.Close()
	defer h.Backend.Close()
	c := h.conn
	cl, be, err := fileConns(h.Client, h.Backend)
	if err != nil {
		return err
	}
	lim, key := s.lim.Load(), c.clientKey
	var once sync.Once
	release := func() { once.Do(func() { lim.release(key) }) }
	dc := &dataplane.Conn{ID: c.ID, Client: cl, Backend: be, IdleTimeout: h.idle,
		Done: func(r dataplane.Result) { s.closed(c, r, release) }}
	s.table.add(c)
	if err := h.plane.Adopt(dc, h.state); err != nil {
		s.table.remove(c.ID)
		cl.SetLinger(0)
		be.SetLinger(0)
		cl.Close()
		be.Close()
		s.closed(c, dataplane.Result{Reason: dataplane.ReasonError, Err: err}, release)
		return err
	}
	return nil
}

// CommitListeners ends a committed upgrade: the new agent accepts on the
// listening sockets, so this Server forgets them and closes its files.
// Shutdown then only drains what stayed here (handshakes that finished
// after the pause, connections the new agent rejected).
func (s *Server) CommitListeners(ls []ListenerFile) {
	s.mu.Lock()
	for _, l := range ls {
		l.File.Close()
		delete(s.listeners, l.Address)
	}
	s.mu.Unlock()
	s.ho.mu.Lock()
	s.ho.active, s.ho.done, s.ho.queue, s.ho.rejected = false, true, nil, nil
	s.ho.mu.Unlock()
}

// Inherit gives a new agent the old one's listening sockets: Open (or
// Start) uses them for the listeners configured at the same address
// instead of binding, and closes those no listener uses any more.
func (s *Server) Inherit(ls []ListenerFile) {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	s.ho.inherited = map[string]*os.File{}
	for _, l := range ls {
		s.ho.inherited[l.Address] = l.File
	}
}

// listen opens the socket of lc: an inherited one when there is one for
// its address, else a new one (Listen).
func (s *Server) listen(lc config.Listener) (*net.TCPListener, error) {
	s.ho.mu.Lock()
	f := s.ho.inherited[lc.Address]
	delete(s.ho.inherited, lc.Address)
	s.ho.mu.Unlock()
	if f == nil {
		return Listen(lc.Address, lc.Backlog)
	}
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("listener %s: inherited socket: %w", lc.Address, err)
	}
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		ln.Close()
		return nil, fmt.Errorf("listener %s: inherited socket is not TCP", lc.Address)
	}
	return tl, nil
}

// Open opens every configured listener — inherited sockets first — without
// accepting: Start accepts on them. On error nothing is left open.
func (s *Server) Open() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.state.Load()
	opened, err := s.open(st.cfg.Listeners, st)
	if err != nil {
		return err
	}
	s.ho.mu.Lock()
	s.ho.opened, s.ho.isOpened = opened, true
	s.ho.mu.Unlock()
	s.closeInherited()
	return nil
}

// openForStart is Start's source of sockets: those Open prepared, or new
// ones.
func (s *Server) openForStart(st *state) ([]*socket, error) {
	s.ho.mu.Lock()
	opened, ok := s.ho.opened, s.ho.isOpened
	s.ho.opened, s.ho.isOpened = nil, false
	s.ho.mu.Unlock()
	if ok {
		return opened, nil
	}
	defer s.closeInherited()
	return s.open(st.cfg.Listeners, st)
}

// closeInherited closes inherited sockets no listener took: the old agent
// listened there, this configuration does not.
func (s *Server) closeInherited() {
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	for addr, f := range s.ho.inherited {
		s.log.Info("inherited listener closed: not in this configuration", "address", addr)
		f.Close()
	}
	s.ho.inherited = nil
}

// Abandon closes what Inherit and Open prepared, for a new agent that gives
// up before Start.
func (s *Server) Abandon() {
	s.ho.mu.Lock()
	opened := s.ho.opened
	s.ho.opened, s.ho.isOpened = nil, false
	s.ho.mu.Unlock()
	for _, sk := range opened {
		sk.ln.Close()
	}
	s.closeInherited()
}

func (s *Server) adopter(k dataplane.Kind) (dataplane.Handoff, error) {
	for _, p := range []dataplane.Plane{s.planes.Splice, s.planes.Sockmap} {
		if p == nil || p.Kind() != k {
			continue
		}
		if h, ok := p.(dataplane.Handoff); ok {
			return h, nil
		}
		return nil, fmt.Errorf("the %s data plane cannot adopt connections", k)
	}
	return nil, fmt.Errorf("no %s data plane in this agent", k)
}

// Adopt takes over one connection handed over by the old agent: the
// connection table gets its entry (same id, start time, route, backend),
// the limits and the backend count it, and its data plane resumes it. The
// files are closed in every case (the plane holds its own descriptors).
// On error nothing touched the sockets: the old agent takes it back.
func (s *Server) Adopt(record json.RawMessage, client, backend *os.File) error {
	defer client.Close()
	defer backend.Close()
	var r handoffRecord
	if err := json.Unmarshal(record, &r); err != nil {
		return fmt.Errorf("connection record: %w", err)
	}
	plane, err := s.adopter(r.Plane)
	if err != nil {
		return fmt.Errorf("connection %d: %w", r.ID, err)
	}
	cl, be, err := fileConns(client, backend)
	if err != nil {
		return fmt.Errorf("connection %d: %w", r.ID, err)
	}
	b, err := s.adoptBackend(r.Pool, r.Backend)
	if err != nil {
		cl.Close()
		be.Close()
		return fmt.Errorf("connection %d: %w", r.ID, err)
	}
	lim := s.lim.Load()
	key := lim.adopt(r.Client.Addr(), time.Now())
	conn := &Conn{
		ID: r.ID, Listener: r.Listener, Route: r.Route, Pool: r.Pool, Backend: r.Backend,
		Client: r.Client, Local: r.Local, BackendTo: r.BackendTo, BackendFrom: r.BackendFrom,
		Start: r.Start, Upgrade: r.Upgrade, Status: r.Status, Handshake: r.Handshake, Connect: r.Connect,
		Plane: plane, backend: b, clientKey: key,
	}
	var once sync.Once
	release := func() { once.Do(func() { lim.release(key) }) }
	// New connections get ids above every adopted one.
	for {
		cur := s.ids.Load()
		if cur >= r.ID || s.ids.CompareAndSwap(cur, r.ID) {
			break
		}
	}
	dc := &dataplane.Conn{ID: r.ID, Client: cl, Backend: be, IdleTimeout: r.IdleTimeout,
		Done: func(res dataplane.Result) { s.closed(conn, res, release) }}
	s.table.add(conn)
	if err := plane.Adopt(dc, r.State); err != nil {
		// Nothing moved: closing these descriptors leaves the sockets to
		// the old agent, which takes the connection back.
		s.table.remove(r.ID)
		release()
		b.Release()
		cl.Close()
		be.Close()
		return fmt.Errorf("connection %d: %w", r.ID, err)
	}
	return nil
}

// adoptBackend counts an adopted connection on its backend: the pool's
// backend of that address, or — when a new configuration dropped it — a
// stand-in outside every pool, so the connection is still counted and
// released like any other.
func (s *Server) adoptBackend(pool, addr string) (*balance.Backend, error) {
	if p := s.state.Load().pools[pool]; p != nil {
		for _, b := range p.Backends() {
			if b.Address() == addr {
				b.Acquire()
				return b, nil
			}
		}
	}
	s.ho.mu.Lock()
	defer s.ho.mu.Unlock()
	key := pool + "/" + addr
	op := s.ho.orphans[key]
	if op == nil {
		var err error
		if op, err = balance.NewPool("handed-over:"+pool, []balance.BackendSpec{{Address: addr, Down: true}}, balance.Options{}); err != nil {
			return nil, err
		}
		if s.ho.orphans == nil {
			s.ho.orphans = map[string]*balance.Pool{}
		}
		s.ho.orphans[key] = op
	}
	b := op.Backends()[0]
	b.Acquire()
	return b, nil
}

// fileConns makes the two sockets of a connection from handed-over files
// (duplicating the descriptors; the files stay the caller's).
func fileConns(client, backend *os.File) (*net.TCPConn, *net.TCPConn, error) {
	var out [2]*net.TCPConn
	for i, f := range []*os.File{client, backend} {
		c, err := net.FileConn(f)
		if err == nil {
			tc, ok := c.(*net.TCPConn)
			if !ok {
				c.Close()
				err = fmt.Errorf("descriptor is a %T, not a TCP socket", c)
			}
			out[i] = tc
		}
		if err != nil {
			if out[0] != nil && i == 1 {
				out[0].Close()
			}
			return nil, nil, err
		}
	}
	return out[0], out[1], nil
}

// adopt counts a connection handed over from the old agent: like admit,
// but never refused — the connection exists already.
func (l *limiter) adopt(a netip.Addr, now time.Time) netip.Addr {
	k := l.key(a)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total++
	st := l.perAddr[k]
	if st == nil && (l.perIP > 0 || l.perIPRate > 0) {
		st = &ipState{}
		if l.perIPRate > 0 {
			st.bucket = rate.NewLimiter(l.perIPRate, l.perIPBurst)
		}
		l.perAddr[k] = st
	}
	if st != nil {
		st.conns++
		st.lastUse = now
	}
	return k
}
