package dataplane

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestPlaneBulkBothWays streams 256 MiB each way at once, every byte
// checked, then half-closes each way: all bytes arrive, then EOF.
func TestPlaneBulkBothWays(t *testing.T) {
	n := int64(256 << 20)
	if testing.Short() {
		n = 32 << 20
	}
	ptEach(t, func(t *testing.T, e *ptEnv) {
		p := e.pair(nil)
		defer p.close()
		start := time.Now()
		if err := ptBothWays(p, 1, n, 256<<10); err != nil {
			r := p.wait(t, 10*time.Second)
			t.Fatalf("%v; result %s %v", err, r.Reason, r.Err)
		}
		el := time.Since(start)
		t.Logf("idle close after %v", el)
		r := p.wait(t, 10*time.Second)
		t.Logf("%d MiB each way in %v; result %s plane=%s demoted=%v(%s) c2b=%d b2c=%d",
			n>>20, el.Round(time.Millisecond), r.Reason, r.Plane, r.Demoted, r.DemoteReason,
			r.ClientToBackend.Bytes, r.BackendToClient.Bytes)
		if r.Reason != ReasonClientFIN && r.Reason != ReasonBackendFIN {
			t.Errorf("reason %s (%v), want a FIN", r.Reason, r.Err)
		}
		if r.ClientToBackend.Bytes != uint64(n) || r.BackendToClient.Bytes != uint64(n) {
			t.Errorf("stats %d/%d bytes, want %d each way", r.ClientToBackend.Bytes, r.BackendToClient.Bytes, n)
		}
	})
}

// ptEcho echoes everything c reads back to c until EOF, then closes the
// write side.
func ptEcho(c *net.TCPConn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			c.CloseWrite()
			return
		}
	}
}

