package dataplane

// The shared harness: one suite of behaviour tests that every data plane
// must pass (sockmap with and without demotion, splice). Each subtest runs
// in a network namespace of its own, with a client listener standing in
// for the proxy's and a backend listener, and streams whose bytes are a
// function of (seed, offset) so that a reader can tell loss, duplication
// and reordering apart, and say where.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wsplice/wsplice/test/testutil"
)

// ptPlane names a plane under test and builds it inside the test's
// namespace (NewSockmap captures the namespace of the calling thread).
type ptPlane struct {
	name string
	// kernel is set for the sockmap variants.
	kernel bool
	// demote is set when the plane may demote on its own (parked bytes).
	demote bool
	new    func(tb testing.TB) Plane
}

func ptPlanes() []ptPlane {
	return []ptPlane{
		{name: "sockmap", kernel: true, demote: true, new: func(tb testing.TB) Plane {
			return ptNewSockmap(tb, SockmapOptions{})
		}},
		{name: "sockmap-nodemote", kernel: true, new: func(tb testing.TB) Plane {
			return ptNewSockmap(tb, SockmapOptions{ParkedHighWater: -1})
		}},
		{name: "splice", new: func(tb testing.TB) Plane {
			return NewSplice(SpliceOptions{})
		}},
	}
}

func ptNewSockmap(tb testing.TB, o SockmapOptions) *Sockmap {
	tb.Helper()
	if o.Fallback == nil {
		o.Fallback = NewSplice(SpliceOptions{})
	}
	s, err := NewSockmap(o)
	if err != nil {
		tb.Fatalf("NewSockmap: %v", err)
	}
	return s
}

// ptEach runs fn once per plane, each in its own network namespace.
// skip, if set, names planes fn does not apply to.
func ptEach(t *testing.T, fn func(t *testing.T, e *ptEnv), skip ...string) {
	for _, p := range ptPlanes() {
		t.Run(p.name, func(t *testing.T) {
			for _, s := range skip {
				if s == p.name {
					t.Skipf("not meaningful for %s", p.name)
				}
			}
			ptInNS(t, func() {
				e := newPtEnv(t, p.new(t))
				e.kind = p
				defer e.close()
				fn(t, e)
			})
		})
	}
}

// ptInNS runs fn on a locked thread in a fresh network namespace. Every
// socket must be created on that thread: dial from fn itself, never from
// a goroutine it starts (accepted sockets inherit the listener's).
func ptInNS(tb testing.TB, fn func()) {
	tb.Helper()
	testutil.RequirePrivileged(tb)
	testutil.InNetNS(tb, fn)
}

// ptEnv is one test's world.
type ptEnv struct {
	tb        testing.TB
	plane     Plane
	kind      ptPlane
	lnClient  *net.TCPListener // stands in for the proxy's listener
	lnBackend *net.TCPListener
	nextID    atomic.Uint64
	closed    bool
}

func newPtEnv(tb testing.TB, p Plane) *ptEnv {
	tb.Helper()
	e := &ptEnv{tb: tb, plane: p}
	e.lnClient = ptListen(tb)
	e.lnBackend = ptListen(tb)
	return e
}

func (e *ptEnv) close() {
	if !e.closed {
		e.closed = true
		if err := e.plane.Close(); err != nil {
			e.tb.Errorf("plane Close: %v", err)
		}
	}
	e.lnClient.Close()
	e.lnBackend.Close()
}

func ptListen(tb testing.TB) *net.TCPListener {
	tb.Helper()
	var lc net.ListenConfig
	lc.SetMultipathTCP(false) // fact 7
	ln, err := lc.Listen(tb.Context(), "tcp4", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("listen: %v", err)
	}
	return ln.(*net.TCPListener)
}

func ptDial(tb testing.TB, addr net.Addr) *net.TCPConn {
	tb.Helper()
	var d net.Dialer
	d.SetMultipathTCP(false)
	c, err := d.Dial("tcp4", addr.String())
	if err != nil {
		tb.Fatalf("dial: %v", err)
	}
	return c.(*net.TCPConn)
}

// ptPair is one proxied connection: the application's two ends and the
// plane's result.
type ptPair struct {
	id      uint64
	client  *net.TCPConn // the application client's socket
	backend *net.TCPConn // the application backend's socket
	res     chan Result
}

