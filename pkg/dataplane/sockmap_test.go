package dataplane

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wsplice/wsplice/test/testutil"
	"golang.org/x/sys/unix"
)

// TestSockmapSoak runs the long variants when WSPLICE_SOAK=1 (make soak):
// 2,000 forced demotions under load, 10,000 pipelined connections, and the
// whole plane suite three times over.
func TestSockmapSoak(t *testing.T) {
	if os.Getenv("WSPLICE_SOAK") != "1" {
		t.Skip("set WSPLICE_SOAK=1 (make soak) for the long runs")
	}
	t.Run("demote", func(t *testing.T) { smDemoteStress(t, 2000) })
	t.Run("pipelined", func(t *testing.T) { smPipelined(t, 10000) })
	for i := range 3 {
		t.Run(fmt.Sprintf("suite%d", i), func(t *testing.T) {
			t.Run("bulk", TestPlaneBulkBothWays)
			t.Run("halfclose", TestPlaneHalfClose)
			t.Run("slowreader", TestPlaneSlowReader)
			t.Run("short", TestPlaneShortConnsNoLeak)
			t.Run("stop", TestPlaneStop)
		})
	}
}

// smEnv builds a sockmap plane with opts in a fresh namespace and runs fn.
func smEnv(t *testing.T, opts SockmapOptions, fn func(s *Sockmap, e *ptEnv)) {
	if os.Getenv("WSPLICE_DEBUG") == "1" && opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	ptInNS(t, func() {
		s := ptNewSockmap(t, opts)
		e := newPtEnv(t, s)
		e.kind = ptPlane{name: "sockmap", kernel: true}
		defer e.close()
		fn(s, e)
	})
}

// TestSockmapDemoteStress demotes connections at random moments while
// bulk data flows both ways, at least 100 times. Each run must be either
// byte-exact through the hand-off or end in a counted integrity reset;
// a stream that differs without one is a silent corruption.
func TestSockmapDemoteStress(t *testing.T) { smDemoteStress(t, 100) }

func smDemoteStress(t *testing.T, want int) {
	const (
		n        = 48 << 20 // bytes each way per run
		parallel = 4        // runs at once, so demotions batch in one pass
	)
	smEnv(t, SockmapOptions{ParkedHighWater: 1 << 30}, func(s *Sockmap, e *ptEnv) {
		rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 2))
		var demoted, exact, resets, early, runs int
		var bytes int64
		start := time.Now()
		for demoted < want && runs < 3*want {
			pairs := make([]*ptPair, parallel)
			for i := range pairs {
				pairs[i] = e.pair(nil)
			}
			errs := make([]error, parallel)
			var wg sync.WaitGroup
			for i, p := range pairs {
				wg.Add(2)
				seed := uint64(runs+i) << 8
				go func() { defer wg.Done(); errs[i] = ptBothWays(p, seed, n, 128<<10) }()
				delay := time.Duration(rng.Int64N(int64(30 * time.Millisecond)))
				go func() {
					defer wg.Done()
					time.Sleep(delay)
					s.demote(p.id, DemoteParked)
				}()
			}
			wg.Wait()
			for i, p := range pairs {
				runs++
				r := p.wait(t, 30*time.Second)
				p.close()
				clean := r.Reason == ReasonClientFIN || r.Reason == ReasonBackendFIN
				switch {
				case r.Reason == ReasonIntegrity:
					resets++
					demoted++
					t.Logf("run %d: integrity reset (counted): %v", runs, r.Err)
				case errs[i] != nil && clean:
					t.Errorf("run %d: SILENT CORRUPTION or loss: %v (reason %s, demoted %v)",
						runs, errs[i], r.Reason, r.Demoted)
				case !clean:
					// Reset and reported, so not silent; but a demotion
					// should never need to give up a connection.
					t.Errorf("run %d: connection %d reset by the plane: %+v (stream: %v)", runs, p.id, r, errs[i])
				case r.Demoted:
					demoted++
					exact++
					bytes += 2 * n
				default:
					early++ // finished before the demotion request: still exact
					bytes += 2 * n
				}
			}
			if t.Failed() {
				break
			}
		}
		c := s.Counters()
		t.Logf("%d runs in %v: %d demoted under load (%d byte-exact, %d integrity resets), %d finished first; %d MiB checked; iter passes %d (%v total), drain max %v, avg %v",
			runs, time.Since(start).Round(time.Millisecond), demoted, exact, resets, early, bytes>>20,
			c.IterPasses, c.IterTime.Round(time.Microsecond), c.DrainMax.Round(time.Microsecond),
			(c.DrainTime / time.Duration(max(1, exact))).Round(time.Microsecond))
		if demoted < want {
			t.Errorf("only %d demotions under load, want %d", demoted, want)
		}
		if uint64(resets) != c.IntegrityResets {
			t.Errorf("%d integrity resets seen, counter says %d", resets, c.IntegrityResets)
		}
	})
}

