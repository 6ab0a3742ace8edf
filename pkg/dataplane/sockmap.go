package dataplane

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -type sock_state -go-package dataplane sockmap ../../bpf/sockmap.c -- -I../../bpf -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// SockmapOptions configures NewSockmap. Zero values select the defaults.
type SockmapOptions struct {
	// MaxConns sizes the BPF maps: at most this many connections can be on
	// the kernel path at once (two sockets each). Default 65536. A Start
	// beyond it returns ErrSockmapFull and the caller falls back to splice.
	MaxConns int
	// ParkedHighWater demotes a connection to Fallback when the bytes
	// redirected in one direction but not yet queued into the receiving
	// socket exceed it (DESIGN.md "Adaptive data plane"). The kernel applies
	// no backpressure on this path (fact 5), so this is what bounds memory:
	// a quiet connection is looked at after at most min(ParkedHighWater/4,
	// 1 MiB) redirected bytes, so the bound is about this plus 1 MiB plus
	// rate × PollInterval (plus what arrives while the demotion drains).
	// Default 4 MiB; negative disables parked demotion (unsafe with slow
	// readers).
	ParkedHighWater int64
	// RateLimit demotes a connection whose bytes/s in either direction,
	// measured over 50 ms while it is busy, exceed it: bulk flows get
	// TCP flow control and full splice throughput. 0 disables it.
	RateLimit int64
	// PollInterval is how often busy connections are checked for parked
	// bytes, FIN propagation and demotion. Idle connections are not polled:
	// the verdict program reports each socket every ParkedHighWater/4
	// bytes (64 KiB to 1 MiB; with RateLimit, at most RateLimit/100)
	// through a ring buffer, and a connection is polled only from such a
	// report until it is quiet again. Default 5ms.
	PollInterval time.Duration
	// RcvBuf is set as SO_RCVBUF on both sockets at insertion, so that a
	// demoted connection's receive queue (and so its TCP window) is
	// bounded. Default 1 MiB; negative leaves the socket's own.
	RcvBuf int
	// Fallback receives demoted connections (the splice plane). Required.
	Fallback Plane
	// Logger receives integrity resets, demotion failures and BPF errors.
	// Nil discards them.
	Logger *slog.Logger
	// Inherit makes the plane use the BPF objects of a running agent
	// (InheritSockmap, during a binary upgrade) instead of loading its
	// own, so the connections it hands over can be adopted without their
	// sockets leaving the maps. The map sizes and activity step are the
	// old agent's; MaxConns is ignored. The plane owns Inherit from here
	// on, also on error.
	Inherit *InheritedSockmap
}

// Demotion reasons, the values of Stats.DemoteReason.
const (
	DemoteParked = "parked" // parked bytes passed ParkedHighWater
	DemoteRate   = "rate"   // a direction passed RateLimit
	DemoteInsert = "insert" // a FIN raced the insertion: one socket could not join
)

// Errors Start returns when a connection cannot join the kernel path. The
// sockets are untouched (apart from bytes already forwarded) and the caller
// should use the splice plane.
var (
	ErrSockmapMPTCP    = errors.New("sockmap: socket is MPTCP (listen and dial with MPTCP off)")
	ErrSockmapFIN      = errors.New("sockmap: socket already received FIN")
	ErrSockmapFull     = errors.New("sockmap: map full (raise MaxConns)")
	ErrSockmapClosed   = errors.New("sockmap: plane is closed")
	ErrSockmapNetns    = errors.New("sockmap: socket is in another network namespace than the plane")
	errSockmapRedirect = errors.New("sockmap: a redirect failed, the stream cannot be exact")
)

