package handshake

import (
	"net/netip"
	"strings"
	"testing"
)

// checkRewriteRoundTrip is the property the proxy relies on: what
// AppendRewritten produces, ParseRequest accepts with the same request line,
// Host and Upgrade. The limits get room for the added headers.
func checkRewriteRoundTrip(t testing.TB, r *Request, lim Limits) {
	t.Helper()
	lim = lim.withDefaults()
	roomy := Limits{MaxHeadBytes: 2*lim.MaxHeadBytes + 1024, MaxHeaders: lim.MaxHeaders + 8, MaxLineBytes: 2*lim.MaxHeadBytes + 1024}
	for _, fw := range []Forwarding{
		{ClientAddr: netip.MustParseAddrPort("192.0.2.1:5555"), Proto: "https", Headers: true, Close: !r.Upgrade},
		{ClientAddr: netip.MustParseAddrPort("[2001:db8::1%eth0]:5555"), Proto: "http", Headers: true},
		{Close: !r.Upgrade},
		{},
	} {
		out := r.AppendRewritten(nil, fw)
		r2, err := ParseRequest(out, roomy)
		if err != nil {
			t.Fatalf("rewritten head %q (fw %+v) does not parse: %v", out, fw, err)
		}
		if r2.Method != r.Method || r2.Target != r.Target || r2.Proto != r.Proto || r2.Host != r.Host || r2.Upgrade != r.Upgrade {
			t.Fatalf("rewritten head %q parses as %q %q %q host %q upgrade %v; want %q %q %q host %q upgrade %v",
				out, r2.Method, r2.Target, r2.Proto, r2.Host, r2.Upgrade, r.Method, r.Target, r.Proto, r.Host, r.Upgrade)
		}
		for _, name := range []string{"Content-Length", "Transfer-Encoding", "Origin", "Sec-WebSocket-Key"} {
			if r2.Header(name) != r.Header(name) {
				t.Fatalf("rewritten head %q changed %s", out, name)
			}
		}
	}
}

func mustParse(t testing.TB, h []byte) *Request {
	t.Helper()
	r, err := ParseRequest(h, Limits{})
	if err != nil {
		t.Fatalf("ParseRequest(%q): %v", h, err)
	}
	return r
}