// TestSockmapLightTraffic: 64-byte ping-pong and a steady 20 MiB/s stream
// stay on the kernel path; a bulk flow over RateLimit is demoted for rate.
func TestSockmapLightTraffic(t *testing.T) {
	// ParkedHighWater is high so that the bulk flow meets the rate trigger
	// first (with the default mark, parked bytes usually trigger first).
	smEnv(t, SockmapOptions{RateLimit: 64 << 20, ParkedHighWater: 1 << 30}, func(s *Sockmap, e *ptEnv) {
		// Ping-pong.
		p := e.pair(nil)
		defer p.close()
		go ptEcho(p.backend)
		msg, got := make([]byte, 64), make([]byte, 64)
		deadline := time.Now().Add(time.Second)
		pings := 0
		for time.Now().Before(deadline) {
			if _, err := p.client.Write(msg); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(p.client, got); err != nil {
				t.Fatal(err)
			}
			pings++
		}
		// A steady 20 MiB/s stream, both ways.
		q := e.pair(nil)
		defer q.close()
		var wg sync.WaitGroup
		errs := make([]error, 4)
		for i, w := range []*net.TCPConn{q.client, q.backend} {
			wg.Add(2)
			go func() { defer wg.Done(); errs[i] = ptPaced(w, uint64(50+i), 20<<20, 2*time.Second) }()
			r := []*net.TCPConn{q.backend, q.client}[i]
			go func() { defer wg.Done(); _, errs[2+i] = ptReadStream(r, uint64(50+i), 40<<20, false) }()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
		for _, x := range []*ptPair{p, q} {
			st, ok := s.Stats(x.id)
			if !ok || st.Demoted || st.Plane != KindSockmap {
				t.Errorf("conn %d: light traffic left the kernel path: %+v", x.id, st)
			}
		}
		// A bulk flow is demoted for its rate.
		b := e.pair(nil)
		defer b.close()
		if err := ptBothWays(b, 77, 256<<20, 256<<10); err != nil {
			t.Fatal(err)
		}
		// The decision is what is tested: a fast bulk flow may end while
		// its demotion drains, and is then finished on the kernel path.
		r := b.wait(t, 10*time.Second)
		if r.Demoted && r.DemoteReason != DemoteRate {
			t.Errorf("bulk flow: demoted for %q, want rate", r.DemoteReason)
		}
		c := s.Counters()
		t.Logf("%d pings in 1s; 20 MiB/s both ways for 2s not demoted; bulk demoted for %q; counters %+v", pings, r.DemoteReason, c)
		if c.DemotedRate != 1 || c.DemotedParked != 0 {
			t.Errorf("demotions: rate %d parked %d, want 1 and 0", c.DemotedRate, c.DemotedParked)
		}
	})
}

// ptPaced writes rate bytes/s of stream seed for d, in 10 ms slices.
func ptPaced(w *net.TCPConn, seed uint64, rate int64, d time.Duration) error {
	s := &ptStream{seed: seed}
	slice := rate / 100
	buf := make([]byte, slice)
	tk := time.NewTicker(10 * time.Millisecond)
	defer tk.Stop()
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		s.fill(buf)
		if _, err := w.Write(buf); err != nil {
			return err
		}
		<-tk.C
	}
	// Top up to exactly rate*d/1s so the reader knows the length.
	total := rate * int64(d/time.Second)
	if rest := total - int64(s.off); rest > 0 {
		b := make([]byte, rest)
		s.fill(b)
		if _, err := w.Write(b); err != nil {
			return err
		}
	} else if rest < 0 {
		return fmt.Errorf("paced writer overshot by %d", -rest)
	}
	return nil
}

// TestSockmapPipelined1000: 1,000 connections with bytes pipelined behind
// both heads, under a background bulk load, all byte-exact (fact 3).
func TestSockmapPipelined1000(t *testing.T) { smPipelined(t, 1000) }

