package dataplane

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// spRig holds two loopback listeners, one standing for the proxy's client
// side and one for a backend, and the plane under test.
type spRig struct {
	tb      testing.TB
	plane   *Splice
	proxyLn *net.TCPListener
	backLn  *net.TCPListener
	nextID  atomic.Uint64
	dialMu  sync.Mutex // accept order must match dial order
}

// spPair is one connection through the plane: the test drives client and
// backend, the plane owns the two sockets in the middle.
type spPair struct {
	id      uint64
	client  *net.TCPConn // the test's client end
	backend *net.TCPConn // the test's backend end
	done    chan Result
	calls   atomic.Int32
}

func spListen(tb testing.TB) *net.TCPListener {
	tb.Helper()
	var lc net.ListenConfig
	// MPTCP sockets cannot join a sockmap (DESIGN.md fact 7) and the proxy
	// listens without it; do the same so the sockets are plain TCP.
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("listen: %v", err)
	}
	return ln.(*net.TCPListener)
}

func spNewRig(tb testing.TB, opts SpliceOptions) *spRig {
	tb.Helper()
	r := &spRig{tb: tb, plane: NewSplice(opts), proxyLn: spListen(tb), backLn: spListen(tb)}
	tb.Cleanup(func() {
		r.plane.Close()
		r.proxyLn.Close()
		r.backLn.Close()
	})
	return r
}

// spSockets builds the four sockets of one connection: the test's client,
// the proxy's accepted client socket, the proxy's backend socket and the
// test's backend.
func (r *spRig) spSockets() (client, proxyClient, proxyBackend, backend *net.TCPConn) {
	r.tb.Helper()
	client, proxyClient, proxyBackend, backend, err := r.spDial()
	if err != nil {
		r.tb.Fatal(err)
	}
	return
}

// spDial is spSockets for goroutines other than the test's.
func (r *spRig) spDial() (client, proxyClient, proxyBackend, backend *net.TCPConn, err error) {
	r.dialMu.Lock()
	defer r.dialMu.Unlock()
	if client, err = net.DialTCP("tcp4", nil, r.proxyLn.Addr().(*net.TCPAddr)); err != nil {
		return
	}
	if proxyClient, err = r.proxyLn.AcceptTCP(); err != nil {
		return
	}
	if proxyBackend, err = net.DialTCP("tcp4", nil, r.backLn.Addr().(*net.TCPAddr)); err != nil {
		return
	}
	backend, err = r.backLn.AcceptTCP()
	return
}

// spStart hands the two middle sockets to the plane.
func (r *spRig) spStart(client, proxyClient, proxyBackend, backend *net.TCPConn, idle time.Duration) *spPair {
	r.tb.Helper()
	p, err := r.spStartErr(client, proxyClient, proxyBackend, backend, idle)
	if err != nil {
		r.tb.Fatalf("start: %v", err)
	}
	return p
}

func (r *spRig) spStartErr(client, proxyClient, proxyBackend, backend *net.TCPConn, idle time.Duration) (*spPair, error) {
	p := &spPair{id: r.nextID.Add(1), client: client, backend: backend, done: make(chan Result, 2)}
	return p, r.plane.Start(&Conn{
		ID: p.id, Client: proxyClient, Backend: proxyBackend, IdleTimeout: idle,
		Done: func(res Result) {
			p.calls.Add(1)
			p.done <- res
		},
	})
}

func (r *spRig) spPair(idle time.Duration) *spPair {
	r.tb.Helper()
	c, pc, pb, b := r.spSockets()
	p := r.spStart(c, pc, pb, b, idle)
	r.tb.Cleanup(func() {
		p.client.Close()
		p.backend.Close()
	})
	return p
}

// spWait returns the pair's Result and checks Done ran exactly once.
func (p *spPair) spWait(tb testing.TB, within time.Duration) Result {
	tb.Helper()
	res, err := p.spWaitErr(within)
	if err != nil {
		tb.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond) // a second Done would land now
	if n := p.calls.Load(); n != 1 {
		tb.Fatalf("conn %d: Done called %d times", p.id, n)
	}
	return res
}

func (p *spPair) spWaitErr(within time.Duration) (Result, error) {
	select {
	case res := <-p.done:
		if n := p.calls.Load(); n != 1 {
			return res, fmt.Errorf("conn %d: Done called %d times", p.id, n)
		}
		return res, nil
	case <-time.After(within):
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		os.WriteFile(filepath.Join(os.TempDir(), fmt.Sprintf("splice-hang-%d.txt", p.id)), buf, 0o644)
		return Result{}, fmt.Errorf("conn %d: Done not called within %v", p.id, within)
	}
}