// ptHandshake, when set on pair, makes the pair exchange HTTP-like heads
// through the "proxy" first, with extra bytes pipelined behind each head.
type ptHandshake struct {
	clientExtra  []byte // sent by the client right behind its head
	backendExtra []byte // sent by the backend right behind its response
}

// pair makes a connection pair and starts it on the plane.
func (e *ptEnv) pair(hs *ptHandshake) *ptPair {
	e.tb.Helper()
	p, err := e.tryPair(hs, 0)
	if err != nil {
		e.tb.Fatalf("pair: %v", err)
	}
	return p
}

func (e *ptEnv) tryPair(hs *ptHandshake, idle time.Duration) (*ptPair, error) {
	tb := e.tb
	cl := ptDial(tb, e.lnClient.Addr())
	pc, err := e.lnClient.AcceptTCP()
	if err != nil {
		return nil, err
	}
	var head []byte
	if hs != nil {
		// The client sends its head and pipelined bytes at once; the
		// proxy reads exactly the head, never more.
		msg := append([]byte("GET /ws HTTP/1.1\r\nHost: t\r\n\r\n"), hs.clientExtra...)
		go cl.Write(msg)
		if head, err = ptReadHead(pc); err != nil {
			return nil, err
		}
	}
	pb := ptDial(tb, e.lnBackend.Addr())
	bk, err := e.lnBackend.AcceptTCP()
	if err != nil {
		return nil, err
	}
	if hs != nil {
		if _, err := pb.Write(head); err != nil {
			return nil, err
		}
		if _, err := ptReadHead(bk); err != nil {
			return nil, err
		}
		resp := append([]byte("HTTP/1.1 101 Switching Protocols\r\n\r\n"), hs.backendExtra...)
		go bk.Write(resp)
		rh, err := ptReadHead(pb)
		if err != nil {
			return nil, err
		}
		if _, err := pc.Write(rh); err != nil {
			return nil, err
		}
		got, err := ptReadHead(cl)
		if err != nil {
			return nil, err
		}
		if !bytes.Equal(got, rh) {
			return nil, fmt.Errorf("client got head %q", got)
		}
	}
	p := &ptPair{id: e.nextID.Add(1), client: cl, backend: bk, res: make(chan Result, 1)}
	c := &Conn{ID: p.id, Client: pc, Backend: pb, IdleTimeout: idle, Done: func(r Result) {
		select {
		case p.res <- r:
		default:
			tb.Errorf("conn %d: Done called twice", p.id)
		}
	}}
	if err := e.plane.Start(c); err != nil {
		pc.Close()
		pb.Close()
		cl.Close()
		bk.Close()
		return nil, fmt.Errorf("Start: %w", err)
	}
	return p, nil
}

// ptReadHead reads up to and including "\r\n\r\n", one byte at a time, so
// nothing behind the head is consumed (a proxy must not over-read).
func ptReadHead(c net.Conn) ([]byte, error) {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	var b []byte
	one := make([]byte, 1)
	for !bytes.HasSuffix(b, []byte("\r\n\r\n")) {
		if _, err := io.ReadFull(c, one); err != nil {
			return b, fmt.Errorf("reading head: %w", err)
		}
		b = append(b, one[0])
	}
	return b, nil
}

func (p *ptPair) close() {
	p.client.Close()
	p.backend.Close()
}

// wait returns the plane's result for p.
func (p *ptPair) wait(tb testing.TB, d time.Duration) Result {
	tb.Helper()
	select {
	case r := <-p.res:
		return r
	case <-time.After(d):
		tb.Fatalf("conn %d: no Done after %v", p.id, d)
		return Result{}
	}
}

// ptStream is a numbered stream: byte i of stream seed is a fixed function
// of (seed, i), so a reader checks every byte at its offset. The bytes come
// from a pseudo-random pattern of a prime-ish length (1 MiB + 7), entered at
// an offset that depends on the seed: a lost, repeated or reordered skb
// (at most 64 KiB) shifts the stream by less than the pattern and shows.
// Filling is a memmove, so checking stays fast under the race detector.
type ptStream struct {
	seed uint64
	off  uint64
}

var ptPattern = func() []byte {
	b := make([]byte, 1<<20+7)
	for i := range b {
		b[i] = byte(ptWord(0x5eed, uint64(i)/8) >> (8 * (i % 8)))
	}
	return b
}()

