package config

import (
	"strings"
	"testing"
	"time"
)

func TestTLSConfig(t *testing.T) {
	base := `
pools:
  - name: app
    backends: [{address: "127.0.0.1:9000"}]
  - name: other
    backends: [{address: "127.0.0.1:9001"}]
listeners:
`
	for _, tc := range []struct {
		name, yaml string
		errs       []string // substrings every one of which must appear; none = valid
	}{
		{"terminate", `
  - address: ":8443"
    pool: app
    tls:
      certificates: [{cert: /c.pem, key: /k.pem}, {cert: /c2.pem, key: /k2.pem}]
      min_version: "1.3"
      client_ca: /ca.pem
      backend: {ca: /bca.pem, server_name: backend.internal}
`, nil},
		{"passthrough", `
  - address: ":443"
    mode: tls_passthrough
    pool: app
    sni:
      routes:
        - {server_name: chat.example.com, pool: app}
        - {server_name: "*.example.com", pool: other, hash_key: sni}
      hash_key: client_ip/24
      no_sni: close
      malformed: pool
`, nil},
		{"passthrough pool only", `
  - address: ":443"
    mode: tls_passthrough
    pool: app
`, nil},
		{"keepalive", `
  - address: ":80"
    pool: app
    keepalive:
      client: {idle: 20s, interval: 5s, count: 4, user_timeout: 45s}
      backend: {enabled: false}
`, nil},
		{"no certificate", `
  - address: ":8443"
    tls: {min_version: "1.2"}
`, []string{"listeners[0].tls.certificates: no certificate"}},
		{"bad fields", `
  - address: ":8443"
    tls:
      certificates: [{cert: "", key: ""}]
      min_version: "1.1"
      unknown_sni: drop
      client_auth: require
      watch_interval: 100ms
      backend: {cert: /x.pem, server_name: "a b"}
`, []string{".certificates[0].cert: empty", ".certificates[0].key: empty", `min_version: "1.1" is not one of 1.2, 1.3`,
			"unknown_sni", "client_auth: set without client_ca", "watch_interval", "backend: cert and key go together", "backend.server_name"}},
		{"tls on passthrough", `
  - address: ":443"
    mode: tls_passthrough
    pool: app
    tls: {certificates: [{cert: /c, key: /k}]}
`, []string{"tls_passthrough listener never decrypts"}},
		{"sni on websocket", `
  - address: ":443"
    pool: app
    sni: {routes: [{server_name: a.example, pool: app}]}
`, []string{"sni routing needs mode tls_passthrough"}},
		{"bad sni routes", `
  - address: ":443"
    mode: tls_passthrough
    sni:
      routes:
        - {server_name: "", pool: app}
        - {server_name: "a.*.example", pool: ""}
        - {server_name: "ok.example", pool: app, hash_key: "header:X"}
      no_sni: default
      max_hello_bytes: 10
`, []string{"routes[0].server_name: empty", "routes[1].server_name", "routes[1].pool: empty", "routes[2].hash_key",
			"no_sni", "max_hello_bytes"}},
		{"passthrough without pool", `
  - address: ":443"
    mode: tls_passthrough
`, []string{"sni.routes: no route and no pool"}},
		{"passthrough with http routes", `
  - address: ":443"
    mode: tls_passthrough
    pool: app
    routes: [{path: /, pool: app}]
`, []string{"tls_passthrough listener cannot read HTTP"}},
		{"bad keepalive", `
  - address: ":80"
    keepalive:
      client: {idle: 1500ms, interval: 0.5s, count: 200, user_timeout: 48h}
`, []string{"keepalive.client.idle", "keepalive.client.interval", "keepalive.client.count", "keepalive.client.user_timeout"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse([]byte(base + tc.yaml))
			if len(tc.errs) == 0 {
				if err != nil {
					t.Fatalf("valid config refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("invalid config accepted: %+v", cfg.Listeners[0])
			}
			for _, want := range tc.errs {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error lacks %q:\n%v", want, err)
				}
			}
		})
	}
}

func TestTLSDefaults(t *testing.T) {
	cfg, err := Parse([]byte(`
pools: [{name: app, backends: [{address: "127.0.0.1:9000"}]}]
listeners:
  - address: ":8443"
    tls: {certificates: [{cert: /c, key: /k}], client_ca: /ca}
  - address: ":443"
    mode: tls_passthrough
    pool: app
    keepalive: {client: {idle: 10s}}
`))
	if err != nil {
		t.Fatal(err)
	}
	tl := cfg.Listeners[0].TLS
	if tl.MinVersion != "1.2" || tl.UnknownSNI != "default" || tl.ClientAuth != "require" || tl.WatchInterval.D() != 5*time.Second {
		t.Fatalf("tls defaults: %+v", tl)
	}
	ka := cfg.Listeners[0].Keepalive
	if !ka.Client.On() || ka.Client.Idle.D() != 30*time.Second || ka.Client.Interval.D() != 10*time.Second ||
		ka.Client.Count != 3 || ka.Client.UserTimeout.D() != time.Minute || !ka.Backend.On() {
		t.Fatalf("keepalive defaults: %+v %+v", ka.Client, ka.Backend)
	}
	s := cfg.Listeners[1].SNI
	if s == nil || s.NoSNI != "pool" || s.Malformed != "close" || s.MaxHelloBytes != 16384 {
		t.Fatalf("sni defaults: %+v", s)
	}
	if k := cfg.Listeners[1].Keepalive.Client; k.Idle.D() != 10*time.Second || k.UserTimeout.D() != 40*time.Second {
		t.Fatalf("user timeout follows idle: %+v", k)
	}
}

func TestQuickTLS(t *testing.T) {
	cfg, err := FromQuick(Quick{Listen: []string{":8443"}, Backends: []string{"127.0.0.1:9000"}, TLSCert: "/c.pem", TLSKey: "/k.pem"})
	if err != nil {
		t.Fatal(err)
	}
	if tl := cfg.Listeners[0].TLS; tl == nil || tl.Certificates[0] != (Certificate{Cert: "/c.pem", Key: "/k.pem"}) {
		t.Fatalf("listener tls %+v", tl)
	}
	if _, err := FromQuick(Quick{Listen: []string{":8443"}, Backends: []string{"127.0.0.1:9000"}, TLSCert: "/c.pem"}); err == nil ||
		!strings.Contains(err.Error(), "--tls-cert/--tls-key") {
		t.Fatalf("cert without key: %v", err)
	}
}
