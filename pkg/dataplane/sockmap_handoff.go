package dataplane

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// The sockmap plane's part of a binary upgrade. Its sockets never leave
// the BPF maps: taking a socket out of the verdict map and putting it back
// loses order (DESIGN.md fact 14), and a delete outside the socket lock
// loses skbs (fact 15). Instead the new agent takes over the maps
// themselves:
//
//  1. Export, at the start of the hand-off: the old plane gives
//     duplicates of its map descriptors and of the verdict attachment (the
//     BPF link), which travel to the new process with SCM_RIGHTS ahead of
//     everything else (no bpffs pin, so nothing is left behind if either
//     process dies, and nothing to mount in a container), and stops
//     reading the activity ring, which the new plane reads from its start
//     (two readers of one ring would corrupt its consumer position): the
//     old plane scans every smExportScan instead.
//  2. The new agent's NewSockmap with Inherit uses those maps and the
//     attachment as they are (it loads only its own demotion iterator),
//     so the program keeps redirecting every socket throughout.
//  3. Detach, batch after batch: a connection on the kernel path is only
//     forgotten here — its epoll registration and descriptors go, its
//     sockets stay in both maps and its per-socket counters in the socks
//     map — and the state carries the baselines that turn those counters
//     into per-connection numbers. Forwarding does not pause. A demotion
//     in progress continues in the new plane from where it is (queued:
//     the new plane runs the iter/tcp pass; draining: it waits for the
//     parked bytes and checks them), connections already demoted move
//     with the fallback's own Detach, and a half-closed one the loop was
//     finishing in userspace moves as a splice connection with its
//     buffered bytes. Connections closing anyway finish here.
//  4. Adopt checks that the sockets are the state's (socket cookies) and
//     are in this plane's maps, and registers them with EPOLLRDHUP|EPOLLET:
//     the ADD reports a FIN that arrived during the hand-off, and a first
//     poll recomputes parked bytes and forwards it.
//
// A failed upgrade undoes itself through the same calls: the old plane
// adopts its own detached connections back, and Unexport resumes reading
// the ring once the new process is gone.

// smHandoffABI names what the maps mean to the program and the agent:
// the layouts (checked separately with MapSpec.Compatible) and the
// semantics (sock_state counters, demote states, the verdict program's
// behaviour). Raise it when they change: an agent then refuses the old
// agent's objects, loads its own, and the old agent's kernel-path
// connections are rejected and stay with it until they close.
const smHandoffABI = 1

// smExportScan is how often an exported plane scans its connections for
// activity, since it no longer reads the activity ring.
const smExportScan = 50 * time.Millisecond

// smObjects are the exported objects, in order. The last one is the
// verdict attachment: "verdict_link" (a BPF link) or "verdict_prog" (the
// program, attached with the legacy PROG_ATTACH, kernels before 6.10).
var smObjects = []string{
	sockmapMapVerdictMap, sockmapMapTargetMap, sockmapMapSocks,
	sockmapMapDemote, sockmapMapEvents, sockmapMapTotals,
}

// smExportMeta describes exported objects (SockmapExport.Meta).
type smExportMeta struct {
	ABI       int      `json:"abi"`
	Step      uint64   `json:"step"`
	RawAttach bool     `json:"raw_attach,omitempty"`
	Objects   []string `json:"objects"`
}

// SockmapExport is a plane's BPF objects on their way to a new agent
// process: send Files (SCM_RIGHTS) and Meta; the new process passes both
// to InheritSockmap. The caller closes Files once they are sent.
type SockmapExport struct {
	Files []*os.File
	meta  smExportMeta
}

// Meta describes Files for InheritSockmap.
func (e *SockmapExport) Meta() json.RawMessage {
	b, _ := json.Marshal(e.meta) // plain types: cannot fail
	return b
}

// Close closes the files (the process that received them has its own).
func (e *SockmapExport) Close() {
	for _, f := range e.Files {
		f.Close()
	}
}