func smPipelined(t *testing.T, n int) {
	smEnv(t, SockmapOptions{}, func(s *Sockmap, e *ptEnv) {
		// Background load: two connections carrying 64 MiB/s each until
		// done (a saturating load would leave the two cores to it).
		stop := make(chan struct{})
		var bg sync.WaitGroup
		for range 2 {
			b := e.pair(nil)
			bg.Add(1)
			go func() {
				defer bg.Done()
				defer b.close()
				go io.Copy(io.Discard, b.backend)
				buf := make([]byte, 640<<10)
				tk := time.NewTicker(10 * time.Millisecond)
				defer tk.Stop()
				for {
					select {
					case <-stop:
						return
					case <-tk.C:
					}
					if _, err := b.client.Write(buf); err != nil {
						return
					}
				}
			}()
		}
		rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 3))
		work := make(chan func() error, 4)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var failures int
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for f := range work {
					if err := f(); err != nil {
						mu.Lock()
						failures++
						mu.Unlock()
						t.Error(err)
					}
				}
			}()
		}
		start := time.Now()
		for i := 0; i < n && !t.Failed(); i++ {
			ce, be := rng.IntN(64<<10), rng.IntN(64<<10)
			if i%3 == 0 {
				ce = rng.IntN(100) // often tiny: one segment behind the head
			}
			cs, bs := &ptStream{seed: uint64(1000 + 2*i)}, &ptStream{seed: uint64(1001 + 2*i)}
			hs := &ptHandshake{clientExtra: make([]byte, ce), backendExtra: make([]byte, be)}
			cs.fill(hs.clientExtra)
			bs.fill(hs.backendExtra)
			p := e.pair(hs)
			const after = 16 << 10
			work <- func() error {
				defer p.close()
				errs := make([]error, 4)
				var w sync.WaitGroup
				w.Add(4)
				go func() { defer w.Done(); errs[0] = ptContinue(p.client, cs, after) }()
				go func() { defer w.Done(); errs[1] = ptContinue(p.backend, bs, after) }()
				go func() { defer w.Done(); _, errs[2] = ptReadStream(p.backend, cs.seed, int64(ce+after), true) }()
				go func() { defer w.Done(); _, errs[3] = ptReadStream(p.client, bs.seed, int64(be+after), true) }()
				w.Wait()
				if err := errors.Join(errs...); err != nil {
					return fmt.Errorf("conn %d (client extra %d, backend extra %d): %w", p.id, ce, be, err)
				}
				select {
				case r := <-p.res:
					if r.Reason != ReasonClientFIN && r.Reason != ReasonBackendFIN {
						return fmt.Errorf("conn %d: reason %s (%v)", p.id, r.Reason, r.Err)
					}
				case <-time.After(10 * time.Second):
					return fmt.Errorf("conn %d: no Done", p.id)
				}
				return nil
			}
		}
		close(work)
		wg.Wait()
		close(stop)
		bg.Wait()
		t.Logf("%d pipelined connections under bulk load in %v: %d failures; counters %+v",
			n, time.Since(start).Round(time.Millisecond), failures, s.Counters())
	})
}