// spSend writes n pseudo-random bytes (a stream fixed by seed) to w in
// chunks and returns their sha256.
func spSend(w io.Writer, seed uint64, n int64, chunk int) ([32]byte, error) {
	src := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), 7})
	h := sha256.New()
	buf := make([]byte, chunk)
	for n > 0 {
		b := buf[:min(int64(chunk), n)]
		src.Read(b)
		h.Write(b)
		if _, err := w.Write(b); err != nil {
			return [32]byte{}, err
		}
		n -= int64(len(b))
	}
	return [32]byte(h.Sum(nil)), nil
}

// spRecv reads r to EOF and returns the byte count and sha256.
func spRecv(r io.Reader) (int64, [32]byte, error) {
	h := sha256.New()
	n, err := io.CopyBuffer(h, r, make([]byte, 256<<10))
	return n, [32]byte(h.Sum(nil)), err
}

// spTransfer sends n bytes each way at once, each sender half-closing when
// done, and checks both streams arrive whole, followed by EOF.
func spTransfer(t *testing.T, p *spPair, n int64, chunk int) {
	t.Helper()
	type got struct {
		n   int64
		sum [32]byte
		err error
	}
	var sentC2B, sentB2C [32]byte
	var errC, errB error
	var gotB, gotC got
	var wg sync.WaitGroup
	wg.Go(func() {
		sentC2B, errC = spSend(p.client, 1, n, chunk)
		if errC == nil {
			errC = p.client.CloseWrite()
		}
	})
	wg.Go(func() {
		sentB2C, errB = spSend(p.backend, 2, n, chunk)
		if errB == nil {
			errB = p.backend.CloseWrite()
		}
	})
	wg.Go(func() { gotB.n, gotB.sum, gotB.err = spRecv(p.backend) })
	wg.Go(func() { gotC.n, gotC.sum, gotC.err = spRecv(p.client) })
	wg.Wait()
	if errC != nil || errB != nil || gotB.err != nil || gotC.err != nil {
		t.Fatalf("transfer errors: client send %v, backend send %v, backend recv %v, client recv %v", errC, errB, gotB.err, gotC.err)
	}
	if gotB.n != n || gotB.sum != sentC2B {
		t.Errorf("client→backend: got %d bytes (sha256 match %v), want %d", gotB.n, gotB.sum == sentC2B, n)
	}
	if gotC.n != n || gotC.sum != sentB2C {
		t.Errorf("backend→client: got %d bytes (sha256 match %v), want %d", gotC.n, gotC.sum == sentB2C, n)
	}
}

func TestSpliceBidirectional(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts SpliceOptions
		n    int64
	}{
		{"splice", SpliceOptions{}, 64 << 20},
		{"copy_fallback", SpliceOptions{spForceCopy: true}, 16 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := spNewRig(t, tc.opts)
			p := r.spPair(0)
			before := time.Now()
			spTransfer(t, p, tc.n, 256<<10)
			st, ok := r.plane.Stats(p.id)
			res := p.spWait(t, 5*time.Second)
			if ok {
				if st.Plane != KindSplice || st.LastActivity.Before(before) {
					t.Errorf("live stats: %+v", st)
				}
			}
			if res.Reason != ReasonClientFIN && res.Reason != ReasonBackendFIN {
				t.Errorf("reason %q, want a FIN", res.Reason)
			}
			for name, d := range map[string]Direction{"c2b": res.ClientToBackend, "b2c": res.BackendToClient} {
				if d.Bytes != uint64(tc.n) || d.Segments == 0 || d.Segments > d.Bytes {
					t.Errorf("%s counters %+v, want %d bytes", name, d, tc.n)
				}
			}
			if _, ok := r.plane.Stats(p.id); ok || r.plane.Len() != 0 {
				t.Errorf("finished connection still known (Len %d)", r.plane.Len())
			}
		})
	}
}