// Export prepares the plane's BPF objects for a new agent process (see
// above) and stops reading the activity ring. The plane serves on as
// before. Unexport undoes it when the upgrade fails; after a committed
// one the plane stays exported until it closes. One export at a time.
func (s *Sockmap) Export() (*SockmapExport, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return nil, ErrSockmapClosed
	}
	if s.exported {
		return nil, errors.New("sockmap: the BPF objects are already exported")
	}
	o := &s.bpf.objs
	maps := []*ebpf.Map{o.VerdictMap, o.TargetMap, o.Socks, o.Demote, o.Events, o.Totals}
	e := &SockmapExport{meta: smExportMeta{ABI: smHandoffABI, Step: s.step, RawAttach: s.bpf.rawAtt}}
	fail := func(err error) (*SockmapExport, error) {
		e.Close()
		return nil, fmt.Errorf("sockmap: exporting BPF objects: %w", err)
	}
	add := func(name string, fd int) error {
		f, err := smDupFile(fd, "bpf:"+name)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		e.Files = append(e.Files, f)
		e.meta.Objects = append(e.meta.Objects, name)
		return nil
	}
	for i, m := range maps {
		if err := add(smObjects[i], m.FD()); err != nil {
			return fail(err)
		}
	}
	if s.bpf.rawAtt {
		if err := add("verdict_prog", o.WspliceVerdict.FD()); err != nil {
			return fail(err)
		}
	} else {
		fl, ok := s.bpf.verdict.(interface{ FD() int })
		if !ok {
			return fail(fmt.Errorf("verdict link %T has no descriptor", s.bpf.verdict))
		}
		if err := add("verdict_link", fl.FD()); err != nil {
			return fail(err)
		}
	}
	s.exported = true
	s.bpf.shared = true
	s.ep.del(o.Events.FD())
	return e, nil
}

// Unexport resumes reading the activity ring after a failed upgrade. The
// process the objects were exported to must be gone.
func (s *Sockmap) Unexport() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.exported {
		return
	}
	s.exported = false
	if err := s.ep.add(s.bpf.objs.Events.FD(), unix.EPOLLIN, epTagRing); err != nil {
		// Activity is still found by the scan, only later.
		s.log.Error("sockmap: watching the activity ring again after a failed upgrade", "err", err)
	}
	s.ep.poke()
}

// InheritedSockmap is a running agent's sockmap objects, inherited by a
// new agent process during an upgrade; see SockmapOptions.Inherit.
type InheritedSockmap struct {
	meta    smExportMeta
	maps    map[string]*ebpf.Map
	verdict link.Link     // or
	prog    *ebpf.Program // with meta.RawAttach
}

// Close releases the objects (when no plane took them).
func (h *InheritedSockmap) Close() {
	if h == nil {
		return
	}
	for _, m := range h.maps {
		m.Close()
	}
	if h.verdict != nil {
		h.verdict.Close()
	}
	h.prog.Close()
}

// InheritSockmap takes over a running agent's exported objects, received
// in a hand-off: meta is SockmapExport.Meta, files its Files (owned from
// here on, closed on error). An error says why they cannot be used;
// objects of another hand-off ABI are refused.
func InheritSockmap(meta json.RawMessage, files []*os.File) (*InheritedSockmap, error) {
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = -1
		if fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 3); err == nil {
			fds[i] = fd
		}
		f.Close()
	}
	var m smExportMeta
	if err := json.Unmarshal(meta, &m); err != nil {
		for _, fd := range fds {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
		return nil, fmt.Errorf("sockmap: inherited objects: description: %w", err)
	}
	return inheritSockmap(m, fds)
}

// inheritSockmap wraps fds (owned from here on) as the objects m names.
func inheritSockmap(m smExportMeta, fds []int) (_ *InheritedSockmap, err error) {
	h := &InheritedSockmap{meta: m, maps: map[string]*ebpf.Map{}}
	used := make([]bool, len(fds))
	defer func() {
		if err != nil {
			h.Close()
			for i, fd := range fds {
				if !used[i] && fd >= 0 {
					unix.Close(fd)
				}
			}
			err = fmt.Errorf("sockmap: inherited objects: %w", err)
		}
	}()
	if len(fds) != len(m.Objects) || len(fds) != len(smObjects)+1 {
		return nil, fmt.Errorf("%d descriptors for %d objects, want %d", len(fds), len(m.Objects), len(smObjects)+1)
	}
	for i, name := range smObjects {
		if m.Objects[i] != name {
			return nil, fmt.Errorf("object %d is %q, want %q", i, m.Objects[i], name)
		}
	}
	for _, fd := range fds {
		if fd < 3 {
			return nil, fmt.Errorf("descriptor %d is not a received one", fd)
		}
	}
	for i, fd := range fds {
		unix.CloseOnExec(fd)
		used[i] = true
		name := m.Objects[i]
		if i < len(smObjects) {
			mp, err := ebpf.NewMapFromFD(fd)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
			h.maps[name] = mp
			continue
		}
		switch {
		case name == "verdict_link" && !m.RawAttach:
			if h.verdict, err = link.NewFromFD(fd); err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
		case name == "verdict_prog" && m.RawAttach:
			if h.prog, err = ebpf.NewProgramFromFD(fd); err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
		default:
			unix.Close(fd)
			return nil, fmt.Errorf("unexpected object %q", name)
		}
	}
	// Checked last, so that the descriptors are closed either way.
	if m.ABI != smHandoffABI {
		return nil, fmt.Errorf("the running agent's BPF objects are of hand-off ABI %d, this binary's %d: its kernel-path connections stay with it until they close", m.ABI, smHandoffABI)
	}
	if m.Step == 0 {
		return nil, errors.New("activity step 0")
	}
	return h, nil
}