// SockmapCounters are the plane-wide counters, read on demand.
type SockmapCounters struct {
	Started          uint64        // connections that joined the kernel path
	Refused          uint64        // Start calls that returned an error
	Active           int           // connections on the kernel path now
	Demoted          int           // demoted connections still open on Fallback
	DemotedParked    uint64        // demotions because of parked bytes
	DemotedRate      uint64        // demotions because of RateLimit
	DemotedInsert    uint64        // demotions because a FIN raced the insertion
	DemoteFailures   uint64        // demotions that ended in a reset (not integrity)
	DrainTime        time.Duration // total time from verdict removal to hand-off
	DrainMax         time.Duration // longest such time
	IntegrityResets  uint64        // hand-offs whose byte counts did not add up (fact 15), both sides reset
	InsertFailures   uint64        // map insertions that failed (FIN, map full, ...)
	RedirectFailures uint64        // skbs the program dropped because the peer was missing
	RedirectResets   uint64        // connections reset because of redirect failures
	ParkedBytes      int64         // estimated bytes parked in the kernel now (busy connections)
	IterPasses       uint64        // iter/tcp passes run for demotions
	IterTime         time.Duration // total time of those passes
	IterRetries      uint64        // demotions that needed another pass (socket not visited)
	Finished         uint64        // half-closed demotions whose last direction the agent copied itself
}

// Sockmap is the sockmap data plane: both sockets of a connection join a
// BPF sockhash and an sk_skb verdict program redirects every segment to the
// peer, with no userspace copy and no goroutine per connection. It owns
// every BPF object (program, iterator, maps, links); nothing else touches
// them. It implements Plane and is safe for concurrent use.
//
// Connections are demoted once, for good, to Fallback when they park too
// many bytes in the kernel or (with RateLimit) look like bulk transfers.
type Sockmap struct {
	opts SockmapOptions
	log  *slog.Logger
	bpf  *smBPF
	ep   *epoller
	step uint64

	nsFD  int    // network namespace the plane serves (iter/tcp walks it)
	nsIno uint64 // its inode, compared with each socket's at Start

	startWG   sync.WaitGroup // Start calls in progress
	demotedWG sync.WaitGroup // demoted connections not yet Done
	loopDone  chan struct{}
	closeOnce sync.Once

	mu        sync.Mutex
	conns     map[uint64]*smConn // by Conn.ID, kernel path only
	byCookie  map[uint64]*smConn // both sockets of each conn
	hot       map[*smConn]struct{}
	urgent    []*smConn // to poll in this loop iteration (FIN seen)
	copyQ     []*smConn // smFinish conns with bytes left after their budget
	scanKeys  []uint64  // scan's batch buffers
	scanVals  []sockmapSockState
	demoteQ   []*smConn
	demoted   map[uint64]*smDemoted
	cmds      []smCmd
	out       []smOut // Done calls and hand-offs, run by the loop outside mu
	closing   bool
	scanEvery time.Duration
	// exported: an upgrade handed the BPF objects to a new agent process
	// (Export), which reads the activity ring from then on; this plane
	// stops reading it and finds activity by scanning every smExportScan.
	exported bool
	ctr      SockmapCounters // guarded by mu (except the atomics below)

	refused atomic.Uint64
}

var _ Plane = (*Sockmap)(nil)

// smBPF holds the loaded objects and their attachments, so that a later
// bpffs pinning change has one place to look.
type smBPF struct {
	objs    sockmapObjects
	verdict link.Link // nil if attached with the legacy PROG_ATTACH
	rawAtt  bool
	iter    *link.Iter
	ring    *ringbuf.Reader
	// shared: another agent process may hold the attachment too (this
	// plane inherited it, or exported it in an upgrade). A legacy
	// attachment is then never detached explicitly: it ends with the
	// verdict map, when the last process lets go of it.
	shared bool
}

func (b *smBPF) close() error {
	var errs []error
	if b.ring != nil {
		errs = append(errs, b.ring.Close())
	}
	if b.iter != nil {
		errs = append(errs, b.iter.Close())
	}
	if b.verdict != nil {
		errs = append(errs, b.verdict.Close())
	}
	if b.rawAtt && !b.shared {
		errs = append(errs, link.RawDetachProgram(link.RawDetachProgramOptions{
			Target:  b.objs.VerdictMap.FD(),
			Program: b.objs.WspliceVerdict,
			Attach:  ebpf.AttachSkSKBStreamVerdict,
		}))
	}
	errs = append(errs, b.objs.Close())
	return errors.Join(errs...)
}