// TestPlaneMessages sends messages of 1 byte to 1 MiB through an echoing
// backend, one at a time, each checked. Such traffic must never be demoted.
func TestPlaneMessages(t *testing.T) {
	sizes := []int{1, 2, 3, 7, 8, 63, 64, 65, 1000, 1460, 1500, 4095, 4096, 4097,
		16384, 65535, 65536, 65537, 100000, 262144, 1 << 20}
	ptEach(t, func(t *testing.T, e *ptEnv) {
		p := e.pair(nil)
		defer p.close()
		go ptEcho(p.backend)
		for i, n := range sizes {
			seed := uint64(100 + i)
			werr := make(chan error, 1)
			go func() { werr <- ptWriteStream(p.client, seed, int64(n), n, false) }()
			p.client.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := ptReadStream(p.client, seed, int64(n), false); err != nil {
				t.Fatalf("message of %d bytes: %v", n, err)
			}
			if err := <-werr; err != nil {
				t.Fatalf("message of %d bytes: %v", n, err)
			}
		}
		p.client.SetReadDeadline(time.Time{})
		var total uint64
		for _, n := range sizes {
			total += uint64(n)
		}
		// A plane may count a write after the reader saw its bytes.
		var st Stats
		for i := 0; i < 100; i++ {
			var ok bool
			if st, ok = e.plane.Stats(p.id); !ok {
				t.Fatal("Stats: unknown connection")
			}
			if st.ClientToBackend.Bytes == total && st.BackendToClient.Bytes == total {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if st.Demoted {
			t.Errorf("message traffic was demoted (%s)", st.DemoteReason)
		}
		if st.ClientToBackend.Bytes != total || st.BackendToClient.Bytes != total {
			t.Errorf("Stats bytes %d/%d, want %d", st.ClientToBackend.Bytes, st.BackendToClient.Bytes, total)
		}
		if e.kind.kernel && st.Plane != KindSockmap {
			t.Errorf("Stats plane %s, want sockmap", st.Plane)
		}
		p.client.CloseWrite()
		if _, err := io.Copy(io.Discard, p.client); err != nil {
			t.Fatalf("waiting for EOF: %v", err)
		}
		r := p.wait(t, 5*time.Second)
		if r.Reason != ReasonClientFIN {
			t.Errorf("reason %s (%v), want client_fin", r.Reason, r.Err)
		}
	})
}

// TestPlanePipelined sends bytes right behind both handshake heads, before
// the plane has the sockets (they are in the receive queues at insertion:
// fact 3), then more after; both streams must arrive whole and in order.
func TestPlanePipelined(t *testing.T) {
	extras := []int{0, 1, 1000, 70000, 300000}
	ptEach(t, func(t *testing.T, e *ptEnv) {
		for i, ce := range extras {
			be := extras[len(extras)-1-i]
			const after = 1 << 20
			cs, bs := &ptStream{seed: uint64(200 + i)}, &ptStream{seed: uint64(300 + i)}
			hs := &ptHandshake{clientExtra: make([]byte, ce), backendExtra: make([]byte, be)}
			cs.fill(hs.clientExtra)
			bs.fill(hs.backendExtra)
			p := e.pair(hs)
			var wg sync.WaitGroup
			errs := make([]error, 4)
			wg.Add(4)
			go func() { defer wg.Done(); errs[0] = ptContinue(p.client, cs, after) }()
			go func() { defer wg.Done(); errs[1] = ptContinue(p.backend, bs, after) }()
			go func() { defer wg.Done(); _, errs[2] = ptReadStream(p.backend, cs.seed, int64(ce+after), true) }()
			go func() { defer wg.Done(); _, errs[3] = ptReadStream(p.client, bs.seed, int64(be+after), true) }()
			wg.Wait()
			if err := errors.Join(errs...); err != nil {
				t.Fatalf("client extra %d, backend extra %d: %v", ce, be, err)
			}
			r := p.wait(t, 5*time.Second)
			if got := r.ClientToBackend.Bytes; got != uint64(ce+after) {
				t.Errorf("client extra %d: %d bytes counted, want %d", ce, got, ce+after)
			}
			p.close()
		}
	})
}

// ptContinue writes n more bytes of s to c and closes the write side.
func ptContinue(c *net.TCPConn, s *ptStream, n int) error {
	buf := make([]byte, n)
	s.fill(buf)
	if _, err := c.Write(buf); err != nil {
		return err
	}
	return c.CloseWrite()
}

// TestPlaneHalfClose closes one side's write half while its bytes are
// still in flight (the reader has not started), then the other side sends
// on the half-closed connection: every byte arrives, then EOF, each way.
func TestPlaneHalfClose(t *testing.T) {
	const n = 16 << 20
	ptEach(t, func(t *testing.T, e *ptEnv) {
		for _, first := range []int{0, 1} {
			p := e.pair(nil)
			ends := [2]*net.TCPConn{p.client, p.backend}
			a, b := ends[first], ends[1-first]
			werr := make(chan error, 1)
			go func() { werr <- ptWriteStream(a, 7, n, 64<<10, true) }()
			time.Sleep(50 * time.Millisecond) // let bytes and the FIN queue up
			if _, err := ptReadStream(b, 7, n, true); err != nil {
				t.Fatalf("%s first: %v", smSide(first), err)
			}
			if err := <-werr; err != nil {
				t.Fatalf("%s first: %v", smSide(first), err)
			}
			// Now the other way, on the half-closed connection.
			go func() { werr <- ptWriteStream(b, 8, n, 64<<10, true) }()
			if _, err := ptReadStream(a, 8, n, true); err != nil {
				t.Fatalf("%s first, reverse: %v", smSide(first), err)
			}
			if err := <-werr; err != nil {
				t.Fatalf("%s first, reverse: %v", smSide(first), err)
			}
			r := p.wait(t, 5*time.Second)
			want := []CloseReason{ReasonClientFIN, ReasonBackendFIN}[first]
			if r.Reason != want {
				t.Errorf("%s first: reason %s (%v), want %s", smSide(first), r.Reason, r.Err, want)
			}
			t.Logf("%s first: plane %s demoted=%v %s", smSide(first), r.Plane, r.Demoted, r.DemoteReason)
			p.close()
		}
	})
}

// TestPlaneReset: an RST from either side resets the other side too.
func TestPlaneReset(t *testing.T) {
	ptEach(t, func(t *testing.T, e *ptEnv) {
		for _, side := range []int{0, 1} {
			p := e.pair(nil)
			ends := [2]*net.TCPConn{p.client, p.backend}
			a, b := ends[side], ends[1-side]
			if _, err := a.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 5)
			if _, err := io.ReadFull(b, buf); err != nil {
				t.Fatal(err)
			}
			a.SetLinger(0)
			a.Close()
			b.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := b.Read(buf)
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("%s reset: other side read %v, want ECONNRESET", smSide(side), err)
			}
			r := p.wait(t, 5*time.Second)
			want := []CloseReason{ReasonClientReset, ReasonBackendReset}[side]
			if r.Reason != want {
				t.Errorf("%s reset: reason %s, want %s", smSide(side), r.Reason, want)
			}
			b.Close()
		}
	})
}