// smLoadInherited loads this binary's demotion iterator against the
// inherited maps and keeps the inherited verdict attachment: the running
// program is the old agent's, and it keeps redirecting. The maps must be
// what this binary's program expects (type, key and value sizes).
func smLoadInherited(spec *ebpf.CollectionSpec, inh *InheritedSockmap) (*smBPF, error) {
	defer inh.Close() // the loaded objects hold their own duplicates
	size := inh.maps[sockmapMapVerdictMap].MaxEntries()
	for _, name := range []string{sockmapMapVerdictMap, sockmapMapTargetMap, sockmapMapSocks} {
		spec.Maps[name].MaxEntries = size
	}
	var objs struct {
		sockmapMaps
		Demote *ebpf.Program `ebpf:"wsplice_demote"`
	}
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: inh.maps}); err != nil {
		return nil, fmt.Errorf("loading the demotion iterator against the inherited maps: %w", err)
	}
	b := &smBPF{shared: true, rawAtt: inh.meta.RawAttach}
	b.objs.sockmapMaps = objs.sockmapMaps
	b.objs.WspliceDemote = objs.Demote
	if inh.meta.RawAttach {
		b.objs.WspliceVerdict, inh.prog = inh.prog, nil
	} else {
		b.verdict, inh.verdict = inh.verdict, nil
	}
	if err := b.attachIterAndRing(); err != nil {
		return nil, err
	}
	return b, nil
}

var _ Handoff = (*Sockmap)(nil)

// smStateVersion is the version of smHandoffState this code writes; Adopt
// accepts it and every older one.
const smStateVersion = 1

// smHandoffState is a sockmap connection's Detached.State: either a
// connection on the kernel path (its sockets still in the maps) or, in
// Demoted, one that lives on the fallback plane.
type smHandoffState struct {
	Version int `json:"v"`
	// Kernel path. Cookies identify the sockets and key every map.
	Cookies [2]uint64    `json:"cookies,omitempty"`
	RxBase  [2]uint64    `json:"rx_base"`
	TxBase  [2]uint64    `json:"tx_base"`
	Pre     [2]Direction `json:"pre"`
	Last    [2]uint64    `json:"last"`
	// CLOCK_MONOTONIC stamps, valid in any process on the host.
	StartNs int64   `json:"start_ns"`
	SeenNs  int64   `json:"seen_ns,omitempty"`
	PhaseAt int64   `json:"phase_at,omitempty"`
	Phase   string  `json:"phase"` // "live", "queued" (demotion) or "draining"
	Reason  string  `json:"reason,omitempty"`
	Fin     [2]bool `json:"fin"`     // FIN received from the side
	Shut    [2]bool `json:"shut"`    // the side's socket shut for writing
	Verdict [2]bool `json:"verdict"` // the side's socket is in the verdict map
	First   int8    `json:"first"`   // side whose FIN came first, -1 none
	// Demoted: the connection is on the fallback plane; Splice is its
	// state there, Base what the kernel path moved before.
	Demoted *smDemotedState `json:"demoted,omitempty"`
}

type smDemotedState struct {
	Base   Stats           `json:"base"`
	Splice json.RawMessage `json:"splice"`
}

var smPhaseNames = map[smPhase]string{smLive: "live", smQueued: "queued", smDraining: "draining"}

