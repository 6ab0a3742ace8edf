package e2e

import (
	"context"
	"path/filepath"
	"testing"
	"time"
)

// TestTakeOver is a DaemonSet rolling update on one node, three times: a
// second agent process, started on its own (its own admin socket, as in
// its own pod) with --take-over, connects to the running agent's take-over
// socket and is handed the listener and every established connection
// while they exchange checksummed, numbered messages. The old agent then
// holds no connection, answers nothing, and stays until it is stopped
// (its container would be restarted if it exited); stopping it changes
// nothing for the clients. On sockmap the new agent holds the first
// agent's sockhash maps. At the end every message arrived exactly once
// and in order, both ways.
func TestTakeOver(t *testing.T) {
	if testing.Short() {
		t.Skip("child agents")
	}
	forEachPlane(t, testTakeOver)
}

func testTakeOver(t *testing.T, plane string) {
	n := min(upConns(), 1000)
	b := startMsgBackend(t)
	metrics := freePort(t)
	takeover := filepath.Join(t.TempDir(), "takeover.sock")
	config := func() *childAgent {
		cfg := upgradeConfig(b.ln.Addr().String(), metrics, plane)
		cfg.Admin.TakeoverSocket = takeover
		return startChildAgent(t, cfg, "WSPLICE_E2E_TAKEOVER=1")
	}
	// The first one finds no agent on the socket and starts afresh.
	cur := config()
	f := startFleet(t, cur.addr, b, n)
	f.progress(f.echoes(), 60*time.Second)
	pid := cur.first.Process.Pid
	var maps sockhashes
	if plane == "sockmap" {
		maps = agentSockhashes(t, pid)
	}
	ctx := context.Background()
	for round := 1; round <= 3; round++ {
		before := f.echoes()
		t0 := time.Now()
		next := config() // returns once it listens: the take-over is done
		took := time.Since(t0)
		npid := next.first.Process.Pid
		if next.addr != cur.addr {
			t.Fatalf("round %d: the new agent listens on %s, the old one on %s", round, next.addr, cur.addr)
		}
		st, err := next.admin.Status(ctx)
		if err != nil || st.PID != npid || st.Connections.Active != n {
			t.Fatalf("round %d: new agent status %+v %v, want pid %d with %d connections\n%s", round, st.Connections, err, npid, n, next.logs())
		}
		if plane == "sockmap" {
			if st.Connections.Sockmap != n {
				t.Fatalf("round %d: %d sockmap connections, want %d", round, st.Connections.Sockmap, n)
			}
			if got := agentSockhashes(t, npid); got.ids != maps.ids {
				t.Fatalf("round %d: sockhashes %v, the first agent's %v", round, got.ids, maps.ids)
			}
		}
		// The old agent: alive, idle, holding no connection socket, its
		// admin socket closed (the new pod's has its own).
		if gone(pid) {
			t.Fatalf("round %d: the old agent exited after the take-over (its container would restart)", round)
		}
		if other, _ := fdCount(t, pid); other > 64 {
			t.Fatalf("round %d: the old agent still holds %d descriptors (%v)", round, other, fdKinds(pid))
		}
		if _, err := cur.admin.Status(ctx); err == nil {
			t.Fatalf("round %d: the old agent still answers on its admin socket", round)
		}
		f.progress(before, 60*time.Second)
		if err := healthz(metrics); err != nil {
			t.Fatalf("round %d: metrics address after the take-over: %v", round, err)
		}
		// Stopping the old one (Kubernetes deletes the old pod) changes
		// nothing for the clients.
		before = f.echoes()
		cur.stdin.Close()
		if !waitGone(pid, 10*time.Second) {
			t.Fatalf("round %d: the old agent did not exit when stopped\n%s", round, cur.logs())
		}
		f.progress(before, 60*time.Second)
		c, err := dialMsgClient(next.addr, uint32(n+round))
		if err != nil {
			t.Fatalf("round %d: a new client: %v", round, err)
		}
		c.c.Close()
		t.Logf("round %d: pid %d → %d took over %d %s connections in %v (start to listening)", round, pid, npid, n, plane, took.Round(time.Millisecond))
		cur, pid = next, npid
	}
	msgs := f.finish()
	t.Logf("%d messages each way, every one checked at both ends", msgs)
	if plane == "sockmap" {
		for deadline := time.Now().Add(10 * time.Second); maps.entries(t) != [2]int{}; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("sockhash entries %v after every connection closed", maps.entries(t))
			}
		}
	}
}
