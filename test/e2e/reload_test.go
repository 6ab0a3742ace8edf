package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/wsplice/wsplice/pkg/agent"
	"github.com/wsplice/wsplice/pkg/config"
)

// TestReload: a reload adds a listener and changes the backend set while a
// connection is established; the connection keeps working, the new
// listener serves, and an invalid file is rejected with the old
// configuration still serving.
func TestReload(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		backends := echoBackends(t, 2)
		free := deadAddr(t) // a free port for the listener the reload adds
		dir := t.TempDir()
		path := filepath.Join(dir, "wsplice.yaml")
		write := func(listeners string, backends ...string) {
			var b strings.Builder
			fmt.Fprintf(&b, "dataplane: %s\ntune: {mode: \"off\"}\nadmin: {socket: none}\nlisteners:\n%s", plane, listeners)
			b.WriteString("pools:\n  - name: p\n    backends:\n")
			for _, a := range backends {
				fmt.Fprintf(&b, "      - address: %q\n", a)
			}
			if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		write("  - {name: ws, address: \"127.0.0.1:0\", routes: [{path: /ws/, pool: p}]}\n", backends[0])
		cfg, err := config.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		ready := make(chan *agent.Agent, 1)
		errc := make(chan error, 1)
		go func() {
			errc <- agent.Run(ctx, agent.Options{Config: cfg, ConfigPath: path, Logger: testLogger(t), Ready: func(a *agent.Agent) { ready <- a }})
		}()
		var a *agent.Agent
		select {
		case a = <-ready:
		case err := <-errc:
			t.Fatal(err)
		}
		defer func() { cancel(); <-errc }()
		// The first listener was bound to port 0: keep its real address.
		first := a.Addr("ws").String()
		wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer wcancel()
		c := dialWS(t, wctx, first, "/ws/", nil)
		defer c.CloseNow()
		echo := func(c *websocket.Conn, m string) {
			t.Helper()
			if err := c.Write(wctx, websocket.MessageText, []byte(m)); err != nil {
				t.Fatal(err)
			}
			if _, got, err := c.Read(wctx); err != nil || string(got) != m {
				t.Fatalf("echo %q: got %q, %v", m, got, err)
			}
		}
		echo(c, "before")

		write(fmt.Sprintf("  - {name: ws, address: %q, routes: [{path: /ws/, pool: p}]}\n  - {name: extra, address: %q, pool: p}\n", first, free), backends[1])
		if err := a.Reload(); err != nil {
			t.Fatalf("reload: %v", err)
		}
		echo(c, "after reload") // the established connection is untouched
		c2 := dialWS(t, wctx, free, "/anything", nil)
		echo(c2, "new listener")
		c2.Close(websocket.StatusNormalClosure, "")
		// The new backend set is used for new connections.
		conns := a.Proxy.Conns()
		if conns[0].Backend != backends[0] {
			t.Fatalf("the old connection moved to %s", conns[0].Backend)
		}
		c3 := dialWS(t, wctx, first, "/ws/", nil)
		if got := a.Proxy.Conns(); got[len(got)-1].Backend != backends[1] {
			t.Fatalf("new connection went to %s, want %s", got[len(got)-1].Backend, backends[1])
		}
		c3.Close(websocket.StatusNormalClosure, "")

		os.WriteFile(path, []byte("listeners: [{address: \":1\", bogus: true}]"), 0o600)
		if err := a.Reload(); err == nil || !strings.Contains(err.Error(), "bogus") {
			t.Fatalf("invalid reload: %v, want an error naming the field", err)
		}
		echo(c, "after rejected reload")
		c4 := dialWS(t, wctx, free, "/", nil)
		c4.Close(websocket.StatusNormalClosure, "")
		c.Close(websocket.StatusNormalClosure, "")
	})
}
