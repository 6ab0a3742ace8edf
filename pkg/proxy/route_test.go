package proxy

import (
	"net/netip"
	"testing"
	"time"

	"github.com/wsplice/wsplice/pkg/handshake"
)

func TestRouteMatch(t *testing.T) {
	cases := []struct {
		host, path       string
		reqHost, reqPath string
		exact            bool
		want             bool
	}{
		{"", "/ws/", "any", "/ws/chat", false, true},
		{"", "/ws/", "any", "/other", false, false},
		{"", "/ws", "any", "/ws", true, true},
		{"", "/ws", "any", "/ws/x", true, false},
		{"ws.example.com", "", "WS.Example.com:8080", "/", false, true},
		{"ws.example.com", "", "api.example.com", "/", false, false},
		{"*.example.com", "", "a.example.com", "/", false, true},
		{"*.example.com", "", "a.b.example.com", "/", false, true},
		{"*.example.com", "", "example.com", "/", false, false},
		{"*.example.com", "", "badexample.com", "/", false, false},
		{"::1", "", "[::1]:8080", "/", false, true},
	}
	for _, tc := range cases {
		r := &route{host: tc.host, path: tc.path, exact: tc.exact}
		if got := r.match(tc.reqHost, tc.reqPath); got != tc.want {
			t.Errorf("route{%q %q exact=%v}.match(%q, %q) = %v", tc.host, tc.path, tc.exact, tc.reqHost, tc.reqPath, got)
		}
	}
}

func TestOriginAllowed(t *testing.T) {
	r := &route{origins: []string{"https://app.example.com", "*.trusted.org"}}
	for origin, want := range map[string]bool{
		"https://app.example.com":  true,
		"https://evil.example.com": false,
		"https://x.trusted.org":    true,
		"http://x.trusted.org:81":  true,
		"https://trusted.org":      false,
		"":                         false,
	} {
		if got := r.originAllowed(origin); got != want {
			t.Errorf("originAllowed(%q) = %v, want %v", origin, got, want)
		}
	}
	if !(&route{}).originAllowed("") {
		t.Error("no allow-list must allow everything")
	}
}

func TestHashKeyCompute(t *testing.T) {
	head := "GET /chat/room?uid=42 HTTP/1.1\r\nHost: x\r\nX-User-Id: alice\r\nCookie: a=1; sid=s3\r\n\r\n"
	req, err := handshake.ParseRequest([]byte(head), handshake.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	ip := netip.MustParseAddr("192.0.2.77")
	same := func(a, b string) bool {
		ka := keyFor(parseHashKey(a), req, netip.AddrPortFrom(ip, 1))
		kb := keyFor(parseHashKey(b), req, netip.AddrPortFrom(ip, 1))
		return ka == kb
	}
	for _, k := range []string{"header:X-User-Id", "cookie:sid", "query:uid", "path", "uri", "client_ip", "client_ip/24", "client_port"} {
		key := keyFor(parseHashKey(k), req, netip.AddrPortFrom(ip, 1))
		if !key.Present {
			t.Errorf("%s: key missing", k)
		}
	}
	if same("header:X-User-Id", "cookie:sid") {
		t.Error("different keys hash the same")
	}
	if keyFor(parseHashKey("header:X-Missing"), req, netip.AddrPortFrom(ip, 1)).Present {
		t.Error("a missing header must give no key (the fallback algorithm picks)")
	}
	// client_ip/24 groups a /24 together, client_ip does not.
	k24 := parseHashKey("client_ip/24")
	if keyFor(k24, nil, netip.AddrPortFrom(ip, 1)) != keyFor(k24, nil, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), 1)) {
		t.Error("client_ip/24 separates two addresses of one /24")
	}
	full := parseHashKey("client_ip")
	if keyFor(full, nil, netip.AddrPortFrom(ip, 1)) == keyFor(full, nil, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), 1)) {
		t.Error("client_ip merges two addresses")
	}
	// IPv6 under client_ip/24 is grouped by /64.
	a6, b6 := netip.MustParseAddr("2001:db8:1:2::1"), netip.MustParseAddr("2001:db8:1:2:ffff::9")
	if keyFor(k24, nil, netip.AddrPortFrom(a6, 1)) != keyFor(k24, nil, netip.AddrPortFrom(b6, 1)) {
		t.Error("client_ip/24 should group IPv6 clients by /64")
	}
}

func TestLimiter(t *testing.T) {
	now := time.Now()
	l := newLimiter(3, 2, 0, 0, 64)
	a := netip.MustParseAddr("198.51.100.1")
	b := netip.MustParseAddr("198.51.100.2")
	k1, r := l.admit(a, now)
	if r != "" {
		t.Fatal(r)
	}
	if _, r := l.admit(a, now); r != "" {
		t.Fatal(r)
	}
	if _, r := l.admit(a, now); r != RefusePerIPConns {
		t.Fatalf("third from one address: %q, want per_ip_conns", r)
	}
	if _, r := l.admit(b, now); r != "" {
		t.Fatal(r)
	}
	if _, r := l.admit(netip.MustParseAddr("198.51.100.3"), now); r != RefuseMaxConns {
		t.Fatalf("fourth overall: %q, want max_conns", r)
	}
	l.release(k1)
	if _, r := l.admit(a, now); r != "" {
		t.Fatalf("after release: %q", r)
	}

	// Rate: burst 2 at 1/s.
	rl := newLimiter(100, 0, 1, 2, 64)
	for i := range 2 {
		if _, r := rl.admit(a, now); r != "" {
			t.Fatalf("burst %d refused: %s", i, r)
		}
	}
	if _, r := rl.admit(a, now); r != RefusePerIPRate {
		t.Fatalf("over the burst: %q, want per_ip_rate", r)
	}
	if _, r := rl.admit(a, now.Add(1100*time.Millisecond)); r != "" {
		t.Fatalf("after refill: %q", r)
	}

	// IPv6 clients of one /64 share a bucket.
	l6 := newLimiter(100, 1, 0, 0, 64)
	if _, r := l6.admit(netip.MustParseAddr("2001:db8::1"), now); r != "" {
		t.Fatal(r)
	}
	if _, r := l6.admit(netip.MustParseAddr("2001:db8::2"), now); r != RefusePerIPConns {
		t.Fatalf("second address of the same /64: %q", r)
	}
	// Sweeping forgets idle addresses only.
	l6.sweep(now.Add(2 * time.Minute))
	if len(l6.perAddr) != 1 {
		t.Fatalf("sweep removed a busy address: %d left", len(l6.perAddr))
	}
}