// smLoad loads and attaches the BPF objects sized for maxConns, or, with
// inh, takes over a running agent's (smLoadInherited).
func smLoad(maxConns int, step uint64, inh *InheritedSockmap) (*smBPF, error) {
	spec, err := loadSockmap()
	if err != nil {
		return nil, fmt.Errorf("reading embedded BPF object: %w", err)
	}
	if inh != nil {
		return smLoadInherited(spec, inh)
	}
	for _, name := range []string{sockmapMapVerdictMap, sockmapMapTargetMap, sockmapMapSocks} {
		spec.Maps[name].MaxEntries = uint32(2 * maxConns)
	}
	if err := spec.Variables[sockmapVarNotifyStep].Set(step); err != nil {
		return nil, fmt.Errorf("setting notify_step: %w", err)
	}
	b := &smBPF{}
	if err := spec.LoadAndAssign(&b.objs, nil); err != nil {
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("loading sockmap BPF objects (needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON): %w", err)
		}
		return nil, fmt.Errorf("loading sockmap BPF objects: %w", err)
	}
	// Fact 1: a BPF link on kernels >= 6.10, the legacy attach before.
	b.verdict, err = link.AttachRawLink(link.RawLinkOptions{
		Target:  b.objs.VerdictMap.FD(),
		Program: b.objs.WspliceVerdict,
		Attach:  ebpf.AttachSkSKBStreamVerdict,
	})
	if err != nil {
		lerr := err
		b.verdict = nil
		if err := link.RawAttachProgram(link.RawAttachProgramOptions{
			Target:  b.objs.VerdictMap.FD(),
			Program: b.objs.WspliceVerdict,
			Attach:  ebpf.AttachSkSKBStreamVerdict,
		}); err != nil {
			b.close()
			return nil, fmt.Errorf("attaching stream verdict (link: %v): %w", lerr, err)
		}
		b.rawAtt = true
	}
	if err := b.attachIterAndRing(); err != nil {
		return nil, err
	}
	return b, nil
}

// attachIterAndRing attaches the demotion iterator and opens the ring
// buffer reader: the steps a new and an inherited plane share. On error b
// is closed.
func (b *smBPF) attachIterAndRing() error {
	var err error
	b.iter, err = link.AttachIter(link.IterOptions{Program: b.objs.WspliceDemote})
	if err != nil {
		b.close()
		return fmt.Errorf("attaching iter/tcp demotion program: %w", err)
	}
	b.ring, err = ringbuf.NewReader(b.objs.Events)
	if err != nil {
		b.close()
		return fmt.Errorf("opening activity ring buffer: %w", err)
	}
	return nil
}

// SockmapSupported reports whether the sockmap plane can run here: it loads
// and attaches the BPF objects (with tiny maps) and releases them. The error
// says why not (missing capability, kernel without sockhash or iter/tcp...).
func SockmapSupported() error {
	b, err := smLoad(16, 1<<20, nil)
	if err != nil {
		return err
	}
	return b.close()
}

