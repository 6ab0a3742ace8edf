package dataplane

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/wsplice/wsplice/pkg/tlsterm/tlstest"
	"golang.org/x/sys/unix"
)

// cpRig is one connection through a copy plane: the test's client and
// backend ends, and the streams the plane got.
type cpRig struct {
	t       testing.TB
	client  net.Conn // test's end (TLS when clientTLS)
	backend net.Conn // test's end (TLS when backendTLS)
	rawCli  *net.TCPConn
	agentC  *net.TCPConn // the plane's client-side socket
	done    chan Result
}

type cpOpts struct {
	clientTLS, backendTLS bool
	idle                  time.Duration
	id                    uint64
	setup                 func(agentClient *net.TCPConn) // before Start
}

func cpListen(t testing.TB) *net.TCPListener {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// cpPair connects two TCP sockets and returns (dialled, accepted).
func cpPair(t testing.TB, ln *net.TCPListener) (*net.TCPConn, *net.TCPConn) {
	d, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	a, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	// Go turns keepalive on for dialled and accepted sockets; tests that
	// watch probes want only the agent's.
	d.SetKeepAlive(false)
	a.SetKeepAlive(false)
	return d, a
}

func cpTLS(t testing.TB) (server, client *tls.Config) {
	ca := tlstest.NewCA(t, "copy")
	leaf := ca.Issue("srv", "copy.example")
	return &tls.Config{Certificates: []tls.Certificate{leaf.TLS(t)}}, ca.ClientConfig("copy.example")
}

// handshakePair runs a TLS handshake over (cli, srv) and returns both ends.
func handshakePair(t testing.TB, cli, srv net.Conn) (*tls.Conn, *tls.Conn) {
	scfg, ccfg := cpTLS(t)
	tc, ts := tls.Client(cli, ccfg), tls.Server(srv, scfg)
	errc := make(chan error, 1)
	go func() { errc <- ts.Handshake() }()
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	return tc, ts
}

func newCpRig(t testing.TB, p *Copy, o cpOpts) *cpRig {
	ln := cpListen(t)
	cli, agentC := cpPair(t, ln)
	agentB, be := cpPair(t, ln)
	r := &cpRig{t: t, rawCli: cli, agentC: agentC, done: make(chan Result, 1)}
	var client, backend net.Conn = cli, be
	var sc, sb net.Conn = agentC, agentB
	if o.clientTLS {
		client, sc = handshakePair(t, cli, agentC)
	}
	if o.backendTLS {
		sb, backend = handshakePair(t, agentB, be)
	}
	r.client, r.backend = client, backend
	if o.setup != nil {
		o.setup(agentC)
	}
	id := o.id
	if id == 0 {
		id = uint64(time.Now().UnixNano())
	}
	err := p.StartStreams(&CopyConn{ID: id, Client: sc, Backend: sb, IdleTimeout: o.idle, Done: func(res Result) { r.done <- res }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close(); be.Close() })
	return r
}

func (r *cpRig) wait() Result {
	r.t.Helper()
	select {
	case res := <-r.done:
		return res
	case <-time.After(15 * time.Second):
		r.t.Fatal("connection did not finish")
	}
	return Result{}
}

var cpModes = []struct {
	name       string
	cTLS, bTLS bool
}{{"tcp", false, false}, {"tls-client", true, false}, {"tls-both", true, true}}

func TestCopyEcho(t *testing.T) {
	p := NewCopy(CopyOptions{})
	defer p.Close()
	for _, m := range cpModes {
		t.Run(m.name, func(t *testing.T) {
			r := newCpRig(t, p, cpOpts{clientTLS: m.cTLS, backendTLS: m.bTLS})
			go func() { io.Copy(r.backend, r.backend); closeWrite(r.backend) }()
			var total uint64
			for _, n := range []int{1, 100, 16383, 16384, 16385, 100000, 1 << 20} {
				msg := bytes.Repeat([]byte{byte(n)}, n)
				errc := make(chan error, 1)
				go func() { _, err := r.client.Write(msg); errc <- err }()
				got := make([]byte, n)
				r.client.SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.ReadFull(r.client, got); err != nil || !bytes.Equal(got, msg) {
					t.Fatalf("%d bytes: %v", n, err)
				}
				if err := <-errc; err != nil {
					t.Fatal(err)
				}
				total += uint64(n)
			}
			st, ok := p.Stats(p.onlyID(t))
			if !ok || st.Plane != KindCopy || st.ClientToBackend.Bytes != total || st.BackendToClient.Bytes != total {
				t.Fatalf("stats %+v (known %v), want %d each way", st, ok, total)
			}
			// Client EOF travels on; the backend's echo loop then closes too.
			closeWrite(r.client)
			if b, err := io.ReadAll(r.client); err != nil || len(b) != 0 {
				t.Fatalf("after close: %q %v", b, err)
			}
			res := r.wait()
			if res.Reason != ReasonClientFIN || res.Plane != KindCopy || res.ClientToBackend.Bytes != total {
				t.Fatalf("result %+v", res)
			}
		})
	}
}

// onlyID returns the id of the one live connection.
func (p *Copy) onlyID(t testing.TB) uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.conns) != 1 {
		t.Fatalf("%d connections live, want 1", len(p.conns))
	}
	for id := range p.conns {
		return id
	}
	return 0
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	if tc, ok := c.(*tls.Conn); ok {
		tc.NetConn().(*net.TCPConn).CloseWrite()
	}
}

