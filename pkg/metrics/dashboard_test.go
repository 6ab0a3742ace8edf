package metrics

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestDashboard checks that every metric the Grafana dashboard queries is
// one the agent exports, so a rename cannot leave a panel silently empty.
func TestDashboard(t *testing.T) {
	b, err := os.ReadFile("../../deploy/grafana/wsplice.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}

	src := &fakeSource{
		conns:    []Conn{conn(1, "b:1", "sockmap", 1, 1)},
		backends: []Backend{{Pool: "p", Address: "b:1", Healthy: true}},
		proxy:    ProxyCounters{Refusals: map[string]uint64{"no_route": 1}},
		sockmap:  &SockmapCounters{Demotions: map[string]uint64{"parked": 1}},
		splice:   &SpliceStats{},
	}
	c := New(src, Options{PerConnection: true})
	c.ObserveEstablished(Established{Listener: "ws", Pool: "p", Backend: "b:1", Handshake: time.Millisecond, Connect: time.Millisecond})
	c.ObserveClosed(Closed{Conn: conn(2, "b:1", "sockmap", 1, 1), Reason: "kill", Duration: time.Second})
	mfs, err := NewRegistry(c).Gather()
	if err != nil {
		t.Fatal(err)
	}
	exported := map[string]bool{}
	for _, mf := range mfs {
		exported[mf.GetName()] = true
	}

	name := regexp.MustCompile(`\b(?:wsplice|process|go)_[a-z0-9_]+`)
	check := func(where, expr string) {
		for _, m := range name.FindAllString(expr, -1) {
			base := m
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if s, ok := strings.CutSuffix(m, suffix); ok && exported[s] {
					base = s
				}
			}
			if !exported[base] {
				t.Errorf("%s: %s is not exported by the agent", where, m)
			}
		}
	}
	n := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			check("panel "+p.Title, tg.Expr)
			n++
		}
	}
	for _, v := range dash.Templating.List {
		check("variable", v.Definition)
	}
	if n < 20 {
		t.Errorf("only %d queries in the dashboard", n)
	}
}
