package dataplane

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// smConn is one connection on the kernel path. It is kept small (DESIGN:
// a few hundred bytes per connection, no goroutine): two raw fds, the two
// cookies that key every BPF map, the baselines that turn kernel counters
// into per-connection numbers, and the loop's bookkeeping. Fields are
// guarded by Sockmap.mu; index 0 is the client, 1 the backend, and
// per-direction arrays are indexed by the sending side.
type smConn struct {
	id       uint64
	fd       [2]int
	cookie   [2]uint64
	rxBase   [2]uint64    // bytes received and consumed by userspace before insertion
	txBase   [2]uint64    // bytes written into the socket before insertion
	pre      [2]Direction // forwarded by the pre-insertion drain, by sender
	last     [2]uint64    // program byte counter at the previous poll
	parked   [2]int64     // estimate at the previous poll, by sender
	rate     [2]uint64    // byte counter at rateAt
	rateAt   int64        // CLOCK_MONOTONIC ns
	startNs  int64        // CLOCK_MONOTONIC ns of insertion
	phaseAt  int64        // CLOCK_MONOTONIC ns the phase began
	stallAt  int64        // first poll that found FIN's bytes unaccounted for
	seenNs   int64        // latest program activity stamp a scan saw
	nextPoll int64        // CLOCK_MONOTONIC ns before which a stalled busy conn is not polled
	idle     time.Duration
	done     func(Result)
	reason   string // demotion reason
	flags    smFlags
	phase    smPhase
	quiet    uint8   // polls in a row with nothing moving and nothing parked
	stuck    uint8   // polls in a row with bytes parked and no progress (backoff)
	passes   uint8   // iter/tcp passes this demotion took
	fdir     int8    // smFinish: the side whose bytes the loop copies
	buf      *[]byte // smFinish only: pooled copy buffer, bufLo..bufHi unsent
	bufLo    int32
	bufHi    int32
	first    int8 // side whose FIN came first, -1 none
	closeRs  CloseReason
}

type smFlags uint8

const (
	smFin0     smFlags = 1 << iota // client sent FIN
	smFin1                         // backend sent FIN
	smShut0                        // SHUT_WR done on the client socket
	smShut1                        // SHUT_WR done on the backend socket
	smVerdict0                     // client socket is in the verdict map
	smVerdict1                     // backend socket is in the verdict map
	smUser                         // demoted and finished by the loop in userspace (smFinish)
)

func smFin(side int) smFlags     { return smFin0 << side }
func smShut(side int) smFlags    { return smShut0 << side }
func smVerdict(side int) smFlags { return smVerdict0 << side }

type smPhase uint8

const (
	smLive     smPhase = iota // on the kernel path
	smQueued                  // waiting for the next iter/tcp pass
	smDraining                // out of the verdict map, waiting for parked == 0
	smClosing                 // FIN both ways once parked == 0 (or 2s)
	smFinish                  // out of the maps, last open direction copied by the loop
)

// smDemoted is what the plane keeps of a demoted connection: the counters
// of its kernel-path life, added to Fallback's.
type smDemoted struct {
	base Stats
}

func (d *smDemoted) merge(fs Stats) Stats {
	fs.ClientToBackend.Bytes += d.base.ClientToBackend.Bytes
	fs.ClientToBackend.Segments += d.base.ClientToBackend.Segments
	fs.BackendToClient.Bytes += d.base.BackendToClient.Bytes
	fs.BackendToClient.Segments += d.base.BackendToClient.Segments
	if fs.LastActivity.Before(d.base.LastActivity) {
		fs.LastActivity = d.base.LastActivity
	}
	fs.Demoted = true
	fs.DemoteReason = d.base.DemoteReason
	return fs
}

// smCmd is a request to the loop from Kill or Close.
type smCmd struct {
	id     uint64
	all    bool
	reason CloseReason
	demote string // demote instead of closing, with this reason
}

// smOut is work the loop does after releasing mu: a Done call, or a hand-off
// to Fallback.
type smOut struct {
	done    func(Result)
	res     Result
	handoff *smConn
	base    Stats
}

