package dataplane

import (
	"encoding/json"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"
)

// spHandTo detaches p from one plane and adopts it into another, as an
// upgrade does across processes (the files are what SCM_RIGHTS carries).
// It returns the detached state, or ok=false when the connection had
// finished instead.
func spHandTo(t *testing.T, from, to *Splice, p *spPair) (spHandoffState, bool) {
	t.Helper()
	ds, err := from.Detach([]uint64{p.id})
	if err != nil {
		t.Fatalf("detach: %v", err)
	}
	if len(ds) == 0 {
		return spHandoffState{}, false
	}
	d := ds[0]
	if d.ID != p.id || d.Kind != KindSplice {
		t.Fatalf("detached %d/%s, want %d/splice", d.ID, d.Kind, p.id)
	}
	var st spHandoffState
	if err := json.Unmarshal(d.State, &st); err != nil {
		t.Fatal(err)
	}
	c, b := spFileConn(t, d.Client), spFileConn(t, d.Backend)
	err = to.Adopt(&Conn{ID: p.id, Client: c, Backend: b, Done: func(r Result) {
		p.calls.Add(1)
		p.done <- r
	}}, d.State)
	if err != nil {
		t.Fatalf("adopt: %v", err)
	}
	return st, true
}

func spFileConn(t *testing.T, f *os.File) *net.TCPConn {
	t.Helper()
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatalf("FileConn: %v", err)
	}
	return c.(*net.TCPConn)
}

// TestSpliceHandoffBulk moves a connection back and forth between two
// planes every few milliseconds while 48 MiB stream each way: every byte
// arrives once and in order, both EOFs pass, Done runs once (on the last
// plane), and the counters continue across hand-offs.
func TestSpliceHandoffBulk(t *testing.T) {
	for _, copyMode := range []bool{false, true} {
		name := "splice"
		if copyMode {
			name = "readwrite"
		}
		t.Run(name, func(t *testing.T) {
			opts := SpliceOptions{spForceCopy: copyMode}
			r := spNewRig(t, opts)
			other := NewSplice(opts)
			t.Cleanup(func() { other.Close() })
			p := r.spPair(0)
			n := int64(48 << 20)
			if testing.Short() {
				n = 8 << 20
			}
			done := make(chan struct{})
			var hands, pending, withPending atomic.Int64
			go func() {
				defer close(done)
				planes := [2]*Splice{r.plane, other}
				for i := 0; ; i++ {
					time.Sleep(2 * time.Millisecond)
					st, ok := spHandTo(t, planes[i%2], planes[(i+1)%2], p)
					if !ok {
						return // finished: Done has run
					}
					hands.Add(1)
					k := len(st.ClientToBack.Pending) + len(st.BackToClient.Pending)
					if k > 0 {
						withPending.Add(1)
						pending.Add(int64(k))
					}
				}
			}()
			spTransfer(t, p, n, 61<<10)
			res := p.spWait(t, 10*time.Second)
			<-done
			t.Logf("%d hand-offs during the transfer, %d carried %d bytes read and not yet written", hands.Load(), withPending.Load(), pending.Load())
			if hands.Load() < 10 {
				t.Errorf("only %d hand-offs happened during the transfer", hands.Load())
			}
			if res.ClientToBackend.Bytes != uint64(n) || res.BackendToClient.Bytes != uint64(n) {
				t.Errorf("counters %d/%d, want %d each way (they must continue across hand-offs)", res.ClientToBackend.Bytes, res.BackendToClient.Bytes, n)
			}
			if res.Reason != ReasonClientFIN && res.Reason != ReasonBackendFIN {
				t.Errorf("reason %s (%v), want a FIN", res.Reason, res.Err)
			}
			if r.plane.Len() != 0 || other.Len() != 0 {
				t.Errorf("planes still hold %d and %d connections", r.plane.Len(), other.Len())
			}
		})
	}
}