func TestSpliceOneByteWrites(t *testing.T) {
	r := spNewRig(t, SpliceOptions{})
	p := r.spPair(0)
	const n = 2000
	go func() {
		for i := range n {
			if _, err := p.client.Write([]byte{byte(i)}); err != nil {
				return
			}
		}
	}()
	got := make([]byte, n)
	if _, err := io.ReadFull(p.backend, got); err != nil {
		t.Fatalf("read: %v", err)
	}
	for i, b := range got {
		if b != byte(i) {
			t.Fatalf("byte %d = %d, want %d", i, b, byte(i))
		}
	}
	// Ping-pong: one byte each way, 200 times.
	one := make([]byte, 1)
	for i := range 200 {
		if _, err := p.backend.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(p.client, one); err != nil || one[0] != byte(i) {
			t.Fatalf("pong %d: %v %d", i, err, one[0])
		}
		if _, err := p.client.Write(one); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(p.backend, one); err != nil || one[0] != byte(i) {
			t.Fatalf("ping %d: %v %d", i, err, one[0])
		}
	}
	st, _ := r.plane.Stats(p.id)
	if st.ClientToBackend.Bytes != n+200 || st.BackendToClient.Bytes != 200 || st.BackendToClient.Segments != 200 {
		t.Errorf("stats %+v", st)
	}
}

// TestSpliceHalfClose: one side sends a burst and half-closes at once; all
// bytes arrive before the EOF, and the other direction keeps working.
func TestSpliceHalfClose(t *testing.T) {
	for _, first := range []spSide{spClient, spBackend} {
		t.Run(first.String()+"_first", func(t *testing.T) {
			r := spNewRig(t, SpliceOptions{})
			p := r.spPair(0)
			a, b := p.client, p.backend
			if first == spBackend {
				a, b = b, a
			}
			const n = 8 << 20
			sent := make(chan [32]byte, 1)
			go func() {
				sum, err := spSend(a, 3, n, 1<<20)
				if err != nil {
					t.Errorf("send: %v", err)
				}
				if err := a.CloseWrite(); err != nil {
					t.Errorf("close write: %v", err)
				}
				sent <- sum
			}()
			gotN, sum, err := spRecv(b)
			if want := <-sent; err != nil || gotN != n || sum != want {
				t.Fatalf("first direction: %d bytes, err %v, sha256 match %v", gotN, err, sum == want)
			}
			// The other direction still flows after the EOF.
			go func() {
				sum, err := spSend(b, 4, 1<<20, 64<<10)
				if err != nil {
					t.Errorf("reply send: %v", err)
				}
				sent <- sum
				b.CloseWrite()
			}()
			gotN, sum, err = spRecv(a)
			if want := <-sent; err != nil || gotN != 1<<20 || sum != want {
				t.Fatalf("reply: %d bytes, err %v, sha256 match %v", gotN, err, sum == want)
			}
			if res := p.spWait(t, 5*time.Second); res.Reason != first.fin() || res.Err != nil {
				t.Errorf("result %+v, want %s", res, first.fin())
			}
		})
	}
}

func spIsReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET)
}

// spAbortive closes c with an RST.
func spAbortive(t *testing.T, c *net.TCPConn) {
	t.Helper()
	if err := c.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func TestSpliceReset(t *testing.T) {
	for _, tc := range []struct {
		name      string
		side      spSide
		halfFirst bool // the resetting side sent FIN first (the reset arrives in CLOSE_WAIT)
	}{
		{"client", spClient, false},
		{"backend", spBackend, false},
		{"client_after_fin", spClient, true},
		{"backend_after_fin", spBackend, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := spNewRig(t, SpliceOptions{})
			p := r.spPair(0)
			a, b := p.client, p.backend
			if tc.side == spBackend {
				a, b = b, a
			}
			// Some traffic first, so both directions have run.
			spEcho(t, a, b, 1000)
			spEcho(t, b, a, 1000)
			if tc.halfFirst {
				a.CloseWrite()
				if n, err := b.Read(make([]byte, 1)); n != 0 || err != io.EOF {
					t.Fatalf("after FIN: %d %v, want EOF", n, err)
				}
			}
			spAbortive(t, a)
			// The plane notices the RST by itself, even after the FIN, when
			// nothing flows towards the resetting side.
			if res := p.spWait(t, 5*time.Second); res.Reason != tc.side.reset() {
				t.Errorf("reason %q, want %q", res.Reason, tc.side.reset())
			}
			if tc.halfFirst {
				// b has read the FIN: a read returns EOF before any error,
				// so the RST shows on write (EPIPE in CLOSE_WAIT).
				if _, err := b.Write([]byte("x")); !errors.Is(err, syscall.EPIPE) && !spIsReset(err) {
					t.Errorf("peer write error %v, want EPIPE or ECONNRESET", err)
				}
				return
			}
			b.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.Copy(io.Discard, b); !spIsReset(err) {
				t.Errorf("peer read error %v, want ECONNRESET", err)
			}
		})
	}
}

