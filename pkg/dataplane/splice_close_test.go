package dataplane

import (
	"errors"
	"io"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// spHeldRig starts a connection whose backend side cannot take much: tiny
// socket buffers on both ends of the backend leg and a backend that does
// not read, so that of the k bytes the client sends the plane holds some
// in its pipe. It returns once nothing moves any more, with how many bytes
// the plane read (the rest wait in its client socket) and how many of
// those it holds.
func spHeldRig(t *testing.T, k int) (r *spRig, p *spPair, read, held int) {
	t.Helper()
	r = spNewRig(t, SpliceOptions{})
	c, pc, pb, b := r.spSockets()
	if err := b.SetReadBuffer(4 << 10); err != nil {
		t.Fatal(err)
	}
	if err := pb.SetWriteBuffer(4 << 10); err != nil {
		t.Fatal(err)
	}
	p = r.spStart(c, pc, pb, b, 0)
	t.Cleanup(func() { c.Close(); b.Close() })
	msg := make([]byte, k)
	(&ptStream{seed: 9}).fill(msg)
	go c.Write(msg)
	// What the plane took from its client socket: received less queued.
	consumed := func() int {
		rc, _ := pc.SyscallConn()
		var n uint64
		rc.Control(func(fd uintptr) { n, _, _ = smRxConsumed(int(fd)) })
		return int(n)
	}
	// Settled: nothing moved for 200ms.
	prev, stable := -1, 0
	for deadline := time.Now().Add(5 * time.Second); stable < 20; time.Sleep(10 * time.Millisecond) {
		st, _ := r.plane.Stats(p.id)
		read = consumed()
		now := read<<32 | int(st.ClientToBackend.Bytes)
		if now == prev {
			stable++
		} else {
			stable, prev = 0, now
		}
		held = read - int(st.ClientToBackend.Bytes)
		if time.Now().After(deadline) {
			t.Fatalf("the connection did not settle")
		}
	}
	if held <= 0 {
		t.Fatalf("the plane holds nothing (read %d of %d): the test cannot show anything", read, k)
	}
	return r, p, read, held
}

// TestSpliceDrainDeliversHeldBytes: a drain (FIN) close writes out what the
// plane already read before passing the FIN on, instead of dropping the
// pipe's contents and ending the stream early behind a clean FIN.
func TestSpliceDrainDeliversHeldBytes(t *testing.T) {
	const k = 1 << 20
	r, p, read, held := spHeldRig(t, k)
	t.Logf("the plane read %d bytes and holds %d of them", read, held)
	if !r.plane.Kill(p.id, ReasonDrain) {
		t.Fatal("Kill: unknown connection")
	}
	time.Sleep(50 * time.Millisecond) // the close is under way, the backend still not reading
	// Then read with a normal window: through 4 KiB ones, each segment
	// waits for a delayed ACK, and the flush may not fit the grace period
	// on a loaded machine (the test would see the RST meant for that).
	if err := p.backend.SetReadBuffer(4 << 20); err != nil {
		t.Fatal(err)
	}
	got, err := ptReadStream(p.backend, 9, -1, true)
	if err != nil || got != int64(read) {
		t.Fatalf("backend got %d bytes then %v: want the %d the plane read, then EOF", got, err, read)
	}
	res := p.spWait(t, 5*time.Second)
	if res.Reason != ReasonDrain || res.ClientToBackend.Bytes != uint64(read) {
		t.Fatalf("result %s, %d bytes to the backend; want drain, %d", res.Reason, res.ClientToBackend.Bytes, read)
	}
}

// TestSpliceDrainResetsWhenStuck: when the bytes already read cannot be
// written within the grace period (the backend never reads), both sides get
// an RST, never a FIN that would pass the cut for the stream's end.
func TestSpliceDrainResetsWhenStuck(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the close grace period")
	}
	const k = 1 << 20
	r, p, read, _ := spHeldRig(t, k)
	t0 := time.Now()
	r.plane.Kill(p.id, ReasonDrain)
	res := p.spWait(t, spCloseGrace+5*time.Second)
	if el := time.Since(t0); el < spCloseGrace-100*time.Millisecond {
		t.Fatalf("closed after %v, before the grace period", el)
	}
	if res.Reason != ReasonDrain || res.ClientToBackend.Bytes >= uint64(read) {
		t.Fatalf("result %s, %d bytes to the backend; want drain with fewer than the %d read", res.Reason, res.ClientToBackend.Bytes, read)
	}
	_, err := io.ReadAll(p.backend)
	if !errors.Is(err, unix.ECONNRESET) {
		t.Fatalf("backend read to the end: %v, want ECONNRESET (not a clean EOF)", err)
	}
}