// Detach takes connections off the plane for a hand-off (Handoff.Detach);
// see the top of this file. Connections on the kernel path never stop
// moving.
func (s *Sockmap) Detach(ids []uint64) ([]Detached, error) {
	var out []Detached
	var errs []error
	var demoted []uint64
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return nil, nil
	}
	for _, id := range ids {
		c := s.conns[id]
		if c == nil {
			if _, ok := s.demoted[id]; ok {
				demoted = append(demoted, id)
			}
			continue
		}
		var d Detached
		var err error
		switch c.phase {
		case smLive, smQueued, smDraining:
			d, err = s.detachKernel(c)
		case smFinish:
			d, err = s.detachFinish(c)
		default: // closing: finishes here
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("connection %d: %w", id, err))
			continue
		}
		out = append(out, d)
	}
	s.mu.Unlock()
	if len(demoted) > 0 {
		ds, err := s.detachDemoted(demoted)
		out = append(out, ds...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	return out, errors.Join(errs...)
}

// smDupFile duplicates fd (close-on-exec) as a file named name: what a
// hand-off sends, while the plane keeps its own descriptor.
func smDupFile(fd int, name string) (*os.File, error) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(dup), name), nil
}

// smDupFiles duplicates c's two descriptors as files for a Detached.
func smDupFiles(c *smConn) (cl, be *os.File, err error) {
	var fs [2]*os.File
	for i := range 2 {
		if fs[i], err = smDupFile(c.fd[i], smSide(i)); err != nil {
			if fs[0] != nil {
				fs[0].Close()
			}
			return nil, nil, fmt.Errorf("duplicating the %s socket: %w", smSide(i), err)
		}
	}
	return fs[0], fs[1], nil
}

// detachKernel lets go of a connection whose sockets stay in the maps.
// Called under mu.
func (s *Sockmap) detachKernel(c *smConn) (Detached, error) {
	st := smHandoffState{
		Version: smStateVersion, Cookies: c.cookie, RxBase: c.rxBase, TxBase: c.txBase,
		Pre: c.pre, Last: c.last, StartNs: c.startNs, SeenNs: c.seenNs, PhaseAt: c.phaseAt,
		Phase: smPhaseNames[c.phase], Reason: c.reason, First: c.first,
	}
	for i := range 2 {
		st.Fin[i] = c.flags&smFin(i) != 0
		st.Shut[i] = c.flags&smShut(i) != 0
		st.Verdict[i] = c.flags&smVerdict(i) != 0
	}
	state, err := json.Marshal(st)
	if err != nil {
		return Detached{}, err
	}
	cl, be, err := smDupFiles(c)
	if err != nil {
		return Detached{}, err
	}
	if c.phase == smQueued {
		// Not yet (or not completely) out of the verdict map: the adopter
		// queues the demotion again. A pending request left in the demote
		// map could be carried out by a pass of either process; the
		// adopter's pass then finds the socket already out, which is fine.
		for i := range 2 {
			_ = s.bpf.objs.Demote.Delete(c.cookie[i])
		}
	}
	s.forget(c)
	return Detached{ID: c.id, Kind: KindSockmap, Client: cl, Backend: be, IdleTimeout: c.idle, State: state}, nil
}

// forget drops the plane's hold on c: its descriptors (the sockets stay
// open while another process holds them), epoll registrations and
// bookkeeping, not its entries in the maps. Called under mu.
func (s *Sockmap) forget(c *smConn) {
	for i := range 2 {
		if c.fd[i] >= 0 {
			s.ep.del(c.fd[i])
			unix.Close(c.fd[i])
			c.fd[i] = -1
		}
		delete(s.byCookie, c.cookie[i])
	}
	delete(s.conns, c.id)
	delete(s.hot, c)
	if c.buf != nil {
		smBufPool.Put(c.buf)
		c.buf = nil
	}
	c.phase = smClosing // a queued demotion or copy step skips it
}