// spEcho sends n bytes from a and reads them at b.
func spEcho(t *testing.T, a, b *net.TCPConn, n int) {
	t.Helper()
	if err := spEchoErr(a, b, n); err != nil {
		t.Fatal(err)
	}
}

func spEchoErr(a, b *net.TCPConn, n int) error {
	msg := bytes.Repeat([]byte{'x'}, n)
	if _, err := a.Write(msg); err != nil {
		return err
	}
	_, err := io.ReadFull(b, msg)
	return err
}

func TestSpliceIdleTimeout(t *testing.T) {
	const idle = 400 * time.Millisecond
	r := spNewRig(t, SpliceOptions{})
	p := r.spPair(idle)
	// Activity every 50 ms keeps it open well past the timeout.
	for range 16 {
		time.Sleep(50 * time.Millisecond)
		spEcho(t, p.client, p.backend, 10)
	}
	select {
	case res := <-p.done:
		t.Fatalf("closed while active: %+v", res)
	default:
	}
	start := time.Now()
	res := p.spWait(t, 3*time.Second)
	if res.Reason != ReasonIdle {
		t.Errorf("reason %q, want %q", res.Reason, ReasonIdle)
	}
	// Not early (the last byte moved just before start), and not much
	// later than the timeout (loose: the test machine is shared).
	if el := time.Since(start); el < idle*3/4 || el > idle+1500*time.Millisecond {
		t.Errorf("idle close after %v, timeout %v", el, idle)
	}
	// FIN, not RST, on both sides.
	for name, c := range map[string]*net.TCPConn{"client": p.client, "backend": p.backend} {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Errorf("%s read after idle close: %d %v, want EOF", name, n, err)
		}
	}
}

func TestSpliceKill(t *testing.T) {
	for _, tc := range []struct {
		reason CloseReason
		reset  bool
	}{
		{ReasonKill, true},
		{ReasonDrain, false},
		{ReasonShutdown, false},
	} {
		t.Run(string(tc.reason), func(t *testing.T) {
			r := spNewRig(t, SpliceOptions{})
			p := r.spPair(0)
			spEcho(t, p.client, p.backend, 100)
			if !r.plane.Kill(p.id, tc.reason) {
				t.Fatal("Kill returned false for a live connection")
			}
			if res := p.spWait(t, 5*time.Second); res.Reason != tc.reason || res.ClientToBackend.Bytes != 100 {
				t.Errorf("result %+v", res)
			}
			for name, c := range map[string]*net.TCPConn{"client": p.client, "backend": p.backend} {
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				_, err := c.Read(make([]byte, 1))
				if tc.reset && !spIsReset(err) || !tc.reset && err != io.EOF {
					t.Errorf("%s read: %v (want reset %v)", name, err, tc.reset)
				}
			}
			if r.plane.Kill(p.id, tc.reason) {
				t.Error("Kill returned true for a finished connection")
			}
		})
	}
}

