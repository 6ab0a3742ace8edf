package e2e

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/wsplice/wsplice/test/testutil"
)

// TestTwoAgentsAgree: two independent agents with the same backends (listed
// in different orders) and the same Maglev config send every key to the
// same backend, so a fleet behind ECMP agrees without talking.
func TestTwoAgentsAgree(t *testing.T) {
	bs := echoBackends(t, 5)
	cfg1 := simpleConfig("splice", bs...)
	cfg1.Pools[0].Balance, cfg1.Pools[0].HashKey = "maglev", "header:X-User-Id"
	rev := append([]string(nil), bs...)
	for i, j := 0, len(rev)-1; i < j; i, j = i+1, j-1 {
		rev[i], rev[j] = rev[j], rev[i]
	}
	cfg2 := simpleConfig("splice", rev...)
	cfg2.Pools[0].Balance, cfg2.Pools[0].HashKey = "maglev", "header:X-User-Id"
	a1, a2 := startAgent(t, cfg1), startAgent(t, cfg2)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	landed := func(addr, user string) string {
		c, _, err := websocket.Dial(ctx, "ws://"+addr+"/ws/", &websocket.DialOptions{HTTPHeader: http.Header{"X-User-Id": {user}}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseNow()
		_, hello, err := c.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		c.Close(websocket.StatusNormalClosure, "")
		return strings.TrimPrefix(string(hello), "hello from ")
	}
	used := map[string]bool{}
	for i := range 60 {
		user := fmt.Sprintf("user-%d", i)
		b1, b2 := landed(a1.Addr("ws").String(), user), landed(a2.Addr("ws").String(), user)
		if b1 != b2 {
			t.Fatalf("%s: agent 1 chose %s, agent 2 chose %s", user, b1, b2)
		}
		used[b1] = true
	}
	if len(used) < 4 {
		t.Fatalf("60 users landed on only %d of 5 backends", len(used))
	}
}

// TestSockmapFullFallsBack: when the BPF maps are full, new connections
// go to splice instead of failing, and are counted.
func TestSockmapFullFallsBack(t *testing.T) {
	testutil.RequirePrivileged(t)
	cfg := simpleConfig("auto", echoBackends(t, 1)...)
	cfg.Sockmap.MaxConns = 2
	a := startAgent(t, cfg)
	if a.Sockmap == nil {
		t.Fatal("the sockmap plane did not load")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	planes := map[string]int{}
	for i := range 4 {
		c := dialWS(t, ctx, a.Addr("ws").String(), "/ws/", nil)
		defer c.CloseNow()
		m := fmt.Sprintf("m%d", i)
		c.Write(ctx, websocket.MessageText, []byte(m))
		if _, got, err := c.Read(ctx); err != nil || string(got) != m {
			t.Fatalf("connection %d: %q %v", i, got, err)
		}
	}
	for _, c := range a.Proxy.Conns() {
		st, _ := a.Proxy.Stats(c)
		planes[string(st.Plane)]++
	}
	if planes["sockmap"] == 0 || planes["splice"] == 0 || a.Proxy.Counters.PlaneFallbacks.Load() == 0 {
		t.Fatalf("planes %v, fallbacks %d: want some on each and a counted fallback", planes, a.Proxy.Counters.PlaneFallbacks.Load())
	}
}
