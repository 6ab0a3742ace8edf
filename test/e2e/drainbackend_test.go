package e2e

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/wsplice/wsplice/pkg/admin"
	"github.com/wsplice/wsplice/pkg/agent"
	"github.com/wsplice/wsplice/pkg/dataplane"
	"github.com/wsplice/wsplice/pkg/proxy"
)

// TestDrainBackendCloseOver: `wsplice drain B --close-over D` stops new
// connections to B at once and closes B's established connections spread
// over D (reason drain), not all at the same instant.
func TestDrainBackendCloseOver(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		bs := echoBackends(t, 2)
		cfg := simpleConfig(plane, bs...)
		cfg.Pools[0].Balance = "first" // everything on bs[0] while it is available
		cfg.Admin.Socket = filepath.Join(t.TempDir(), "admin.sock")
		cfg.SetDefaults()
		var mu sync.Mutex
		var closes []time.Time
		ctx, cancel := context.WithCancel(context.Background())
		ready := make(chan *agent.Agent, 1)
		errc := make(chan error, 1)
		go func() {
			errc <- agent.Run(ctx, agent.Options{Config: cfg, Logger: testLogger(t), Ready: func(a *agent.Agent) { ready <- a },
				OnClose: func(c *proxy.Conn, r dataplane.Result) {
					if r.Reason == dataplane.ReasonDrain {
						mu.Lock()
						closes = append(closes, time.Now())
						mu.Unlock()
					}
				}})
		}()
		a := <-ready
		defer func() { cancel(); <-errc }()
		addr := a.Addr("ws").String()
		wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer wcancel()
		const n = 5
		for range n {
			c := dialWS(t, wctx, addr, "/ws/", nil)
			defer c.CloseNow()
		}
		for _, c := range a.Proxy.Conns() {
			if c.Backend != bs[0] {
				t.Fatalf("connection on %s before the drain, want %s", c.Backend, bs[0])
			}
		}
		cl := admin.NewClient(cfg.Admin.Socket)
		defer cl.Close()
		const over = time.Second
		if _, err := cl.DrainOver(wctx, bs[0], true, over); err != nil {
			t.Fatal(err)
		}
		c := dialWS(t, wctx, addr, "/ws/", nil)
		defer c.CloseNow()
		waitFor(t, "the drained backend's connections to close", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(closes) == n
		})
		mu.Lock()
		spread := closes[n-1].Sub(closes[0])
		mu.Unlock()
		if spread < over*(n-1)/n/2 {
			t.Fatalf("%d connections closed within %v: not spread over %v", n, spread, over)
		}
		conns := a.Proxy.Conns()
		if len(conns) != 1 || conns[0].Backend != bs[1] {
			t.Fatalf("after the drain: %d connections, want the new one on %s", len(conns), bs[1])
		}
	})
}
