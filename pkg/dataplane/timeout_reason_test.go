package dataplane

// A connection whose peer died (TCP_USER_TIMEOUT or keepalive ran out, so
// the kernel reports ETIMEDOUT) ends with a timeout reason on every plane,
// not a reset one.

import (
	"errors"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestPlaneTimeoutReason(t *testing.T) {
	ptEach(t, func(t *testing.T, e *ptEnv) {
		cl := ptDial(t, e.lnClient.Addr())
		defer cl.Close()
		pc, err := e.lnClient.AcceptTCP()
		if err != nil {
			t.Fatal(err)
		}
		pb := ptDial(t, e.lnBackend.Addr())
		bk, err := e.lnBackend.AcceptTCP()
		if err != nil {
			t.Fatal(err)
		}
		defer bk.Close()
		// The plane's client-side socket gives up on unacknowledged
		// bytes after 1 s.
		trSetsockopt(t, pc, func(fd int) error {
			return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, 1000)
		})
		res := make(chan Result, 1)
		c := &Conn{ID: 1, Client: pc, Backend: pb, Done: func(r Result) {
			select {
			case res <- r:
			default:
				t.Errorf("Done called twice")
			}
		}}
		if err := e.plane.Start(c); err != nil {
			pc.Close()
			pb.Close()
			t.Fatalf("Start: %v", err)
		}
		// The connection works before the client vanishes.
		if _, err := bk.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		cl.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4)
		if _, err := cl.Read(buf); err != nil || string(buf) != "ping" {
			t.Fatalf("client read %q, %v", buf, err)
		}
		// The client now drops everything it receives, unanswered (a
		// socket filter that keeps nothing): to the plane it is dead.
		filter := []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: 0}}
		trSetsockopt(t, cl, func(fd int) error {
			return unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: 1, Filter: &filter[0]})
		})
		// Unacknowledged bytes on the plane's client-side socket start
		// the retransmissions the user timeout ends.
		start := time.Now()
		if _, err := bk.Write([]byte("are you there?")); err != nil {
			t.Fatal(err)
		}
		select {
		case r := <-res:
			t.Logf("Done after %v: %s (%v)", time.Since(start).Round(time.Millisecond), r.Reason, r.Err)
			if r.Reason != ReasonClientTimeout {
				t.Errorf("reason %q, want %q", r.Reason, ReasonClientTimeout)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no Done %v after the client vanished", time.Since(start))
		}
		// A dead peer is a failure: the backend sees a reset.
		bk.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := bk.Read(make([]byte, 64)); !errors.Is(err, unix.ECONNRESET) {
			t.Errorf("backend read: %v, want ECONNRESET", err)
		}
	})
}

func trSetsockopt(t *testing.T, c *net.TCPConn, f func(fd int) error) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = f(int(fd)) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
}