// TestSockmapRefuses: Start refuses MPTCP sockets and sockets that already
// received FIN, and leaves them usable: the splice plane then carries the
// connection.
func TestSockmapRefuses(t *testing.T) {
	smEnv(t, SockmapOptions{}, func(s *Sockmap, e *ptEnv) {
		sp := NewSplice(SpliceOptions{})
		defer sp.Close()

		// FIN already received on the client socket.
		p, err := e.rawPair()
		if err != nil {
			t.Fatal(err)
		}
		p.app[0].Write([]byte("last words"))
		p.app[0].CloseWrite()
		time.Sleep(20 * time.Millisecond)
		err = s.Start(p.conn)
		if !errors.Is(err, ErrSockmapFIN) {
			t.Fatalf("Start after FIN: %v, want ErrSockmapFIN", err)
		}
		// The bytes were forwarded by the drain or are still queued;
		// either way splice finishes the connection exactly.
		if err := sp.Start(p.conn); err != nil {
			t.Fatalf("splice after refusal: %v", err)
		}
		got, err := io.ReadAll(p.app[1])
		if err != nil || string(got) != "last words" {
			t.Errorf("backend got %q, %v", got, err)
		}
		p.app[1].Close()
		<-p.res
		p.app[0].Close()

		// MPTCP.
		var lc net.ListenConfig
		lc.SetMultipathTCP(true)
		ln, err := lc.Listen(t.Context(), "tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		var d net.Dialer
		d.SetMultipathTCP(true)
		mc, err := d.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer mc.Close()
		ma, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer ma.Close()
		if ok, _ := ma.(*net.TCPConn).MultipathTCP(); !ok {
			t.Log("kernel has no MPTCP here: MPTCP refusal not tested")
		} else {
			bd := ptDial(t, e.lnBackend.Addr())
			defer bd.Close()
			ba, _ := e.lnBackend.AcceptTCP()
			defer ba.Close()
			err := s.Start(&Conn{ID: 999, Client: ma.(*net.TCPConn), Backend: bd, Done: func(Result) {}})
			if !errors.Is(err, ErrSockmapMPTCP) {
				t.Errorf("Start with MPTCP client: %v, want ErrSockmapMPTCP", err)
			}
			if _, err := ma.Write([]byte("still mine")); err != nil {
				t.Errorf("socket unusable after refusal: %v", err)
			}
		}
		if c := s.Counters(); c.Refused < 1 {
			t.Errorf("Refused counter %d", c.Refused)
		}
		if v, tg, err := s.MapEntries(); err != nil || v != 0 || tg != 0 {
			t.Errorf("map entries after refusals: %d %d %v", v, tg, err)
		}
	})
}

// ptRaw is a connection pair not yet started on any plane.
type ptRaw struct {
	app  [2]*net.TCPConn // application client and backend
	conn *Conn
	res  chan Result
}

func (e *ptEnv) rawPair() (*ptRaw, error) {
	cl := ptDial(e.tb, e.lnClient.Addr())
	pc, err := e.lnClient.AcceptTCP()
	if err != nil {
		return nil, err
	}
	pb := ptDial(e.tb, e.lnBackend.Addr())
	bk, err := e.lnBackend.AcceptTCP()
	if err != nil {
		return nil, err
	}
	r := &ptRaw{app: [2]*net.TCPConn{cl, bk}, res: make(chan Result, 1)}
	r.conn = &Conn{ID: e.nextID.Add(1), Client: pc, Backend: pb, Done: func(x Result) { r.res <- x }}
	return r, nil
}

// TestSockmapDemotedStats: after a demotion Stats and Result report the
// splice plane, Demoted and the reason, with the bytes of both lives; the
// maps are empty afterwards.
func TestSockmapDemotedStats(t *testing.T) {
	smEnv(t, SockmapOptions{ParkedHighWater: 1 << 20}, func(s *Sockmap, e *ptEnv) {
		p := e.pair(nil)
		defer p.close()
		// The backend reads slowly, so bytes park and the connection is
		// demoted; the demotion completes as the reader drains them.
		werr := make(chan error, 1)
		go func() { werr <- ptWriteStream(p.client, 3, 8<<20, 64<<10, false) }()
		var read atomic.Int64
		rr := &ptRateReader{r: p.backend, slow: make(chan struct{}), n: &read}
		if _, err := ptReadStream(rr, 3, 8<<20, false); err != nil {
			t.Fatal(err)
		}
		if err := <-werr; err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			if st, _ := s.Stats(p.id); st.Demoted {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		st, ok := s.Stats(p.id)
		if !ok || !st.Demoted || st.DemoteReason != DemoteParked || st.Plane != KindSplice || st.ClientToBackend.Bytes != 8<<20 {
			t.Errorf("Stats after demotion: %+v", st)
		}
		if s.Len() != 1 {
			t.Errorf("Len %d, want 1 (demoted connections count)", s.Len())
		}
		p.client.Close()
		p.backend.Close()
		r := p.wait(t, 5*time.Second)
		if !r.Demoted || r.Plane != KindSplice || r.ClientToBackend.Bytes != 8<<20 {
			t.Errorf("Result: %+v", r)
		}
		c := s.Counters()
		if c.DemotedParked != 1 || c.Demoted != 0 || c.Active != 0 {
			t.Errorf("counters: %+v", c)
		}
		if v, tg, err := s.MapEntries(); err != nil || v != 0 || tg != 0 {
			t.Errorf("map entries: %d %d %v", v, tg, err)
		}
	})
}

// TestSockmapCapabilities: the plane loads with CAP_BPF, CAP_NET_ADMIN and
// CAP_PERFMON alone (no CAP_SYS_ADMIN), and says why when one is missing.
// Capabilities are per thread, so the test drops them on a locked thread
// that then dies.
func TestSockmapCapabilities(t *testing.T) {
	testutil.RequirePrivileged(t)
	try := func(keep ...uint) error {
		ch := make(chan error, 1)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread dies with its caps dropped
			hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
			var data [2]unix.CapUserData
			if err := unix.Capget(&hdr, &data[0]); err != nil {
				ch <- err
				return
			}
			data[0].Effective, data[1].Effective = 0, 0
			for _, c := range keep {
				data[c/32].Effective |= 1 << (c % 32)
			}
			if err := unix.Capset(&hdr, &data[0]); err != nil {
				ch <- fmt.Errorf("capset: %w", err)
				return
			}
			ch <- SockmapSupported()
		}()
		return <-ch
	}
	if err := try(unix.CAP_BPF, unix.CAP_NET_ADMIN, unix.CAP_PERFMON); err != nil {
		t.Errorf("with CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON: %v", err)
	}
	for _, c := range []struct {
		name string
		keep []uint
	}{
		{"CAP_BPF", []uint{unix.CAP_NET_ADMIN, unix.CAP_PERFMON}},
		{"CAP_NET_ADMIN", []uint{unix.CAP_BPF, unix.CAP_PERFMON}},
		{"CAP_PERFMON", []uint{unix.CAP_BPF, unix.CAP_NET_ADMIN}},
	} {
		err := try(c.keep...)
		t.Logf("without %s: %v", c.name, err)
		if err == nil {
			t.Errorf("loaded without %s", c.name)
		}
	}
}

// Unprivileged unit tests.

func TestSmInsertErr(t *testing.T) {
	for _, tc := range []struct {
		in   error
		want error
	}{
		{unix.EOPNOTSUPP, ErrSockmapFIN},
		{unix.E2BIG, ErrSockmapFull},
		{unix.ENOMEM, ErrSockmapFull},
		{unix.ENOSPC, ErrSockmapFull},
	} {
		if got := smInsertErr("x", tc.in); !errors.Is(got, tc.want) {
			t.Errorf("smInsertErr(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
	if got := smInsertErr("x", unix.EINVAL); errors.Is(got, ErrSockmapFIN) || errors.Is(got, ErrSockmapFull) || !errors.Is(got, unix.EINVAL) {
		t.Errorf("smInsertErr(EINVAL) = %v", got)
	}
}

func TestSmFinReceived(t *testing.T) {
	for _, tc := range []struct {
		state uint8
		want  bool
	}{
		{unix.BPF_TCP_ESTABLISHED, false},
		{unix.BPF_TCP_FIN_WAIT1, false},
		{unix.BPF_TCP_FIN_WAIT2, false},
		{unix.BPF_TCP_CLOSE_WAIT, true},
		{unix.BPF_TCP_LAST_ACK, true},
		{unix.BPF_TCP_CLOSING, true},
		{unix.BPF_TCP_TIME_WAIT, true},
		{unix.BPF_TCP_CLOSE, true},
	} {
		if got := smFinReceived(tc.state); got != tc.want {
			t.Errorf("smFinReceived(%d) = %v", tc.state, got)
		}
	}
}

func TestNewSockmapNeedsFallback(t *testing.T) {
	if _, err := NewSockmap(SockmapOptions{}); err == nil {
		t.Fatal("NewSockmap without Fallback succeeded")
	}
}

// TestPtStream checks the harness itself: a stream read in any chunking
// equals the stream written in any other.
func TestPtStream(t *testing.T) {
	whole := make([]byte, 10000)
	(&ptStream{seed: 42}).fill(whole)
	rng := rand.New(rand.NewPCG(1, 2))
	for range 50 {
		s := &ptStream{seed: 42}
		var got []byte
		for len(got) < len(whole) {
			k := min(1+rng.IntN(100), len(whole)-len(got))
			b := make([]byte, k)
			s.fill(b)
			got = append(got, b...)
		}
		if string(got) != string(whole) {
			t.Fatal("stream depends on chunking")
		}
	}
}

// TestSockmapRedirectFailureResets: when the program cannot redirect (the
// peer left the target map behind the plane's back) it drops the skb and
// counts it (fact 11: never SK_PASS); the plane then resets both sides,
// since the stream cannot be exact any more.
func TestSockmapRedirectFailureResets(t *testing.T) {
	smEnv(t, SockmapOptions{}, func(s *Sockmap, e *ptEnv) {
		p := e.pair(nil)
		defer p.close()
		s.mu.Lock()
		c := s.conns[p.id]
		backendCookie := c.cookie[1]
		s.mu.Unlock()
		if err := s.bpf.objs.TargetMap.Delete(backendCookie); err != nil {
			t.Fatal(err)
		}
		if _, err := p.client.Write([]byte("lost")); err != nil {
			t.Fatal(err)
		}
		r := p.wait(t, 5*time.Second)
		if r.Reason != ReasonError || !errors.Is(r.Err, errSockmapRedirect) {
			t.Errorf("result %s %v, want error with errSockmapRedirect", r.Reason, r.Err)
		}
		p.backend.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := p.backend.Read(make([]byte, 4)); !errors.Is(err, unix.ECONNRESET) {
			t.Errorf("backend read %v, want ECONNRESET", err)
		}
		k := s.Counters()
		if k.RedirectFailures < 1 || k.RedirectResets != 1 {
			t.Errorf("counters: %+v", k)
		}
	})
}

// TestSockmapIntegrityResetPath exercises the fact-15 check's failure
// branch: a hand-off whose byte counts do not add up resets both sides, is
// counted and reported as ReasonIntegrity. The mismatch is made by skewing
// the plane's baseline, as a lost skb would.
func TestSockmapIntegrityResetPath(t *testing.T) {
	smEnv(t, SockmapOptions{}, func(s *Sockmap, e *ptEnv) {
		p := e.pair(nil)
		defer p.close()
		if _, err := p.client.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(p.backend, make([]byte, 5)); err != nil {
			t.Fatal(err)
		}
		s.mu.Lock()
		s.conns[p.id].rxBase[0] -= 3 // three bytes "received" that the program never saw
		s.mu.Unlock()
		if !s.demote(p.id, DemoteParked) {
			t.Fatal("demote: unknown connection")
		}
		r := p.wait(t, 5*time.Second)
		if r.Reason != ReasonIntegrity || r.Err == nil {
			t.Fatalf("result %s %v, want integrity_reset", r.Reason, r.Err)
		}
		for _, c := range []*net.TCPConn{p.client, p.backend} {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Read(make([]byte, 1)); !errors.Is(err, unix.ECONNRESET) {
				t.Errorf("after integrity reset read %v, want ECONNRESET", err)
			}
		}
		if k := s.Counters(); k.IntegrityResets != 1 {
			t.Errorf("IntegrityResets %d, want 1", k.IntegrityResets)
		}
		t.Logf("reported: %v", r.Err)
	})
}

// TestSockmapDemoteHalfClosed: the client has finished sending (its FIN was
// forwarded), then a slow client reader makes the backend's bytes park and
// the connection is demoted. Its open direction is finished by the plane
// in userspace; every byte arrives, then EOF.
func TestSockmapDemoteHalfClosed(t *testing.T) {
	smEnv(t, SockmapOptions{ParkedHighWater: 1 << 20}, func(s *Sockmap, e *ptEnv) {
		p := e.pair(nil)
		defer p.close()
		if err := ptWriteStream(p.client, 11, 1000, 1000, true); err != nil {
			t.Fatal(err)
		}
		if _, err := ptReadStream(p.backend, 11, 1000, true); err != nil {
			t.Fatal(err)
		}
		// The backend keeps its side open until the demotion is done, so
		// the connection cannot simply end on the kernel path meanwhile.
		const n = 32 << 20
		werr := make(chan error, 1)
		go func() { werr <- ptWriteStream(p.backend, 12, n, 64<<10, false) }()
		var read atomic.Int64
		slow := make(chan struct{})
		time.AfterFunc(500*time.Millisecond, func() { close(slow) })
		rerr := make(chan error, 1)
		go func() {
			_, err := ptReadStream(&ptRateReader{r: p.client, slow: slow, n: &read}, 12, n, true)
			rerr <- err
		}()
		if err := <-werr; err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 500; i++ {
			if st, _ := s.Stats(p.id); st.Demoted {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		p.backend.CloseWrite()
		if err := <-rerr; err != nil {
			t.Fatal(err)
		}
		r := p.wait(t, 5*time.Second)
		k := s.Counters()
		t.Logf("result %s demoted=%v %s plane %s; counters finished=%d parked=%d", r.Reason, r.Demoted, r.DemoteReason, r.Plane, k.Finished, k.DemotedParked)
		if r.Reason != ReasonClientFIN || !r.Demoted || r.DemoteReason != DemoteParked {
			t.Errorf("result %+v", r)
		}
		if r.BackendToClient.Bytes != n || r.ClientToBackend.Bytes != 1000 {
			t.Errorf("bytes %d/%d", r.ClientToBackend.Bytes, r.BackendToClient.Bytes)
		}
		if k.Finished != 1 {
			t.Errorf("Finished %d, want 1", k.Finished)
		}
	})
}