// detachFinish hands over a half-closed connection the loop was finishing
// in userspace (out of both maps): to the adopter it is a demoted
// connection on the fallback, one direction ended, the other with the
// bytes the loop had read and not written. Called under mu.
func (s *Sockmap) detachFinish(c *smConn) (Detached, error) {
	var st [2]sockmapSockState
	for i := range 2 {
		_ = s.bpf.objs.Socks.Lookup(c.cookie[i], &st[i])
	}
	base := c.stats(&st)
	base.Plane = s.opts.Fallback.Kind()
	src := int(c.fdir)
	dirs := [2]spDirState{}
	dirs[1-src].EOFSent = true // its FIN was forwarded: socket src is shut
	if c.buf != nil && c.bufLo < c.bufHi {
		dirs[src].Pending = append([]byte(nil), (*c.buf)[c.bufLo:c.bufHi]...)
	}
	sp := spHandoffState{Version: spStateVersion, LastActivity: base.LastActivity,
		ClientToBack: dirs[0], BackToClient: dirs[1]}
	switch c.first {
	case 0:
		sp.Fin = ReasonClientFIN
	case 1:
		sp.Fin = ReasonBackendFIN
	}
	spState, err := json.Marshal(sp)
	if err != nil {
		return Detached{}, err
	}
	state, err := json.Marshal(smHandoffState{Version: smStateVersion,
		Demoted: &smDemotedState{Base: base, Splice: spState}})
	if err != nil {
		return Detached{}, err
	}
	cl, be, err := smDupFiles(c)
	if err != nil {
		return Detached{}, err
	}
	for i := range 2 {
		_ = s.bpf.objs.Socks.Delete(c.cookie[i])
		_ = s.bpf.objs.Demote.Delete(c.cookie[i])
	}
	s.forget(c)
	return Detached{ID: c.id, Kind: KindSockmap, Client: cl, Backend: be, IdleTimeout: c.idle, State: state}, nil
}

// detachDemoted detaches demoted connections through the fallback's own
// Detach and wraps their state with what the kernel path moved.
func (s *Sockmap) detachDemoted(ids []uint64) ([]Detached, error) {
	h, ok := s.opts.Fallback.(Handoff)
	if !ok {
		return nil, fmt.Errorf("sockmap: %d demoted connections cannot move: the %s fallback cannot hand connections over", len(ids), s.opts.Fallback.Kind())
	}
	ds, err := h.Detach(ids)
	out := ds[:0]
	for _, d := range ds {
		s.mu.Lock()
		dm := s.demoted[d.ID]
		delete(s.demoted, d.ID)
		s.mu.Unlock()
		if dm == nil {
			dm = &smDemoted{} // cannot happen: it was demoted here
		}
		// Its Done will not run here: settle what it would have.
		s.demotedWG.Done()
		state, merr := json.Marshal(smHandoffState{Version: smStateVersion,
			Demoted: &smDemotedState{Base: dm.base, Splice: d.State}})
		if merr != nil { // cannot happen: plain types
			err = errors.Join(err, merr)
		}
		d.Kind = KindSockmap
		d.State = state
		out = append(out, d)
	}
	return out, err
}

// Adopt resumes a connection detached by a sockmap plane of this or an
// earlier agent process (Handoff.Adopt). A kernel-path connection must be
// in this plane's maps: the plane was made with Inherit from the old
// agent's objects (or is that agent's own plane, taking a connection back
// after a failed upgrade).
func (s *Sockmap) Adopt(c *Conn, state json.RawMessage) error {
	if c == nil || c.Client == nil || c.Backend == nil || c.Done == nil {
		return errors.New("sockmap: Adopt needs Client, Backend and Done")
	}
	var st smHandoffState
	if err := json.Unmarshal(state, &st); err != nil {
		return fmt.Errorf("sockmap: adopting connection: reading its state: %w", err)
	}
	if st.Version < 1 || st.Version > smStateVersion {
		return fmt.Errorf("sockmap: adopting connection: state version %d is not one this agent knows (1 to %d): upgrade to a newer binary, not an older one", st.Version, smStateVersion)
	}
	if st.Demoted != nil {
		return s.adoptDemoted(c, st.Demoted)
	}
	return s.adoptKernel(c, &st)
}

// reserve checks that id is new here and holds off Close until the
// adoption is done (release).
func (s *Sockmap) reserve(id uint64) (release func(), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return nil, ErrSockmapClosed
	}
	_, live := s.conns[id]
	_, dem := s.demoted[id]
	if live || dem {
		return nil, fmt.Errorf("sockmap: connection id %d already started", id)
	}
	s.startWG.Add(1)
	return s.startWG.Done, nil
}

