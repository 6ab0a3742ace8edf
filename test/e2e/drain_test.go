package e2e

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/wsplice/wsplice/pkg/agent"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/dataplane"
	"github.com/wsplice/wsplice/pkg/proxy"
)

// TestDrainOnStop: when the agent is told to stop, it stops accepting at
// once, lets established connections keep working for drain_timeout,
// closes the ones still open after it with reason "drain", and returns.
func TestDrainOnStop(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		cfg := simpleConfig(plane, echoBackends(t, 1)...)
		cfg.DrainTimeout = config.Duration(1500 * time.Millisecond)
		cfg.SetDefaults()
		var mu sync.Mutex
		reasons := map[dataplane.CloseReason]int{}
		ctx, cancel := context.WithCancel(context.Background())
		ready := make(chan *agent.Agent, 1)
		errc := make(chan error, 1)
		go func() {
			errc <- agent.Run(ctx, agent.Options{Config: cfg, Logger: testLogger(t), Ready: func(a *agent.Agent) { ready <- a },
				OnClose: func(c *proxy.Conn, r dataplane.Result) {
					mu.Lock()
					reasons[r.Reason]++
					mu.Unlock()
				}})
		}()
		a := <-ready
		addr := a.Addr("ws").String()
		wctx, wcancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer wcancel()
		finishes := dialWS(t, wctx, addr, "/ws/", nil) // closes during the drain
		lingers := dialWS(t, wctx, addr, "/ws/", nil)  // still open at the deadline
		defer lingers.CloseNow()

		stopped := time.Now()
		cancel()
		time.Sleep(200 * time.Millisecond)
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			t.Fatal("the agent still accepts connections while draining")
		}
		if !a.Proxy.Draining() {
			t.Fatal("Draining() is false after stop")
		}
		// Established connections keep working during the drain.
		for _, c := range []*websocket.Conn{finishes, lingers} {
			if err := c.Write(wctx, websocket.MessageText, []byte("during drain")); err != nil {
				t.Fatal(err)
			}
			if _, got, err := c.Read(wctx); err != nil || string(got) != "during drain" {
				t.Fatalf("echo during drain: %q %v", got, err)
			}
		}
		finishes.Close(websocket.StatusNormalClosure, "")
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		if took := time.Since(stopped); took < 1400*time.Millisecond {
			t.Fatalf("agent returned after %v, before the drain timeout", took)
		}
		if _, _, err := lingers.Read(wctx); err == nil {
			t.Fatal("the lingering connection is still open after the agent stopped")
		}
		mu.Lock()
		defer mu.Unlock()
		if reasons[dataplane.ReasonDrain] != 1 || len(reasons) != 2 {
			t.Fatalf("close reasons %v: want one drain and one client/backend close", reasons)
		}
	})
}
