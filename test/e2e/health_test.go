package e2e

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/demo"
)

// TestHealthFailover: with active websocket checks, a backend that dies is
// taken out within its fall time (no new connection tries it), and comes
// back within its rise time once it listens again; connections to the
// surviving backend are untouched throughout.
func TestHealthFailover(t *testing.T) {
	live := echoBackends(t, 1)[0]
	victim, err := demo.StartEcho("victim")
	if err != nil {
		t.Fatal(err)
	}
	cfg := simpleConfig("splice", live, victim.Addr)
	cfg.Pools[0].Health = config.Health{Type: "websocket", Path: "/ws/", Interval: config.Duration(100 * time.Millisecond),
		Timeout: config.Duration(80 * time.Millisecond), Rise: 2, Fall: 2}
	a := startAgent(t, cfg)
	addr := a.Addr("ws").String()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	keep := dialWS(t, ctx, addr, "/ws/", nil)
	defer keep.CloseNow()

	victim.Close()
	backend := func() string {
		for _, p := range a.Proxy.Pools() {
			for _, b := range p.Backends() {
				if b.Address() == victim.Addr {
					if b.Healthy() {
						return "up"
					}
					return "down"
				}
			}
		}
		return "missing"
	}
	waitFor(t, "the dead backend to be marked down", func() bool { return backend() == "down" })
	fails := a.Proxy.Counters.ConnectFails.Load()
	for range 10 {
		c := dialWS(t, ctx, addr, "/ws/", nil)
		c.Close(websocket.StatusNormalClosure, "")
	}
	if got := a.Proxy.Counters.ConnectFails.Load(); got != fails {
		t.Fatalf("%d connects still tried the down backend", got-fails)
	}
	if err := keep.Write(ctx, websocket.MessageText, []byte("still")); err != nil {
		t.Fatal(err)
	}
	if _, m, err := keep.Read(ctx); err != nil || string(m) != "still" {
		t.Fatalf("surviving connection: %q %v", m, err)
	}

	// Bring it back on the same address.
	ln, err := net.Listen("tcp", victim.Addr)
	if err != nil {
		t.Skipf("cannot rebind %s: %v", victim.Addr, err)
	}
	ln.Close()
	back, err := demo.StartEchoAt("victim", victim.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	waitFor(t, "the backend to come back", func() bool { return backend() == "up" })
}