func (c *smConn) stats(st *[2]sockmapSockState) Stats {
	last := max(int64(st[0].LastNs), int64(st[1].LastNs), c.startNs)
	s := Stats{
		Plane: KindSockmap,
		ClientToBackend: Direction{
			Bytes:    c.pre[0].Bytes + st[0].Bytes,
			Segments: c.pre[0].Segments + st[0].Segs,
		},
		BackendToClient: Direction{
			Bytes:    c.pre[1].Bytes + st[1].Bytes,
			Segments: c.pre[1].Segments + st[1].Segs,
		},
		LastActivity: monoToWall(last),
		// Demoted and DemoteReason are set at the hand-off (or when the
		// loop takes over a half-closed connection): until then the
		// connection is on the kernel path, even while a demotion drains.
		Demoted: c.flags&smUser != 0,
	}
	if s.Demoted {
		s.DemoteReason = c.reason
	}
	return s
}

var smBufPool = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

// Bounds of the pre-insertion drain: a peer that keeps the receive queue
// non-empty this long, or whose own peer will not take the bytes, cannot
// join; the caller finishes the connection on splice.
const (
	smDrainMax      = 64 << 20
	smDrainDeadline = 2 * time.Second
)

// Start moves c onto the kernel path. It follows DESIGN.md fact 3 exactly:
// drain each socket with recv(MSG_DONTWAIT) until EAGAIN, writing every
// byte to the peer; take the baselines; write both peer entries; insert
// both sockets into the target map, then both into the verdict map; kick
// each once with SO_RCVLOWAT=1. Only then are the net.Conns closed (the
// plane keeps CLOEXEC duplicates, out of Go's poller: fact 9) and the
// sockets watched by the loop's epoll.
//
// Start returns an error, leaving both sockets to the caller, for MPTCP
// sockets (fact 7), sockets that already received FIN (fact 6), a full map,
// a socket of another network namespace or a BPF failure. Bytes the drain
// already forwarded stay forwarded, which is what the caller's fallback
// would have done with them.
func (s *Sockmap) Start(c *Conn) (err error) {
	if c == nil || c.Client == nil || c.Backend == nil || c.Done == nil {
		return errors.New("sockmap: Start needs Client, Backend and Done")
	}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return ErrSockmapClosed
	}
	if _, dup := s.conns[c.ID]; dup {
		s.mu.Unlock()
		return fmt.Errorf("sockmap: connection id %d already started", c.ID)
	}
	if _, dup := s.demoted[c.ID]; dup {
		s.mu.Unlock()
		return fmt.Errorf("sockmap: connection id %d already started", c.ID)
	}
	s.startWG.Add(1)
	s.mu.Unlock()
	defer s.startWG.Done()
	defer func() {
		if err != nil {
			s.refused.Add(1)
		}
	}()

	sc := &smConn{id: c.ID, fd: [2]int{-1, -1}, idle: c.IdleTimeout, done: c.Done, first: -1}
	defer func() {
		if err != nil {
			for _, fd := range sc.fd {
				if fd >= 0 {
					unix.Close(fd)
				}
			}
		}
	}()
	for i, tc := range [2]*net.TCPConn{c.Client, c.Backend} {
		if sc.fd[i], err = smDupConn(tc); err != nil {
			return fmt.Errorf("sockmap: %s socket: %w", smSide(i), err)
		}
		if err := s.checkSocket(sc.fd[i]); err != nil {
			return fmt.Errorf("%w (%s socket)", err, smSide(i))
		}
		if sc.cookie[i], err = unix.GetsockoptUint64(sc.fd[i], unix.SOL_SOCKET, unix.SO_COOKIE); err != nil {
			return fmt.Errorf("sockmap: SO_COOKIE: %w", err)
		}
		if s.opts.RcvBuf > 0 {
			// Adaptive data plane step 1: bound the receive queue (and the
			// TCP window) a demoted connection will have.
			if err := unix.SetsockoptInt(sc.fd[i], unix.SOL_SOCKET, unix.SO_RCVBUF, s.opts.RcvBuf); err != nil {
				return fmt.Errorf("sockmap: SO_RCVBUF: %w", err)
			}
		}
	}

	// Fact 3, step 1: drain until EAGAIN, forwarding. A buffered or
	// MSG_PEEK read would duplicate bytes once the socket joins the map.
	bp := smBufPool.Get().(*[]byte)
	deadline := time.Now().Add(smDrainDeadline)
	for i := range 2 {
		if sc.pre[i], err = smDrain(sc.fd[i], sc.fd[1-i], *bp, deadline); err != nil {
			smBufPool.Put(bp)
			return fmt.Errorf("%w (%s socket)", err, smSide(i))
		}
	}
	smBufPool.Put(bp)

	// Baselines, before any map: the program's counters start at zero here.
	for i := range 2 {
		if sc.rxBase[i], _, err = smRxConsumed(sc.fd[i]); err != nil {
			return fmt.Errorf("sockmap: %s socket: %w", smSide(i), err)
		}
		if sc.txBase[i], err = smTxWritten(sc.fd[i], true); err != nil {
			return fmt.Errorf("sockmap: %s socket: %w", smSide(i), err)
		}
	}

	if err := s.insert(sc); err != nil {
		if errors.Is(err, errSmInsertLate) {
			// The client socket is live, the backend missed the verdict
			// map (FIN raced us): leave through the demotion path, which
			// takes the client out under its lock and checks the bytes.
			s.register(sc, c, false)
			s.mu.Lock()
			s.ctr.InsertFailures++
			s.queueDemote(sc, DemoteInsert)
			s.mu.Unlock()
			s.ep.poke()
			return nil
		}
		s.mu.Lock()
		s.ctr.InsertFailures++
		s.mu.Unlock()
		return err
	}
	s.register(sc, c, false)
	return nil
}

