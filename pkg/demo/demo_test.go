package demo

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/wsplice/wsplice/test/testutil"
)

// TestDemo runs the quick start's first command in small, on both data
// planes: every client's bytes come back, each user lands on one backend
// twice, and the wss:// clients go through TLS termination.
func TestDemo(t *testing.T) {
	for _, plane := range []string{"splice", "sockmap"} {
		t.Run(plane, func(t *testing.T) {
			if plane == "sockmap" {
				testutil.RequirePrivileged(t)
			}
			var out strings.Builder
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			err := Run(ctx, Options{Backends: 2, Clients: 5, TLSClients: 2, Messages: 6, Dataplane: plane,
				Out: &out, Log: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatalf("demo: %v\n%s", err, out.String())
			}
			for _, want := range []string{"demo ok", " wss ", "copy", plane} {
				if !strings.Contains(out.String(), want) {
					t.Errorf("output lacks %q:\n%s", want, out.String())
				}
			}
			if n := strings.Count(out.String(), "ok: every byte came back"); n != 5 {
				t.Errorf("%d of 5 clients ok:\n%s", n, out.String())
			}
		})
	}
}