// TestCopyHalfClose: after the client's EOF the backend still sends, and
// the client gets every byte, then EOF.
func TestCopyHalfClose(t *testing.T) {
	p := NewCopy(CopyOptions{})
	defer p.Close()
	for _, m := range cpModes {
		t.Run(m.name, func(t *testing.T) {
			r := newCpRig(t, p, cpOpts{clientTLS: m.cTLS, backendTLS: m.bTLS})
			closeWrite(r.client)
			r.backend.SetReadDeadline(time.Now().Add(5 * time.Second))
			if b, err := io.ReadAll(r.backend); err != nil || len(b) != 0 {
				t.Fatalf("backend read %q, %v; want EOF", b, err)
			}
			tail := bytes.Repeat([]byte("z"), 300000)
			go func() { r.backend.Write(tail); closeWrite(r.backend) }()
			r.client.SetReadDeadline(time.Now().Add(5 * time.Second))
			b, err := io.ReadAll(r.client)
			if err != nil || !bytes.Equal(b, tail) {
				t.Fatalf("client read %d bytes, %v", len(b), err)
			}
			if res := r.wait(); res.Reason != ReasonClientFIN || res.BackendToClient.Bytes != uint64(len(tail)) {
				t.Fatalf("result %+v", res)
			}
		})
	}
}

func TestCopyResetAndKill(t *testing.T) {
	p := NewCopy(CopyOptions{})
	defer p.Close()
	for _, m := range cpModes {
		t.Run(m.name+"/backend-reset", func(t *testing.T) {
			r := newCpRig(t, p, cpOpts{clientTLS: m.cTLS, backendTLS: m.bTLS})
			raw := r.backend
			if tc, ok := raw.(*tls.Conn); ok {
				raw = tc.NetConn()
			}
			raw.(*net.TCPConn).SetLinger(0)
			raw.Close()
			if res := r.wait(); res.Reason != ReasonBackendReset {
				t.Fatalf("reason %s", res.Reason)
			}
			r.client.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := r.client.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("client read: %v, want a reset", err)
			}
		})
		t.Run(m.name+"/kill", func(t *testing.T) {
			r := newCpRig(t, p, cpOpts{clientTLS: m.cTLS, backendTLS: m.bTLS, id: 42})
			if !p.Kill(42, ReasonKill) {
				t.Fatal("kill: unknown id")
			}
			if res := r.wait(); res.Reason != ReasonKill {
				t.Fatalf("reason %s", res.Reason)
			}
			if p.Kill(42, ReasonKill) {
				t.Fatal("killed twice")
			}
		})
		t.Run(m.name+"/drain", func(t *testing.T) {
			r := newCpRig(t, p, cpOpts{clientTLS: m.cTLS, backendTLS: m.bTLS, id: 43})
			p.Kill(43, ReasonDrain)
			r.client.SetReadDeadline(time.Now().Add(5 * time.Second))
			// A drained client sees a clean end: close_notify on TLS, FIN.
			if b, err := io.ReadAll(r.client); err != nil || len(b) != 0 {
				t.Fatalf("client read %q, %v; want a clean EOF", b, err)
			}
			if res := r.wait(); res.Reason != ReasonDrain {
				t.Fatalf("reason %s", res.Reason)
			}
		})
	}
}