func TestSpliceCloseWithLiveConns(t *testing.T) {
	r := spNewRig(t, SpliceOptions{})
	var pairs []*spPair
	for range 20 {
		pairs = append(pairs, r.spPair(0))
	}
	for i, p := range pairs {
		if i%4 == 0 {
			// Bulk in flight both ways when Close comes.
			go io.Copy(io.Discard, p.backend)
			go io.Copy(io.Discard, p.client)
			go spSend(p.client, 5, 1<<30, 64<<10)
			go spSend(p.backend, 6, 1<<30, 64<<10)
		}
	}
	time.Sleep(50 * time.Millisecond)
	closeStart := time.Now()
	if err := r.plane.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("Close with %d live connections took %v", len(pairs), time.Since(closeStart))
	for _, p := range pairs {
		select {
		case res := <-p.done:
			if res.Reason != ReasonShutdown {
				t.Errorf("conn %d reason %q", p.id, res.Reason)
			}
		default:
			t.Fatalf("conn %d: Done not called before Close returned", p.id)
		}
	}
	if n := r.plane.Len(); n != 0 {
		t.Errorf("Len after Close = %d", n)
	}
	if _, total := r.plane.Pipes(); total != 0 {
		t.Errorf("%d pipes alive after Close", total)
	}
	c, pc, pb, b := r.spSockets()
	defer func() { c.Close(); pc.Close(); pb.Close(); b.Close() }()
	if err := r.plane.Start(&Conn{ID: 999, Client: pc, Backend: pb}); err == nil {
		t.Error("Start after Close succeeded")
	}
	if err := r.plane.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestSpliceStartErrors(t *testing.T) {
	r := spNewRig(t, SpliceOptions{})
	if err := r.plane.Start(nil); err == nil {
		t.Error("Start(nil) succeeded")
	}
	if err := r.plane.Start(&Conn{ID: 1}); err == nil {
		t.Error("Start without sockets succeeded")
	}
	p := r.spPair(0)
	c, pc, pb, b := r.spSockets()
	defer func() { c.Close(); pc.Close(); pb.Close(); b.Close() }()
	if err := r.plane.Start(&Conn{ID: p.id, Client: pc, Backend: pb}); err == nil {
		t.Error("Start with a duplicate ID succeeded")
	}
	// The caller still owns the sockets after a failed Start.
	spEcho(t, c, pc, 10)
	if _, ok := r.plane.Stats(12345); ok {
		t.Error("Stats of an unknown id")
	}
	if r.plane.Kill(12345, ReasonKill) {
		t.Error("Kill of an unknown id")
	}
}

// TestSpliceFileConn: a connection demoted from the sockmap plane arrives
// as sockets rebuilt with net.FileConn from its descriptors, possibly with a
// deadline left over from the handshake.
func TestSpliceFileConn(t *testing.T) {
	r := spNewRig(t, SpliceOptions{})
	c, pc, pb, b := r.spSockets()
	t.Cleanup(func() { c.Close(); b.Close() })
	rebuild := func(tc *net.TCPConn) *net.TCPConn {
		f, err := tc.File()
		if err != nil {
			t.Fatal(err)
		}
		tc.Close()
		fc, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		return fc.(*net.TCPConn)
	}
	pc, pb = rebuild(pc), rebuild(pb)
	pc.SetReadDeadline(time.Now().Add(-time.Second))
	p := r.spStart(c, pc, pb, b, 0)
	spTransfer(t, p, 4<<20, 64<<10)
	if res := p.spWait(t, 5*time.Second); res.ClientToBackend.Bytes != 4<<20 {
		t.Errorf("result %+v", res)
	}
}

// spFDs counts this process's open descriptors and, among them, pipes.
func spFDs(tb testing.TB) (all, pipes int) {
	tb.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatal(err)
	}
	for _, e := range ents {
		all++
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.HasPrefix(l, "pipe:") {
			pipes++
		}
	}
	return all, pipes
}