func TestAppendRewritten(t *testing.T) {
	client := netip.MustParseAddrPort("192.0.2.1:40000")
	tests := []struct {
		name string
		in   []byte
		fw   Forwarding
		want []byte
	}{
		{
			name: "upgrade keeps everything, normalises whitespace",
			in:   head("GET /ws HTTP/1.1", "host:  A.example\t", "Upgrade: websocket", "Connection: keep-alive, Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version:13"),
			fw:   Forwarding{ClientAddr: client},
			want: head("GET /ws HTTP/1.1", "host: A.example", "Upgrade: websocket", "Connection: keep-alive, Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"),
		},
		{
			name: "forwarding headers on an upgrade: XFF appended, spoofed ones replaced",
			in:   head("GET /ws HTTP/1.1", "Host: a", "X-Real-IP: 10.0.0.1", "Upgrade: websocket", "X-Forwarded-For: 203.0.113.7", "Connection: Upgrade", "X-Forwarded-Proto: https", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"),
			fw:   Forwarding{ClientAddr: client, Proto: "http", Headers: true},
			want: head("GET /ws HTTP/1.1", "Host: a", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
				"X-Forwarded-For: 203.0.113.7, 192.0.2.1", "X-Real-IP: 192.0.2.1", "X-Forwarded-Proto: http"),
		},
		{
			name: "several client XFF lines become one list",
			in:   head("GET / HTTP/1.1", "Host: a", "x-forwarded-for: 203.0.113.7, 198.51.100.9", "X-Forwarded-For:", "X-FORWARDED-FOR: 203.0.113.8"),
			fw:   Forwarding{ClientAddr: client, Proto: "https", Headers: true},
			want: head("GET / HTTP/1.1", "Host: a", "X-Forwarded-For: 203.0.113.7, 198.51.100.9, 203.0.113.8, 192.0.2.1", "X-Real-IP: 192.0.2.1", "X-Forwarded-Proto: https"),
		},
		{
			name: "v4-mapped client unmapped, zone dropped",
			in:   head("GET / HTTP/1.1", "Host: a"),
			fw:   Forwarding{ClientAddr: netip.MustParseAddrPort("[::ffff:192.0.2.9]:1"), Headers: true, Proto: "http"},
			want: head("GET / HTTP/1.1", "Host: a", "X-Forwarded-For: 192.0.2.9", "X-Real-IP: 192.0.2.9", "X-Forwarded-Proto: http"),
		},
		{
			name: "ipv6 client",
			in:   head("GET / HTTP/1.1", "Host: a"),
			fw:   Forwarding{ClientAddr: netip.MustParseAddrPort("[fe80::1%eth0]:1"), Headers: true},
			want: head("GET / HTTP/1.1", "Host: a", "X-Forwarded-For: fe80::1", "X-Real-IP: fe80::1"),
		},
		{
			name: "no client address: client XFF kept as is, X-Real-IP still removed, bad proto not sent",
			in:   head("GET / HTTP/1.1", "Host: a", "X-Real-IP: 10.0.0.1", "X-Forwarded-For: 203.0.113.7"),
			fw:   Forwarding{Headers: true, Proto: "https\r\nX-Evil: 1"},
			want: head("GET / HTTP/1.1", "Host: a", "X-Forwarded-For: 203.0.113.7"),
		},
		{
			name: "close mode drops hop-by-hop, keeps framing even if listed",
			in: head("POST /api HTTP/1.1", "Host: a", "Connection: keep-alive, X-Secret, HTTP2-Settings, Content-Length", "Keep-Alive: timeout=5",
				"X-Secret: s", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__", "TE: trailers", "Proxy-Connection: keep-alive",
				"Proxy-Authorization: Basic eDp5", "Content-Length: 5", "Cookie: a=1"),
			fw:   Forwarding{ClientAddr: client, Close: true},
			want: head("POST /api HTTP/1.1", "Host: a", "Content-Length: 5", "Cookie: a=1", "Connection: close"),
		},
		{
			name: "close mode with forwarding headers",
			in:   head("GET / HTTP/1.0", "Connection: keep-alive", "X-Forwarded-For: 203.0.113.7"),
			fw:   Forwarding{ClientAddr: client, Close: true, Headers: true, Proto: "https"},
			want: head("GET / HTTP/1.0", "Connection: close", "X-Forwarded-For: 203.0.113.7, 192.0.2.1", "X-Real-IP: 192.0.2.1", "X-Forwarded-Proto: https"),
		},
		{
			name: "close mode: a client cannot have its own XFF treated as ours by listing it",
			in:   head("GET / HTTP/1.1", "Host: a", "Connection: X-Forwarded-For", "X-Forwarded-For: 1.2.3.4"),
			fw:   Forwarding{ClientAddr: client, Close: true, Headers: true},
			want: head("GET / HTTP/1.1", "Host: a", "Connection: close", "X-Forwarded-For: 192.0.2.1", "X-Real-IP: 192.0.2.1"),
		},
		{
			name: "chunked body framing kept in close mode",
			in:   head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", "Connection: Transfer-Encoding, Host"),
			fw:   Forwarding{Close: true},
			want: head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", "Connection: close"),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := mustParse(t, tt.in)
			prefix := []byte("PROXY UNKNOWN\r\n")
			got := r.AppendRewritten(prefix[:len(prefix):len(prefix)], tt.fw)
			if !strings.HasPrefix(string(got), string(prefix)) {
				t.Fatalf("dst prefix lost: %q", got)
			}
			if got := got[len(prefix):]; string(got) != string(tt.want) {
				t.Errorf("got\n%q\nwant\n%q", got, tt.want)
			}
			checkRewriteRoundTrip(t, r, Limits{})
		})
	}
}

func TestAppendRewrittenNoAllocWithRoom(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts differ under the race detector")
	}
	r := mustParse(t, ws(nil, "X-Forwarded-For: 203.0.113.7"))
	fw := Forwarding{ClientAddr: netip.MustParseAddrPort("192.0.2.1:1"), Proto: "https", Headers: true}
	buf := make([]byte, 0, 4096)
	if n := testing.AllocsPerRun(100, func() { buf = r.AppendRewritten(buf[:0], fw) }); n != 0 {
		t.Errorf("AppendRewritten allocated %v times with a large enough dst", n)
	}
	if n := testing.AllocsPerRun(100, func() { _ = r.AppendRewritten(nil, fw) }); n > 1 {
		t.Errorf("AppendRewritten allocated %v times with a nil dst, want 1", n)
	}
}