func TestCopyIdle(t *testing.T) {
	p := NewCopy(CopyOptions{})
	defer p.Close()
	r := newCpRig(t, p, cpOpts{clientTLS: true, idle: 300 * time.Millisecond})
	go func() { io.Copy(r.backend, r.backend) }()
	// Activity keeps it open past the timeout.
	for range 6 {
		time.Sleep(100 * time.Millisecond)
		r.client.Write([]byte("x"))
		r.client.Read(make([]byte, 1))
	}
	start := time.Now()
	res := r.wait()
	if res.Reason != ReasonIdle {
		t.Fatalf("reason %s", res.Reason)
	}
	if el := time.Since(start); el < 150*time.Millisecond {
		t.Fatalf("closed %v after the last byte", el)
	}
}

// dropAll makes a socket deaf: a classic BPF socket filter that accepts
// nothing discards every segment before TCP sees it (no ACK goes back),
// which is what a peer that vanished looks like from the other end.
//
// It first waits until everything c sent is acknowledged: a segment still
// being retransmitted would reach the other end and count as a sign of life.
func dropAll(t testing.TB, c *net.TCPConn) {
	// One instruction: BPF_RET|BPF_K with 0, "keep 0 bytes".
	filter := []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: 0}}
	rc, _ := c.SyscallConn()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var unacked uint32
		rc.Control(func(fd uintptr) {
			if ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
				unacked = ti.Unacked
			}
		})
		if unacked == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d segments still unacknowledged", unacked)
		}
	}
	var serr error
	rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: 1, Filter: &filter[0]})
	})
	if serr != nil {
		t.Fatal(serr)
	}
}

// TestCopyPeerTimeout: a client that stops answering is found dead by the
// kernel (keepalive, TCP_USER_TIMEOUT) and the connection ends with
// client_timeout, not a reset.
func TestCopyPeerTimeout(t *testing.T) {
	p := NewCopy(CopyOptions{})
	defer p.Close()
	r := newCpRig(t, p, cpOpts{clientTLS: true, setup: func(c *net.TCPConn) {
		if err := c.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: time.Second, Interval: time.Second, Count: 2}); err != nil {
			t.Fatal(err)
		}
		rc, _ := c.SyscallConn()
		rc.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, 3000) })
	}})
	dropAll(t, r.rawCli)
	start := time.Now()
	res := r.wait()
	t.Logf("closed after %v: %s", time.Since(start).Round(10*time.Millisecond), res.Reason)
	if res.Reason != ReasonClientTimeout {
		t.Fatalf("reason %s, want %s", res.Reason, ReasonClientTimeout)
	}
	// TCP_USER_TIMEOUT is 3 s after the last segment received.
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("dead peer found after %v, want about 3s", el)
	}
	r.backend.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.backend.Read(make([]byte, 1)); err == nil {
		t.Fatal("backend still open")
	}
}

func TestCopyClose(t *testing.T) {
	p := NewCopy(CopyOptions{})
	var rigs []*cpRig
	for i := range 5 {
		rigs = append(rigs, newCpRig(t, p, cpOpts{clientTLS: i%2 == 0, id: uint64(100 + i)}))
	}
	if p.Len() != 5 {
		t.Fatalf("len %d", p.Len())
	}
	p.Close()
	for _, r := range rigs {
		select {
		case res := <-r.done:
			if res.Reason != ReasonShutdown {
				t.Fatalf("reason %s", res.Reason)
			}
		default:
			t.Fatal("Close returned before Done")
		}
	}
	ln := cpListen(t)
	a, b := cpPair(t, ln)
	defer a.Close()
	defer b.Close()
	if err := p.Start(&Conn{ID: 1, Client: a, Backend: b}); err == nil {
		t.Fatal("Start after Close")
	}
}

// TestCopyBufferedTLS: records the TLS stack read from the socket before
// the hand-off (behind a request head, say) are forwarded at once, although
// the socket has nothing left to wake the poller.
func TestCopyBufferedTLS(t *testing.T) {
	p := NewCopy(CopyOptions{})
	defer p.Close()
	ln := cpListen(t)
	cli, agentC := cpPair(t, ln)
	agentB, be := cpPair(t, ln)
	defer cli.Close()
	defer be.Close()
	tc, ts := handshakePair(t, cli, agentC)
	tc.Write([]byte("head"))
	tc.Write([]byte("frame behind the head"))
	time.Sleep(50 * time.Millisecond) // both records in the socket
	head := make([]byte, 4)
	ts.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(ts, head); err != nil || string(head) != "head" {
		t.Fatalf("head %q %v", head, err)
	}
	if err := p.StartStreams(&CopyConn{ID: 1, Client: ts, Backend: agentB, Done: func(Result) {}}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len("frame behind the head"))
	be.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.ReadFull(be, got); err != nil || string(got) != "frame behind the head" {
		t.Fatalf("backend got %q, %v", got, err)
	}
}