// NewSockmap loads and attaches the BPF objects and starts the plane's one
// event loop. The plane serves sockets of the network namespace of the
// calling thread. The error says clearly why the plane cannot run.
func NewSockmap(opts SockmapOptions) (*Sockmap, error) {
	if opts.Fallback == nil {
		return nil, errors.New("sockmap: SockmapOptions.Fallback is required (demoted connections go there)")
	}
	if opts.MaxConns <= 0 {
		opts.MaxConns = 65536
	}
	if opts.ParkedHighWater == 0 {
		opts.ParkedHighWater = 4 << 20
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = 5 * time.Millisecond
	}
	if opts.RcvBuf == 0 {
		opts.RcvBuf = 1 << 20
	}
	inh := opts.Inherit
	opts.Inherit = nil // owned by the plane's BPF objects from here on
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// The activity step: how many bytes a quiet connection redirects
	// before the agent starts polling it. A quarter of the high-water
	// mark, within [64 KiB, 1 MiB]; with a rate limit, at most what the
	// limit allows in 10 ms, so a bulk flow is measured early.
	step := int64(1 << 20)
	if opts.ParkedHighWater > 0 {
		step = min(max(opts.ParkedHighWater/4, 64<<10), 1<<20)
	}
	if opts.RateLimit > 0 {
		step = min(step, max(opts.RateLimit/100, 64<<10))
	}
	if inh != nil {
		// The program's own step, and the maps' size, are the old agent's.
		step = int64(inh.meta.Step)
		opts.MaxConns = int(inh.maps[sockmapMapVerdictMap].MaxEntries() / 2)
	}
	s := &Sockmap{
		opts:      opts,
		log:       log,
		step:      uint64(step),
		nsFD:      -1,
		loopDone:  make(chan struct{}),
		conns:     make(map[uint64]*smConn),
		byCookie:  make(map[uint64]*smConn),
		hot:       make(map[*smConn]struct{}),
		demoted:   make(map[uint64]*smDemoted),
		scanEvery: time.Second,
	}
	var err error
	if s.nsFD, err = unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
		inh.Close()
		return nil, fmt.Errorf("sockmap: opening own network namespace: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(s.nsFD, &st); err != nil {
		inh.Close()
		unix.Close(s.nsFD)
		return nil, fmt.Errorf("sockmap: stat network namespace: %w", err)
	}
	s.nsIno = st.Ino
	if s.bpf, err = smLoad(opts.MaxConns, uint64(step), inh); err != nil {
		unix.Close(s.nsFD)
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	if s.ep, err = newEpoller(); err != nil {
		s.bpf.close()
		unix.Close(s.nsFD)
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	// Level-triggered: the loop drains the ring each time it is readable.
	if err := s.ep.add(s.bpf.objs.Events.FD(), unix.EPOLLIN, epTagRing); err != nil {
		s.ep.close()
		s.bpf.close()
		unix.Close(s.nsFD)
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	ready := make(chan error, 1)
	go s.loop(ready)
	if err := <-ready; err != nil {
		<-s.loopDone
		s.ep.close()
		s.bpf.close()
		unix.Close(s.nsFD)
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	return s, nil
}

// Kind returns KindSockmap.
func (s *Sockmap) Kind() Kind { return KindSockmap }

// Len returns the number of connections started on this plane and not yet
// finished: those on the kernel path plus those demoted to Fallback.
func (s *Sockmap) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns) + len(s.demoted)
}

// Counters returns a snapshot of the plane-wide counters.
func (s *Sockmap) Counters() SockmapCounters {
	s.mu.Lock()
	c := s.ctr
	c.Active = len(s.conns)
	c.Demoted = len(s.demoted)
	var parked int64
	for h := range s.hot {
		parked += h.parked[0] + h.parked[1]
	}
	c.ParkedBytes = parked
	s.mu.Unlock()
	c.Refused = s.refused.Load()
	var v uint64
	if err := s.bpf.objs.Totals.Lookup(uint32(0), &v); err == nil {
		c.RedirectFailures = v
	}
	return c
}

// MapEntries counts the sockets in the verdict and target sockhashes. Meant
// for leak tests and diagnostics: it walks both maps.
func (s *Sockmap) MapEntries() (verdict, target int, err error) {
	count := func(m *ebpf.Map) (int, error) {
		var k uint64
		var v uint64
		n := 0
		it := m.Iterate()
		for it.Next(&k, &v) {
			n++
		}
		return n, it.Err()
	}
	if verdict, err = count(s.bpf.objs.VerdictMap); err != nil {
		return 0, 0, fmt.Errorf("walking verdict map: %w", err)
	}
	if target, err = count(s.bpf.objs.TargetMap); err != nil {
		return 0, 0, fmt.Errorf("walking target map: %w", err)
	}
	return verdict, target, nil
}

// Stats returns connection id's counters: the program's per-socket
// counters plus the bytes forwarded before insertion, or, after demotion,
// Fallback's counters plus everything forwarded on the kernel path.
func (s *Sockmap) Stats(id uint64) (Stats, bool) {
	s.mu.Lock()
	c := s.conns[id]
	d := s.demoted[id]
	var cp smConn
	if c != nil {
		cp = *c
	}
	s.mu.Unlock()
	if c != nil {
		var st [2]sockmapSockState
		for i := range 2 {
			_ = s.bpf.objs.Socks.Lookup(cp.cookie[i], &st[i])
		}
		return cp.stats(&st), true
	}
	if d != nil {
		fs, ok := s.opts.Fallback.Stats(id)
		if !ok {
			// Between the hand-off and Fallback's registration, or after
			// its Done: report what the kernel path moved.
			return d.base, true
		}
		return d.merge(fs), true
	}
	return Stats{}, false
}

// Kill closes connection id: RST both ways for ReasonKill, otherwise FIN
// after the bytes already redirected were queued (bounded by 2s). It
// returns false if id is unknown.
func (s *Sockmap) Kill(id uint64, reason CloseReason) bool {
	s.mu.Lock()
	if _, ok := s.conns[id]; ok {
		s.cmds = append(s.cmds, smCmd{id: id, reason: reason})
		s.mu.Unlock()
		s.ep.poke()
		return true
	}
	_, demoted := s.demoted[id]
	s.mu.Unlock()
	if demoted {
		return s.opts.Fallback.Kill(id, reason)
	}
	return false
}

// Close closes every connection with ReasonShutdown (FIN both ways, after
// the bytes already redirected were queued, at most 2s), kills the
// demoted ones on Fallback and waits for their Done (at most 10s), then
// detaches and frees the BPF objects. Fallback itself is not closed.
func (s *Sockmap) Close() error {
	var err error
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closing = true
		s.mu.Unlock()
		s.startWG.Wait()
		s.mu.Lock()
		s.cmds = append(s.cmds, smCmd{all: true, reason: ReasonShutdown})
		s.mu.Unlock()
		s.ep.poke()
		<-s.loopDone

		s.mu.Lock()
		ids := make([]uint64, 0, len(s.demoted))
		for id := range s.demoted {
			ids = append(ids, id)
		}
		s.mu.Unlock()
		for _, id := range ids {
			s.opts.Fallback.Kill(id, ReasonShutdown)
		}
		waited := make(chan struct{})
		go func() { s.demotedWG.Wait(); close(waited) }()
		select {
		case <-waited:
		case <-time.After(10 * time.Second):
			err = errors.New("sockmap: demoted connections still open on the fallback after 10s")
		}
		s.ep.close()
		if cerr := s.bpf.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("sockmap: releasing BPF objects: %w", cerr))
		}
		unix.Close(s.nsFD)
	})
	return err
}

// monoNow reads CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
func monoNow() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

// monoToWall converts a CLOCK_MONOTONIC nanosecond stamp to wall time.
func monoToWall(ns int64) time.Time {
	return time.Now().Add(-time.Duration(monoNow() - ns))
}

// enterNetns moves the calling (locked) thread into the plane's network
// namespace if it is not there already: iter/tcp walks the namespace of the
// thread that opens it. Needs CAP_SYS_ADMIN only when the plane was created
// on a thread in another namespace than the process (tests).
func (s *Sockmap) enterNetns() error {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return fmt.Errorf("stat own network namespace: %w", err)
	}
	if st.Ino == s.nsIno {
		return nil
	}
	if err := unix.Setns(s.nsFD, unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("entering the plane's network namespace: %w", err)
	}
	return nil
}