// register hands an inserted (or adopted) connection to the loop and
// drops the net.Conns: from here on only the plane's duplicates keep the
// sockets. An adopted connection keeps its start time, is not counted as
// started, and is polled at once (parked bytes, a FIN that came during
// the hand-off, a demotion to run or to finish).
func (s *Sockmap) register(sc *smConn, c *Conn, adopted bool) {
	if !adopted {
		sc.startNs = monoNow()
	}
	s.mu.Lock()
	s.conns[sc.id] = sc
	s.byCookie[sc.cookie[0]] = sc
	s.byCookie[sc.cookie[1]] = sc
	if adopted {
		if sc.phase == smQueued {
			s.demoteQ = append(s.demoteQ, sc)
		}
		s.makeHot(sc)
		s.urgent = append(s.urgent, sc)
	} else {
		s.ctr.Started++
	}
	rescan := false
	if sc.idle > 0 && sc.idle/4 < s.scanEvery {
		s.scanEvery = max(sc.idle/4, 10*time.Millisecond)
		rescan = true
	}
	// Fact 4: EPOLLRDHUP|EPOLLET only; EPOLLIN would wake the agent for
	// every segment. ERR and HUP are always reported, and a FIN that
	// arrived before this ADD is reported by it. Added under mu, after the
	// connection is published: the loop can neither miss the event's
	// connection nor close its fds before they are registered.
	var eerr error
	for i := range 2 {
		if err := s.ep.add(sc.fd[i], unix.EPOLLRDHUP|unix.EPOLLET, sc.cookie[i]); err != nil {
			eerr = err
		}
	}
	if eerr != nil {
		s.cmds = append(s.cmds, smCmd{id: sc.id, reason: ReasonError})
	}
	s.mu.Unlock()
	c.Client.Close()
	c.Backend.Close()
	if rescan || eerr != nil || adopted {
		s.ep.poke() // the loop may be asleep until the old scan time
	}
}

var errSmInsertLate = errors.New("sockmap: backend socket could not join the verdict map")