// TestPlaneKillAndIdle: Kill resets both sides; an idle connection is
// closed with FIN after its IdleTimeout.
func TestPlaneKillAndIdle(t *testing.T) {
	ptEach(t, func(t *testing.T, e *ptEnv) {
		p := e.pair(nil)
		if !e.plane.Kill(p.id, ReasonKill) {
			t.Fatal("Kill: unknown connection")
		}
		p.client.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := p.client.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("after Kill client read %v, want ECONNRESET", err)
		}
		if r := p.wait(t, 5*time.Second); r.Reason != ReasonKill {
			t.Errorf("reason %s, want kill", r.Reason)
		}
		p.close()
		if e.plane.Kill(p.id, ReasonKill) {
			t.Error("Kill of a finished connection returned true")
		}

		q, err := e.tryPair(nil, 300*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		defer q.close()
		q.client.Write([]byte("x"))
		io.ReadFull(q.backend, make([]byte, 1))
		start := time.Now()
		r := q.wait(t, 10*time.Second)
		if r.Reason != ReasonIdle {
			t.Errorf("reason %s, want idle_timeout", r.Reason)
		}
		el := time.Since(start)
		t.Logf("idle close after %v", el)
		if el < 250*time.Millisecond || el > 3*time.Second {
			t.Errorf("idle close after %v, want about 300ms", el)
		}
		q.client.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := q.client.Read(make([]byte, 1)); err != io.EOF {
			t.Errorf("idle close: client read %v, want EOF", err)
		}
	})
}

// TestPlaneSlowReader: a sender as fast as it can against a reader of about
// 4 MiB/s. Kernel memory (MemAvailable, Slab) must stay bounded and the
// sender must be held back by TCP, then every byte arrives.
func TestPlaneSlowReader(t *testing.T) {
	dur := 3 * time.Second
	if testing.Short() {
		dur = time.Second
	}
	ptEach(t, func(t *testing.T, e *ptEnv) {
		p := e.pair(nil)
		defer p.close()
		m0 := ptMeminfo(t)
		var sent, read atomic.Int64
		stop := make(chan struct{})
		werr := make(chan error, 1)
		go func() {
			s := &ptStream{seed: 9}
			buf := make([]byte, 256<<10)
			for {
				select {
				case <-stop:
					werr <- p.client.CloseWrite()
					return
				default:
				}
				s.fill(buf)
				if _, err := p.client.Write(buf); err != nil {
					werr <- err
					return
				}
				sent.Add(int64(len(buf)))
			}
		}()
		rerr := make(chan error, 1)
		slow := make(chan struct{})
		go func() {
			// Slow phase: 64 KiB every 16 ms, then as fast as possible.
			r := &ptRateReader{r: p.backend, slow: slow, n: &read}
			_, err := ptReadStream(r, 9, -1, true)
			rerr <- err
		}()
		var maxAvail, maxSlab, maxParked int64
		sm, _ := e.plane.(*Sockmap)
		deadline := time.Now().Add(dur)
		for time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
			m := ptMeminfo(t)
			maxAvail = max(maxAvail, m0["MemAvailable"]-m["MemAvailable"])
			maxSlab = max(maxSlab, m["Slab"]-m0["Slab"])
			if sm != nil {
				maxParked = max(maxParked, sm.Counters().ParkedBytes)
			}
		}
		inFlight := sent.Load() - read.Load()
		close(stop)
		close(slow)
		if err := <-rerr; err != nil {
			t.Fatal(err)
		}
		if err := <-werr; err != nil {
			t.Fatal(err)
		}
		p.backend.CloseWrite()
		if _, err := io.Copy(io.Discard, p.client); err != nil {
			t.Fatal(err)
		}
		r := p.wait(t, 10*time.Second)
		c := ""
		if s, ok := e.plane.(*Sockmap); ok {
			k := s.Counters()
			c = fmt.Sprintf("; drain max %v", k.DrainMax)
		}
		t.Logf("slow reader %v: sent %d MiB, read %d MiB before speed-up, %d MiB in flight; parked max %d KiB (plane's estimate); MemAvailable drop max %d MiB, Slab growth max %d MiB; plane %s demoted=%v %s%s",
			dur, (sent.Load())>>20, read.Load()>>20, inFlight>>20, maxParked>>10, maxAvail>>20, maxSlab>>20, r.Plane, r.Demoted, r.DemoteReason, c)
		// Unbounded, the sockmap path parked 4.2 GiB in 10s (fact 5).
		// MemAvailable moves with every process on this machine, so its
		// bound is loose. The plane's own estimate may pass the mark (4
		// MiB) by what a fast sender parks between two polls and during
		// the iter/tcp pass (DESIGN measured 13-31 MiB at 1 GB/s).
		if maxAvail > 1<<30 {
			t.Errorf("MemAvailable dropped by %d MiB", maxAvail>>20)
		}
		if maxParked > 64<<20 {
			t.Errorf("parked estimate reached %d MiB", maxParked>>20)
		}
		if inFlight > 64<<20 {
			t.Errorf("%d MiB sent but unread: the sender was not held back", inFlight>>20)
		}
		if e.kind.demote && !r.Demoted {
			t.Errorf("slow reader not demoted")
		}
	}, "sockmap-nodemote")
}