// spSettle waits until f() <= want, up to 5 s, and returns the last value.
func spSettle(want int, f func() int) int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		v := f()
		if v <= want || time.Now().After(deadline) {
			return v
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// spShortConn runs one short connection: a request and a reply, then a
// close that varies with i (client FIN, backend FIN, client RST).
func spShortConn(r *spRig, i int, calls *atomic.Int32) error {
	p, err := spShortConnPair(r, i)
	if p != nil {
		calls.Add(-1)
		// Read at the end of the test, so a late second Done counts.
		r.tb.Cleanup(func() { calls.Add(p.calls.Load()) })
	}
	return err
}

func spShortConnPair(r *spRig, i int) (*spPair, error) {
	c, pc, pb, b, err := r.spDial()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	defer b.Close()
	p, err := r.spStartErr(c, pc, pb, b, 0)
	if err != nil {
		return nil, err
	}
	if err := spEchoErr(c, b, 100); err != nil {
		return p, err
	}
	if err := spEchoErr(b, c, 100); err != nil {
		return p, err
	}
	var want CloseReason
	switch i % 3 {
	case 0:
		c.CloseWrite()
		io.Copy(io.Discard, b)
		b.Close()
		io.Copy(io.Discard, c)
		want = ReasonClientFIN
	case 1:
		b.CloseWrite()
		io.Copy(io.Discard, c)
		c.Close()
		io.Copy(io.Discard, b)
		want = ReasonBackendFIN
	case 2:
		c.SetLinger(0)
		c.Close()
		io.Copy(io.Discard, b)
		want = ReasonClientReset
	}
	res, err := p.spWaitErr(5 * time.Second)
	if err == nil && res.Reason != want {
		err = fmt.Errorf("conn %d: reason %q, want %q", p.id, res.Reason, want)
	}
	return p, err
}

func TestSpliceShortConnsNoLeak(t *testing.T) {
	r := spNewRig(t, SpliceOptions{MaxIdlePipes: 4})
	var calls atomic.Int32 // Done calls minus connections
	// Registered first, so it runs after the per-connection cleanups (LIFO)
	// have added their counts.
	t.Cleanup(func() {
		if c := calls.Load(); c != 0 {
			t.Errorf("Done calls minus connections = %d", c)
		}
	})
	for i := range 30 { // warm up: runtime poller, pool, thread pool
		if err := spShortConn(r, i, &calls); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	fds0, _ := spFDs(t)
	gs0 := runtime.NumGoroutine()

	const n = 2000
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < n; i += 4 {
				if err := spShortConn(r, i, &calls); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()

	if l := r.plane.Len(); l != 0 {
		t.Errorf("Len = %d after all connections ended", l)
	}
	if gs := spSettle(gs0, runtime.NumGoroutine); gs > gs0 {
		t.Errorf("goroutines: %d before, %d after", gs0, gs)
	}
	idle, total := r.plane.Pipes()
	if idle > 4 || total > 4 {
		t.Errorf("pipes after: %d idle, %d total, bound 4", idle, total)
	}
	// The pool may have grown from the warm-up level to its bound.
	if fds := spSettle(fds0+2*4, func() int { f, _ := spFDs(t); return f }); fds > fds0+2*4 {
		t.Errorf("fds: %d before, %d after", fds0, fds)
	}
}

// TestSpliceIdleHoldsNoPipe: after traffic on 100 connections at once, while
// they sit idle, only the pool's bounded idle pipes remain.
func TestSpliceIdleHoldsNoPipe(t *testing.T) {
	const bound, conns = 4, 100
	runtime.GC() // finalizers close pipes io.Copy's pool left behind
	_, pipes0 := spFDs(t)
	r := spNewRig(t, SpliceOptions{MaxIdlePipes: bound})
	pairs := make([]*spPair, conns)
	for i := range pairs {
		pairs[i] = r.spPair(0)
	}
	var wg sync.WaitGroup
	for _, p := range pairs {
		wg.Go(func() {
			msg := make([]byte, 256<<10)
			if _, err := p.client.Write(msg); err != nil {
				t.Error(err)
			}
			if _, err := io.ReadFull(p.backend, msg); err != nil {
				t.Error(err)
			}
			if _, err := p.backend.Write(msg[:4096]); err != nil {
				t.Error(err)
			}
			if _, err := io.ReadFull(p.client, msg[:4096]); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	_, pipes := spFDs(t)
	idle, total := r.plane.Pipes()
	t.Logf("%d idle connections: %d pipe fds (%d before), pool %d idle / %d total", conns, pipes, pipes0, idle, total)
	if (pipes-pipes0)/2 > bound || total > bound {
		t.Errorf("idle connections hold pipes: %d pipe fds beyond baseline, pool total %d, bound %d", pipes-pipes0, total, bound)
	}
	if r.plane.Len() != conns {
		t.Errorf("Len = %d, want %d", r.plane.Len(), conns)
	}
}

func TestSplicePipePool(t *testing.T) {
	pp := &spPipePool{size: 64 << 10, max: 2}
	var ps []*spPipe
	for range 5 {
		p, err := pp.spGet()
		if err != nil {
			t.Fatal(err)
		}
		if p.cap < 4096 {
			t.Fatalf("pipe capacity %d", p.cap)
		}
		ps = append(ps, p)
	}
	// A pipe given back with bytes in it is closed, not pooled.
	if _, err := unix.Write(ps[0].w, []byte("stale")); err != nil {
		t.Fatal(err)
	}
	ps[0].n = 5
	pp.spPut(ps[0])
	if _, err := unix.FcntlInt(uintptr(ps[0].r), unix.F_GETFD, 0); err != unix.EBADF {
		t.Errorf("non-empty pipe still open (err %v)", err)
	}
	for _, p := range ps[1:] {
		pp.spPut(p)
	}
	if idle, live := pp.spCounts(); idle != 2 || live != 2 {
		t.Errorf("pool: %d idle, %d live, want 2 and 2", idle, live)
	}
	pp.spCloseAll()
	if idle, live := pp.spCounts(); idle != 0 || live != 0 {
		t.Errorf("after close: %d idle, %d live", idle, live)
	}
}