func ptWord(seed, i uint64) uint64 {
	z := seed + i*0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// fill writes the stream's next len(b) bytes into b.
func (s *ptStream) fill(b []byte) {
	p := uint64(len(ptPattern))
	for len(b) > 0 {
		n := copy(b, ptPattern[(s.seed*7919+s.off)%p:])
		b = b[n:]
		s.off += uint64(n)
	}
}

// ptWriteStream writes n bytes of stream seed to w in chunks of random
// size up to maxChunk, then closes the write side if closeWrite.
func ptWriteStream(w *net.TCPConn, seed uint64, n int64, maxChunk int, closeWrite bool) error {
	s := &ptStream{seed: seed}
	buf := make([]byte, maxChunk)
	rng := rand.New(rand.NewPCG(seed, 1))
	for n > 0 {
		k := int64(1 + rng.IntN(maxChunk))
		k = min(k, n)
		s.fill(buf[:k])
		if _, err := w.Write(buf[:k]); err != nil {
			return fmt.Errorf("write at %d: %w", s.off-uint64(k), err)
		}
		n -= k
	}
	if closeWrite {
		return w.CloseWrite()
	}
	return nil
}

// ptReadStream reads r to EOF (or until n bytes if n >= 0 and !wantEOF)
// and checks every byte against stream seed.
func ptReadStream(r io.Reader, seed uint64, n int64, wantEOF bool) (int64, error) {
	s := &ptStream{seed: seed}
	buf := make([]byte, 256<<10)
	want := make([]byte, len(buf))
	var got int64
	for {
		lim := len(buf)
		if !wantEOF && n-got < int64(lim) {
			lim = int(n - got)
			if lim == 0 {
				return got, nil
			}
		}
		k, err := r.Read(buf[:lim])
		if k > 0 {
			s.fill(want[:k])
			if !bytes.Equal(buf[:k], want[:k]) {
				j := 0
				for j < k && buf[j] == want[j] {
					j++
				}
				return got + int64(j), fmt.Errorf("stream %d: byte %d differs (read of %d)", seed, got+int64(j), k)
			}
			got += int64(k)
			if wantEOF && got > n && n >= 0 {
				return got, fmt.Errorf("stream %d: %d bytes, more than the %d sent", seed, got, n)
			}
		}
		if err == io.EOF {
			if n >= 0 && got != n {
				return got, fmt.Errorf("stream %d: EOF after %d of %d bytes", seed, got, n)
			}
			return got, nil
		}
		if err != nil {
			return got, fmt.Errorf("stream %d: after %d bytes: %w", seed, got, err)
		}
	}
}

// ptBothWays streams n bytes each way at once, closes each write side
// when done and checks both readers reach EOF with every byte exact.
func ptBothWays(p *ptPair, seed uint64, n int64, maxChunk int) error {
	var wg sync.WaitGroup
	errs := make([]error, 4)
	var got [2]int64
	wg.Add(4)
	go func() { defer wg.Done(); errs[0] = ptWriteStream(p.client, seed, n, maxChunk, true) }()
	go func() { defer wg.Done(); errs[1] = ptWriteStream(p.backend, seed+1, n, maxChunk, true) }()
	go func() { defer wg.Done(); got[0], errs[2] = ptReadStream(p.backend, seed, n, true) }()
	go func() { defer wg.Done(); got[1], errs[3] = ptReadStream(p.client, seed+1, n, true) }()
	wg.Wait()
	return errors.Join(errs...)
}

// ptCounts reports the process's open fds and goroutines.
func ptCounts(tb testing.TB) (fds, goroutines int) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatalf("reading /proc/self/fd: %v", err)
	}
	return len(ents), ptGoroutines()
}

func ptGoroutines() int {
	return runtime.NumGoroutine()
}

// ptMeminfo returns /proc/meminfo fields in bytes.
func ptMeminfo(tb testing.TB) map[string]int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		tb.Fatalf("meminfo: %v", err)
	}
	defer f.Close()
	m := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var k string
		var v int64
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		k = strings.TrimSuffix(fields[0], ":")
		fmt.Sscan(fields[1], &v)
		m[k] = v << 10
	}
	return m
}