// ptRateReader reads at most 64 KiB every 16 ms until slow is closed.
type ptRateReader struct {
	r    io.Reader
	slow chan struct{}
	n    *atomic.Int64
	fast bool
}

func (r *ptRateReader) Read(b []byte) (int, error) {
	if !r.fast {
		select {
		case <-r.slow:
			r.fast = true
		case <-time.After(16 * time.Millisecond):
			b = b[:min(len(b), 64<<10)]
		}
	}
	n, err := r.r.Read(b)
	r.n.Add(int64(n))
	return n, err
}

// TestPlaneShortConnsNoLeak runs 10,000 short connections (1,000 with
// -short), one after another; afterwards the plane holds nothing: no
// connection, no map entry, no fd, no goroutine.
func TestPlaneShortConnsNoLeak(t *testing.T) {
	n := 10000
	if testing.Short() {
		n = 1000
	}
	ptEach(t, func(t *testing.T, e *ptEnv) {
		// Warm up pools and the loop before taking the baseline.
		ptShortConn(t, e)
		time.Sleep(50 * time.Millisecond)
		fds0, g0 := ptCounts(t)
		start := time.Now()
		// Sockets are made on this (namespace) thread; four workers
		// exchange bytes and close, so connections overlap a little.
		work := make(chan *ptPair, 4)
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for p := range work {
					if err := ptShortExchange(p); err != nil {
						t.Error(err)
					}
				}
			}()
		}
		for i := 0; i < n && !t.Failed(); i++ {
			work <- e.pair(nil)
		}
		close(work)
		wg.Wait()
		el := time.Since(start)
		var fds, g int
		for i := 0; i < 100; i++ {
			fds, g = ptCounts(t)
			if sp, ok := e.plane.(interface{ Pipes() (int, int) }); ok {
				// The splice plane keeps idle pipes for reuse.
				idle, _ := sp.Pipes()
				fds -= 2 * idle
			}
			if fds <= fds0 && g <= g0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("%d connections in %v (%v each); fds %d -> %d, goroutines %d -> %d",
			n, el.Round(time.Millisecond), (el / time.Duration(n)).Round(time.Microsecond), fds0, fds, g0, g)
		if fds > fds0 {
			t.Errorf("fds leaked: %d -> %d", fds0, fds)
		}
		if g > g0 {
			t.Errorf("goroutines leaked: %d -> %d", g0, g)
		}
		if l, ok := e.plane.(interface{ Len() int }); ok && l.Len() != 0 {
			t.Errorf("plane still holds %d connections", l.Len())
		}
		if s, ok := e.plane.(*Sockmap); ok {
			v, tg, err := s.MapEntries()
			if err != nil {
				t.Fatal(err)
			}
			if v != 0 || tg != 0 {
				t.Errorf("map entries left: verdict %d, target %d", v, tg)
			}
			var k uint64
			var st sockmapSockState
			socks := 0
			it := s.bpf.objs.Socks.Iterate()
			for it.Next(&k, &st) {
				socks++
			}
			if socks != 0 {
				t.Errorf("%d socks entries left", socks)
			}
			c := s.Counters()
			t.Logf("counters: %+v", c)
		}
	}, "sockmap-nodemote") // same path as sockmap for short connections
}