// insert writes the peer entries and joins both sockets to the target map,
// then to the verdict map, then kicks each once (fact 3). Until the second
// verdict insert, every failure is undone without loss: no socket is in the
// verdict map, so nothing was redirected. If the second verdict insert
// fails the first socket is already live; errSmInsertLate says so.
func (s *Sockmap) insert(sc *smConn) error {
	m := &s.bpf.objs
	for i := range 2 {
		st := sockmapSockState{Peer: sc.cookie[1-i], NotifyAt: s.step}
		if err := m.Socks.Update(sc.cookie[i], &st, ebpf.UpdateNoExist); err != nil {
			for j := 0; j < i; j++ {
				_ = m.Socks.Delete(sc.cookie[j])
			}
			return smInsertErr("peer entry", err)
		}
	}
	undo := func(targets int) {
		for j := 0; j < targets; j++ {
			_ = m.TargetMap.Delete(sc.cookie[j])
		}
		_ = m.Socks.Delete(sc.cookie[0])
		_ = m.Socks.Delete(sc.cookie[1])
	}
	for i := range 2 {
		if err := m.TargetMap.Update(sc.cookie[i], uint64(sc.fd[i]), ebpf.UpdateNoExist); err != nil {
			undo(i)
			return smInsertErr("target map", err)
		}
	}
	if err := m.VerdictMap.Update(sc.cookie[0], uint64(sc.fd[0]), ebpf.UpdateNoExist); err != nil {
		undo(2)
		return smInsertErr("verdict map", err)
	}
	sc.flags |= smVerdict0
	if err := m.VerdictMap.Update(sc.cookie[1], uint64(sc.fd[1]), ebpf.UpdateNoExist); err != nil {
		_ = unix.SetsockoptInt(sc.fd[0], unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1)
		return errSmInsertLate
	}
	sc.flags |= smVerdict1
	// Fact 3, last step: once, never again (fact 14). Bytes that arrived
	// between EAGAIN and the insertion are in the TCP queue, and without a
	// new segment nothing would run the verdict on them.
	for i := range 2 {
		_ = unix.SetsockoptInt(sc.fd[i], unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1)
	}
	return nil
}

func smInsertErr(what string, err error) error {
	switch {
	case errors.Is(err, unix.EOPNOTSUPP):
		// Fact 6: only ESTABLISHED sockets may join; one that received
		// FIN is in CLOSE_WAIT.
		return fmt.Errorf("%w: %s: %v", ErrSockmapFIN, what, err)
	case errors.Is(err, unix.E2BIG), errors.Is(err, unix.ENOMEM), errors.Is(err, unix.ENOSPC):
		return fmt.Errorf("%w: %s: %v", ErrSockmapFull, what, err)
	}
	return fmt.Errorf("sockmap: %s: %w", what, err)
}

// checkSocket refuses what cannot join a sockhash: non-TCP, MPTCP (fact 7),
// not ESTABLISHED (FIN already received: fact 6), or another namespace.
func (s *Sockmap) checkSocket(fd int) error {
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return fmt.Errorf("sockmap: SO_PROTOCOL: %w", err)
	}
	switch proto {
	case unix.IPPROTO_TCP:
	case unix.IPPROTO_MPTCP:
		return ErrSockmapMPTCP
	default:
		return fmt.Errorf("sockmap: socket protocol %d is not TCP", proto)
	}
	var ti unix.TCPInfo
	if err := smTCPInfo(fd, &ti); err != nil {
		return fmt.Errorf("sockmap: TCP_INFO: %w", err)
	}
	switch ti.State {
	case unix.BPF_TCP_ESTABLISHED:
	case unix.BPF_TCP_CLOSE_WAIT:
		return ErrSockmapFIN
	default:
		return fmt.Errorf("sockmap: socket not established (TCP state %d)", ti.State)
	}
	ino, err := smNetnsIno(fd)
	if err != nil {
		return fmt.Errorf("sockmap: %w", err)
	}
	if ino != s.nsIno {
		return ErrSockmapNetns
	}
	return nil
}

// smDrain reads src until EAGAIN and writes everything to dst.
func smDrain(src, dst int, buf []byte, deadline time.Time) (Direction, error) {
	var d Direction
	for {
		n, _, err := unix.Recvfrom(src, buf, unix.MSG_DONTWAIT)
		switch {
		case n > 0:
			if err := smWriteAll(dst, buf[:n], deadline); err != nil {
				return d, fmt.Errorf("sockmap: forwarding pre-insertion bytes: %w", err)
			}
			d.Bytes += uint64(n)
			d.Segments++
			if d.Bytes > smDrainMax || time.Now().After(deadline) {
				return d, errors.New("sockmap: receive queue did not empty before insertion")
			}
		case err == unix.EAGAIN:
			return d, nil
		case err == unix.EINTR:
		case err != nil:
			return d, fmt.Errorf("sockmap: draining: %w", err)
		default: // n == 0: EOF
			return d, ErrSockmapFIN
		}
	}
}

func smSide(i int) string {
	if i == 0 {
		return "client"
	}
	return "backend"
}
