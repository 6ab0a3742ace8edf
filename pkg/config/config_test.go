package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const good = `
listeners:
  - name: public
    address: ":8080"
    routes:
      - host: "*.example.com"
        path: /chat/
        pool: chat
        upgrade_only: true
      - path: "=/ws"
        pool: chat
        hash_key: cookie:sid
  - address: ":9000"
    mode: tcp
    pool: chat
    dataplane: splice
pools:
  - name: chat
    balance: maglev
    hash_key: client_ip/24
    balance_factor: 0.25
    backends:
      - address: 10.0.0.1:8080
        weight: 3
      - address: "[2001:db8::1]:8080"
      - address: backend.internal:8080
        backup: true
    health:
      type: http
      path: /health
      interval: 3s
      timeout: 1s
      rise: 2
      fall: 3
drain_timeout: 7d
`

func TestParseGood(t *testing.T) {
	cfg, err := Parse([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Listeners[1].Name; got != ":9000" {
		t.Errorf("listener name default = %q, want the address", got)
	}
	if cfg.Listeners[0].Dataplane != "auto" || cfg.Listeners[1].Dataplane != "splice" {
		t.Errorf("dataplanes = %q, %q", cfg.Listeners[0].Dataplane, cfg.Listeners[1].Dataplane)
	}
	if cfg.DrainTimeout.D() != 7*24*time.Hour {
		t.Errorf("drain_timeout 7d = %v", cfg.DrainTimeout.D())
	}
	p := cfg.Pools[0]
	if p.Backends[1].Weight != 1 || p.Backends[0].Weight != 3 || !p.Backends[2].Backup {
		t.Errorf("backends = %+v", p.Backends)
	}
	if cfg.Listeners[0].MaxHeadBytes != DefaultMaxHeadBytes || cfg.Listeners[0].IdleTimeout.D() != DefaultIdleTimeout {
		t.Errorf("listener defaults not applied: %+v", cfg.Listeners[0])
	}
}

// TestParseErrors checks that each mistake is reported with the field's
// path and a hint at the fix.
func TestParseErrors(t *testing.T) {
	base := "pools: [{name: p, backends: [{address: \"10.0.0.1:80\"}]}]\n"
	cases := []struct {
		name, yaml string
		want       []string // substrings that must all appear
	}{
		{"empty", "", []string{"empty"}},
		{"unknown field", "listeners: [{address: \":80\", bogus: 1}]\n" + base, []string{"bogus", "not a known field", "Listener"}},
		{"wrong type", "listeners: [{address: \":80\", max_headers: many}]\n" + base, []string{"line 1", "many"}},
		{"no listener", base, []string{"listeners", "add one"}},
		{"bad mode", "listeners: [{address: \":80\", mode: udp}]\n" + base, []string{"listeners[0].mode", "websocket, tcp"}},
		{"unknown pool", "listeners: [{address: \":80\", routes: [{path: /x, pool: nope}]}]\n" + base, []string{"listeners[0].routes[0].pool", "nope"}},
		{"bad address", "listeners: [{address: \"8080\"}]\n" + base, []string{"listeners[0].address", "host:port"}},
		{"backend no port", "listeners: [{address: \":80\"}]\npools: [{name: p, backends: [{address: \"10.0.0.1\"}]}]", []string{"pools[0].backends[0].address"}},
		{"bad weight", "listeners: [{address: \":80\"}]\npools: [{name: p, backends: [{address: \"a:1\", weight: -2}]}]", []string{"pools[0].backends[0].weight", "1 to 1000"}},
		{"all backup", "listeners: [{address: \":80\"}]\npools: [{name: p, backends: [{address: \"a:1\", backup: true}]}]", []string{"every backend is a backup"}},
		{"bad algorithm", "listeners: [{address: \":80\"}]\npools: [{name: p, balance: ip_hash, backends: [{address: \"a:1\"}]}]", []string{"pools[0].balance", "maglev"}},
		{"bad hash key", "listeners: [{address: \":80\"}]\npools: [{name: p, hash_key: header, backends: [{address: \"a:1\"}]}]", []string{"pools[0].hash_key", "header:NAME"}},
		{"table not prime", "listeners: [{address: \":80\"}]\npools: [{name: p, maglev_table_size: 1000, backends: [{address: \"a:1\"}]}]", []string{"maglev_table_size", "prime", "1009"}},
		{"bad duration", "listeners: [{address: \":80\", idle_timeout: soon}]\n" + base, []string{"soon", "30s"}},
		{"duplicate pool", "listeners: [{address: \":80\"}]\npools: [{name: p, backends: [{address: \"a:1\"}]}, {name: p, backends: [{address: \"b:1\"}]}]", []string{"pools[1].name", "twice"}},
		{"metrics on data port", "listeners: [{address: \":80\"}]\nmetrics: {address: \":80\"}\n" + base, []string{"metrics.address", "never be reachable"}},
		{"tcp routes", "listeners: [{address: \":80\", mode: tcp, pool: p, routes: [{pool: p}]}]\n" + base, []string{"listeners[0].routes", "cannot route"}},
		{"wildcard middle", "listeners: [{address: \":80\", routes: [{host: \"a.*.com\", pool: p}]}]\n" + base, []string{"routes[0].host", "first label"}},
		{"two documents", "listeners: [{address: \":80\"}]\n" + base + "---\nfoo: 1\n", []string{"more than one YAML document"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	_, err := Parse([]byte("listeners: [{address: \"x\", mode: udp}]\npools: [{name: p, backends: [{address: \"a:1\", weight: 5000}]}]"))
	var fe *FieldError
	if !errors.As(err, &fe) {
		t.Fatalf("error %v is not a FieldError", err)
	}
	for _, f := range []string{"listeners[0].address", "listeners[0].mode", "pools[0].backends[0].weight"} {
		if !strings.Contains(err.Error(), f) {
			t.Errorf("missing %s in %v", f, err)
		}
	}
}

func TestFromQuick(t *testing.T) {
	cfg, err := FromQuick(Quick{Listen: []string{":8080"}, Backends: []string{"10.0.0.1:8080", "10.0.0.2:8080=3", "10.0.0.3:8080=backup"}})
	if err != nil {
		t.Fatal(err)
	}
	b := cfg.Pools[0].Backends
	if b[0].Weight != 1 || b[1].Weight != 3 || !b[2].Backup || b[2].Address != "10.0.0.3:8080" {
		t.Fatalf("backends %+v", b)
	}
	if cfg.Listeners[0].Pool != "default" || cfg.Listeners[0].Mode != "websocket" {
		t.Fatalf("listener %+v", cfg.Listeners[0])
	}
	for _, bad := range []string{"10.0.0.1:80=x", "10.0.0.1:80=0", "nohost"} {
		if _, err := FromQuick(Quick{Listen: []string{":8080"}, Backends: []string{bad}}); err == nil {
			t.Errorf("--backend %s accepted", bad)
		}
	}
}

func TestParseDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{"30s": 30 * time.Second, "3600": time.Hour, "7d": 7 * 24 * time.Hour, "1h30m": 90 * time.Minute, "": 0} {
		got, err := ParseDuration(in)
		if err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"-1s", "soon", "1x"} {
		if _, err := ParseDuration(bad); err == nil {
			t.Errorf("ParseDuration(%q) accepted", bad)
		}
	}
}

func TestLoadNamesFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "w.yaml")
	os.WriteFile(p, []byte("listeners: [{address: \":80\", nope: 1}]"), 0o600)
	_, err := Load(p)
	if err == nil || !strings.Contains(err.Error(), p) {
		t.Fatalf("error %v does not name the file", err)
	}
}

// FuzzParse: no input makes the decoder panic, and anything accepted is
// valid.
func FuzzParse(f *testing.F) {
	f.Add([]byte(good))
	f.Add([]byte("listeners: [{address: \":80\"}]\npools: [{name: p, backends: [{address: \"a:1\"}]}]"))
	f.Add([]byte("listeners: &a [*a]"))
	f.Add([]byte("drain_timeout: 99999999999999999999d"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data)
		if err == nil {
			if err := cfg.Validate(); err != nil {
				t.Fatalf("Parse accepted a config that does not validate: %v", err)
			}
		}
	})
}