func ptShortConn(t *testing.T, e *ptEnv) {
	if err := ptShortExchange(e.pair(nil)); err != nil {
		t.Fatal(err)
	}
}

// ptShortExchange sends a ping and a pong, closes both ends and waits for
// the plane's Done.
func ptShortExchange(p *ptPair) error {
	defer p.close()
	if _, err := p.client.Write([]byte("ping")); err != nil {
		return err
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(p.backend, b); err != nil {
		return err
	}
	if _, err := p.backend.Write([]byte("pong")); err != nil {
		return err
	}
	if _, err := io.ReadFull(p.client, b); err != nil || string(b) != "pong" {
		return fmt.Errorf("pong: %q %v", b, err)
	}
	p.client.Close()
	p.backend.Close()
	select {
	case r := <-p.res:
		switch r.Reason {
		case ReasonClientFIN, ReasonBackendFIN, ReasonClientReset, ReasonBackendReset:
			return nil
		}
		return fmt.Errorf("conn %d: reason %s (%v)", p.id, r.Reason, r.Err)
	case <-time.After(5 * time.Second):
		return fmt.Errorf("conn %d: no Done after 5s", p.id)
	}
}

// TestPlaneStop: closing the plane (agent stop) ends every connection with
// FIN after the bytes already sent, calls every Done with
// ReasonShutdown, and leaves nothing behind.
func TestPlaneStop(t *testing.T) {
	ptEach(t, func(t *testing.T, e *ptEnv) {
		var pairs []*ptPair
		for i := range 8 {
			p := e.pair(nil)
			defer p.close()
			pairs = append(pairs, p)
			msg := fmt.Appendf(nil, "message %d", i)
			if _, err := p.client.Write(msg); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(p.backend, make([]byte, len(msg))); err != nil {
				t.Fatal(err)
			}
		}
		// Bytes in flight at stop time on one connection.
		last := pairs[len(pairs)-1]
		data := make([]byte, 1<<20)
		(&ptStream{seed: 5}).fill(data)
		if _, err := last.backend.Write(data); err != nil {
			t.Fatal(err)
		}
		e.closed = true
		if err := e.plane.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		for _, p := range pairs {
			select {
			case r := <-p.res:
				if r.Reason != ReasonShutdown {
					t.Errorf("conn %d: reason %s, want shutdown", p.id, r.Reason)
				}
			default:
				t.Errorf("conn %d: Done not called before Close returned", p.id)
			}
		}
		last.client.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := ptReadStream(last.client, 5, int64(len(data)), true); err != nil {
			// The sockmap plane waits (up to 2s) for redirected bytes to
			// be queued before its FIN. The Plane contract does not
			// promise it, and the splice plane does not do it.
			if e.kind.kernel {
				t.Errorf("in-flight bytes at stop: %v", err)
			} else {
				t.Logf("in-flight bytes at stop (not promised by this plane): %v", err)
			}
		}
		for _, p := range pairs[:len(pairs)-1] {
			p.client.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := p.client.Read(make([]byte, 1)); n != 0 || err != io.EOF {
				t.Errorf("conn %d client after stop: %d, %v; want EOF", p.id, n, err)
			}
			p.backend.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := p.backend.Read(make([]byte, 1)); n != 0 || err != io.EOF {
				t.Errorf("conn %d backend after stop: %d, %v; want EOF", p.id, n, err)
			}
		}
		if l, ok := e.plane.(interface{ Len() int }); ok && l.Len() != 0 {
			t.Errorf("plane still holds %d connections", l.Len())
		}
	})
}