// TestSpliceHandoffHalfClosed hands over a connection whose client has
// already half-closed: the adopter keeps the other direction flowing,
// reports the client's FIN first, and still sees an RST after the FIN.
func TestSpliceHandoffHalfClosed(t *testing.T) {
	r := spNewRig(t, SpliceOptions{})
	other := NewSplice(SpliceOptions{})
	t.Cleanup(func() { other.Close() })
	p := r.spPair(0)
	if err := p.client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	p.backend.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := p.backend.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("backend read %d, %v; want EOF", n, err)
	}
	st, ok := spHandTo(t, r.plane, other, p)
	if !ok {
		t.Fatal("the connection finished instead of being detached")
	}
	if !st.ClientToBack.EOFSent || st.BackToClient.EOFSent || st.Fin != ReasonClientFIN {
		t.Fatalf("state %+v: want client→backend ended, client FIN first", st)
	}
	spEcho(t, p.backend, p.client, 1000) // backend → client still flows
	p.backend.CloseWrite()
	p.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := p.client.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("client read %d, %v; want EOF", n, err)
	}
	res := p.spWait(t, 5*time.Second)
	if res.Reason != ReasonClientFIN || res.BackendToClient.Bytes != 1000 {
		t.Fatalf("result %s, %d bytes to the client; want client_fin, 1000", res.Reason, res.BackendToClient.Bytes)
	}
}

// TestSpliceHandoffIdle: an adopted connection keeps its idle clock (the
// time since the last byte carries over) and its counters.
func TestSpliceHandoffIdle(t *testing.T) {
	r := spNewRig(t, SpliceOptions{})
	other := NewSplice(SpliceOptions{})
	t.Cleanup(func() { other.Close() })
	c, pc, pb, b := r.spSockets()
	t.Cleanup(func() { c.Close(); b.Close() })
	p := r.spStart(c, pc, pb, b, 0)
	spEcho(t, p.client, p.backend, 10)
	time.Sleep(300 * time.Millisecond)
	ds, err := r.plane.Detach([]uint64{p.id})
	if err != nil || len(ds) != 1 {
		t.Fatalf("detach: %v, %d", err, len(ds))
	}
	start := time.Now()
	err = other.Adopt(&Conn{ID: p.id, Client: spFileConn(t, ds[0].Client), Backend: spFileConn(t, ds[0].Backend),
		IdleTimeout: 600 * time.Millisecond, Done: func(r Result) { p.calls.Add(1); p.done <- r }}, ds[0].State)
	if err != nil {
		t.Fatal(err)
	}
	if st, ok := other.Stats(p.id); !ok || st.ClientToBackend.Bytes != 10 {
		t.Fatalf("adopted stats %+v %v, want 10 bytes client→backend", st, ok)
	}
	res := p.spWait(t, 5*time.Second)
	if el := time.Since(start); res.Reason != ReasonIdle || el > 500*time.Millisecond {
		t.Fatalf("closed after %v with %s: want idle_timeout about 300ms after adoption (600ms after the last byte)", el, res.Reason)
	}
}

// TestSpliceDetachSkips: unknown ids and connections already closing are
// left out; a detached connection's Done never runs on the old plane, and
// Kill and Close there no longer reach it.
func TestSpliceDetachSkips(t *testing.T) {
	r := spNewRig(t, SpliceOptions{})
	p1, p2 := r.spPair(0), r.spPair(0)
	spAbortive(t, p2.client)
	ds, err := r.plane.Detach([]uint64{p1.id, p2.id, 999})
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) == 2 {
		t.Logf("the reset had not reached the plane yet; both detached")
	}
	var got *Detached
	for i := range ds {
		if ds[i].ID == p1.id {
			got = &ds[i]
		}
	}
	if got == nil {
		t.Fatalf("connection %d not detached: %+v", p1.id, ds)
	}
	if r.plane.Kill(p1.id, ReasonKill) {
		t.Fatal("Kill still reaches a detached connection")
	}
	r.plane.Close()
	if n := p1.calls.Load(); n != 0 {
		t.Fatalf("Done ran %d times for a detached connection", n)
	}
	// The sockets are open and untouched: bytes still queue both ways.
	c := spFileConn(t, got.Client)
	defer c.Close()
	if _, err := p1.client.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 1)
	if n, err := c.Read(buf); n != 1 || buf[0] != 'x' {
		t.Fatalf("detached client socket: read %d %v", n, err)
	}
	got.Backend.Close()
}