func (s *Sockmap) adoptDemoted(c *Conn, ds *smDemotedState) error {
	h, ok := s.opts.Fallback.(Handoff)
	if !ok {
		return fmt.Errorf("sockmap: adopting a demoted connection: the %s fallback cannot adopt connections", s.opts.Fallback.Kind())
	}
	release, err := s.reserve(c.ID)
	if err != nil {
		return err
	}
	defer release()
	d := &smDemoted{base: ds.Base}
	s.mu.Lock()
	s.demoted[c.ID] = d
	s.mu.Unlock()
	s.demotedWG.Add(1)
	err = h.Adopt(&Conn{ID: c.ID, Client: c.Client, Backend: c.Backend, IdleTimeout: c.IdleTimeout,
		Done: s.demotedDone(c.ID, d, c.Done)}, ds.Splice)
	if err != nil {
		s.mu.Lock()
		delete(s.demoted, c.ID)
		s.mu.Unlock()
		s.demotedWG.Done()
		return fmt.Errorf("sockmap: adopting a demoted connection: %w", err)
	}
	return nil
}

// demotedDone is the Done a demoted connection has on the fallback: it
// adds the kernel path's counters and forgets the connection here.
func (s *Sockmap) demotedDone(id uint64, d *smDemoted, done func(Result)) func(Result) {
	return func(r Result) {
		r.Stats = d.merge(r.Stats)
		s.mu.Lock()
		delete(s.demoted, id)
		s.mu.Unlock()
		done(r)
		s.demotedWG.Done()
	}
}

func (s *Sockmap) adoptKernel(c *Conn, st *smHandoffState) (err error) {
	phase := smLive
	switch st.Phase {
	case "live":
	case "queued":
		phase = smQueued
	case "draining":
		phase = smDraining
	default:
		return fmt.Errorf("sockmap: adopting connection: unknown phase %q", st.Phase)
	}
	release, err := s.reserve(c.ID)
	if err != nil {
		return err
	}
	defer release()
	sc := &smConn{id: c.ID, fd: [2]int{-1, -1}, idle: c.IdleTimeout, done: c.Done, first: st.First,
		cookie: st.Cookies, rxBase: st.RxBase, txBase: st.TxBase, pre: st.Pre, last: st.Last,
		startNs: st.StartNs, seenNs: st.SeenNs, phaseAt: st.PhaseAt, reason: st.Reason}
	defer func() {
		if err != nil {
			for _, fd := range sc.fd {
				if fd >= 0 {
					unix.Close(fd)
				}
			}
		}
	}()
	for i, conn := range [2]*net.TCPConn{c.Client, c.Backend} {
		if sc.fd[i], err = smDupConn(conn); err != nil {
			return fmt.Errorf("sockmap: adopting the %s socket: %w", smSide(i), err)
		}
		cookie, err := unix.GetsockoptUint64(sc.fd[i], unix.SOL_SOCKET, unix.SO_COOKIE)
		if err != nil {
			return fmt.Errorf("sockmap: adopting the %s socket: SO_COOKIE: %w", smSide(i), err)
		}
		if cookie != st.Cookies[i] {
			return fmt.Errorf("sockmap: adopting connection: the %s socket has cookie %d, its state says %d", smSide(i), cookie, st.Cookies[i])
		}
		if ino, err := smNetnsIno(sc.fd[i]); err != nil || ino != s.nsIno {
			return fmt.Errorf("sockmap: adopting connection: %w (%s socket)", errors.Join(ErrSockmapNetns, err), smSide(i))
		}
		// Its sockets must be in this plane's maps: the ones this plane
		// inherited from the agent that detached it.
		var ss sockmapSockState
		var v uint64
		if err := s.bpf.objs.Socks.Lookup(cookie, &ss); err != nil {
			return fmt.Errorf("sockmap: adopting connection: the %s socket is not in this agent's BPF maps (%v): this agent did not inherit the running agent's objects", smSide(i), err)
		}
		if err := s.bpf.objs.TargetMap.Lookup(cookie, &v); err != nil {
			return fmt.Errorf("sockmap: adopting connection: the %s socket is not in the target map: %w", smSide(i), err)
		}
		if st.Fin[i] {
			sc.flags |= smFin(i)
		}
		if st.Shut[i] {
			sc.flags |= smShut(i)
		}
		if st.Verdict[i] {
			sc.flags |= smVerdict(i)
		}
	}
	sc.phase = phase
	s.register(sc, c, true)
	return nil
}
