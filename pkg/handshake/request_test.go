package handshake

import (
	"bytes"
	"encoding/base64"
	"errors"
	"strings"
	"testing"
)

// head joins lines with CRLF and ends the head with an empty line.
func head(lines ...string) []byte {
	return []byte(strings.Join(lines, "\r\n") + "\r\n\r\n")
}

// wsLines is a valid browser-like WebSocket handshake; tests vary it.
var wsLines = []string{
	"GET /ws/chat?x=1&room=a%20b HTTP/1.1",
	"Host: Example.COM:8080",
	"Upgrade: websocket",
	"Connection: Upgrade",
	"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
	"Sec-WebSocket-Version: 13",
	"Origin: https://example.com",
	"Cookie: a=1; session=\"abc\"; b=2",
}

// ws returns wsLines with line i replaced (or removed when repl is "") and
// extra lines appended.
func ws(replace map[int]string, extra ...string) []byte {
	var lines []string
	for i, l := range wsLines {
		if r, ok := replace[i]; ok {
			if r == "" {
				continue
			}
			l = r
		}
		lines = append(lines, l)
	}
	return head(append(lines, extra...)...)
}

func TestParseRequestAccepts(t *testing.T) {
	tests := []struct {
		name    string
		head    []byte
		upgrade bool
		host    string
		path    string
		query   string
	}{
		{"websocket", ws(nil), true, "example.com:8080", "/ws/chat", "x=1&room=a%20b"},
		{"firefox connection list", ws(map[int]string{3: "Connection: keep-alive, Upgrade"}), true, "example.com:8080", "/ws/chat", "x=1&room=a%20b"},
		{"empty list elements", ws(map[int]string{2: "Upgrade: , websocket,", 3: "Connection: ,Upgrade,,"}), true, "example.com:8080", "/ws/chat", "x=1&room=a%20b"},
		{"connection keep-alive and upgrade", ws(map[int]string{3: "Connection: Upgrade, Keep-Alive"}), true, "example.com:8080", "/ws/chat", "x=1&room=a%20b"},
		{"plain request with any connection options", head("GET / HTTP/1.1", "Host: a", "Upgrade: foo", "Connection: x, , upgrade"), false, "a", "/", ""},
		{"connection in two headers", ws(map[int]string{3: "Connection: keep-alive"}, "Connection: upgrade"), true, "example.com:8080", "/ws/chat", "x=1&room=a%20b"},
		{"upgrade token case", ws(map[int]string{2: "upgrade:   WebSocket  "}), true, "example.com:8080", "/ws/chat", "x=1&room=a%20b"},
		{"key with loose trailing bits", ws(map[int]string{4: "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR=="}), true, "example.com:8080", "/ws/chat", "x=1&room=a%20b"},
		{"zero content length on upgrade", ws(nil, "Content-Length: 0"), true, "example.com:8080", "/ws/chat", "x=1&room=a%20b"},
		{"plain get", head("GET / HTTP/1.1", "Host: a"), false, "a", "/", ""},
		{"plain post with body", head("POST /submit HTTP/1.1", "Host: a", "Content-Length: 5"), false, "a", "/submit", ""},
		{"chunked post", head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: gzip, Chunked"), false, "a", "/", ""},
		{"h2c upgrade is plain", head("GET / HTTP/1.1", "Host: a", "Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings", "HTTP2-Settings: AAMAAABkAAQAAP__"), false, "a", "/", ""},
		{"http/1.0 without host", head("GET /x HTTP/1.0"), false, "", "/x", ""},
		{"absolute form", head("GET http://Example.com/p?q=1 HTTP/1.1", "Host: example.COM"), false, "example.com", "/p", "q=1"},
		{"absolute form ws no path", head("GET wss://h:443?q HTTP/1.1", "Host: h:443"), false, "h:443", "/", "q"},
		{"absolute form websocket", ws(map[int]string{0: "GET ws://example.com:8080/ws HTTP/1.1"}), true, "example.com:8080", "/ws", ""},
		{"options asterisk", head("OPTIONS * HTTP/1.1", "Host: a"), false, "a", "*", ""},
		{"ipv6 host", head("GET / HTTP/1.1", "Host: [2001:DB8::1]:80"), false, "[2001:db8::1]:80", "/", ""},
		{"empty host", head("GET / HTTP/1.1", "Host:"), false, "", "/", ""},
		{"htab and obs-text in values", head("GET / HTTP/1.1", "Host: a", "X-A: b\tc", "X-B: caf\xc3\xa9", "X-Empty:"), false, "a", "/", ""},
		{"extension method", head("PURGE /x HTTP/1.1", "Host: a"), false, "a", "/x", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := ParseRequest(tt.head, Limits{})
			if err != nil {
				t.Fatalf("ParseRequest: %v", err)
			}
			if r.Upgrade != tt.upgrade || r.Host != tt.host || r.Path != tt.path || r.RawQuery != tt.query {
				t.Errorf("got Upgrade=%v Host=%q Path=%q RawQuery=%q, want %v %q %q %q",
					r.Upgrade, r.Host, r.Path, r.RawQuery, tt.upgrade, tt.host, tt.path, tt.query)
			}
			checkRewriteRoundTrip(t, r, Limits{})
			checkGoReadsRequest(t, tt.head, r)
		})
	}
}

func TestParseRequestFields(t *testing.T) {
	r, err := ParseRequest(ws(nil, "X-Dup: first", "x-dup: second", "Cookie: late=3; a=ignored"), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Method != "GET" || r.Target != "/ws/chat?x=1&room=a%20b" || r.Proto != "HTTP/1.1" {
		t.Errorf("request line: %q %q %q", r.Method, r.Target, r.Proto)
	}
	if len(r.Headers) != len(wsLines)-1+3 || r.Headers[0] != (Header{"Host", "Example.COM:8080"}) {
		t.Errorf("headers: %q", r.Headers)
	}
	for _, c := range []struct{ got, want string }{
		{r.Header("x-DUP"), "first"},
		{r.Header("missing"), ""},
		{r.Origin(), "https://example.com"},
		{r.Cookie("a"), "1"},
		{r.Cookie("session"), "abc"},
		{r.Cookie("late"), "3"},
		{r.Cookie("A"), ""},
		{r.Cookie(""), ""},
		{r.Query("x"), "1"},
		{r.Query("room"), "a b"},
		{r.Query("nope"), ""},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
	q := &Request{RawQuery: "a+b=1&k=%zz&e&t=x+y&%6B2=v"}
	for name, want := range map[string]string{"a b": "1", "k": "", "e": "", "t": "x y", "k2": "v"} {
		if got := q.Query(name); got != want {
			t.Errorf("Query(%q) = %q, want %q", name, got, want)
		}
	}
}

func TestParseRequestRefuses(t *testing.T) {
	small := Limits{MaxHeadBytes: 200, MaxHeaders: 3, MaxLineBytes: 40}
	tests := []struct {
		name   string
		head   []byte
		lim    Limits
		status int
		reason string
	}{
		// Request line.
		{"no version", []byte("GET /\r\n\r\n"), Limits{}, 400, ReasonMalformed},
		{"double space", head("GET  / HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"trailing space", head("GET / HTTP/1.1 ", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"tab separator", head("GET\t/ HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"method not token", head("G@T / HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"lower-case version", head("GET / http/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"junk version", head("GET / HTTP/1.1x", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"DEL in target", head("GET /a\x7fb HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"high byte in target", head("GET /caf\xc3\xa9 HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"bare percent in target", head("GET /% HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"bad percent-encoding in target", head("GET /a%2x HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"short percent-encoding in query", head("GET /a?b=%2 HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"fragment in target", head("GET /a#b HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"relative target", head("GET a/b HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"asterisk with GET", head("GET * HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"unknown scheme", head("GET ftp://a/ HTTP/1.1", "Host: a"), Limits{}, 400, ReasonMalformed},
		{"userinfo", head("GET http://u@a/ HTTP/1.1", "Host: a"), Limits{}, 400, ReasonHost},
		{"empty authority", head("GET http:///a HTTP/1.1", "Host: a"), Limits{}, 400, ReasonHost},
		{"absolute host mismatch", head("GET http://a/ HTTP/1.1", "Host: b"), Limits{}, 400, ReasonHost},
		{"leading empty line", []byte("\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), Limits{}, 400, ReasonMalformed},
		{"http/2", head("GET / HTTP/2.0", "Host: a"), Limits{}, 505, ReasonHTTPVersion},
		{"http/2 preface", []byte("PRI * HTTP/2.0\r\n\r\n"), Limits{}, 505, ReasonHTTPVersion},
		{"http/1.2", head("GET / HTTP/1.2", "Host: a"), Limits{}, 505, ReasonHTTPVersion},
		{"http/0.9 style", []byte("GET /\r\n\r\n"), Limits{}, 400, ReasonMalformed},
		{"connect", head("CONNECT a:443 HTTP/1.1", "Host: a:443"), Limits{}, 501, ReasonMethod},

		// Line syntax.
		{"bare LF ending", []byte("GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n"), Limits{}, 400, ReasonSmuggling},
		{"bare LF request line", []byte("GET / HTTP/1.1\nHost: a\r\n\r\n"), Limits{}, 400, ReasonSmuggling},
		{"bare CR in value", head("GET / HTTP/1.1", "Host: a", "X: a\rb"), Limits{}, 400, ReasonSmuggling},
		{"bare CR in name", head("GET / HTTP/1.1", "Host: a", "X\r: b"), Limits{}, 400, ReasonSmuggling},
		{"bare CR in request line", head("GET /\r HTTP/1.1", "Host: a"), Limits{}, 400, ReasonSmuggling},
		{"obs-fold", head("GET / HTTP/1.1", "Host: a", "X: a", " b"), Limits{}, 400, ReasonSmuggling},
		{"obs-fold tab", head("GET / HTTP/1.1", "Host: a", "X: a", "\tb"), Limits{}, 400, ReasonSmuggling},
		{"space before colon", head("GET / HTTP/1.1", "Host : a"), Limits{}, 400, ReasonSmuggling},
		{"tab before colon", head("GET / HTTP/1.1", "Host: a", "Content-Length\t: 0"), Limits{}, 400, ReasonSmuggling},
		{"name with space", head("GET / HTTP/1.1", "Host: a", "X Y: b"), Limits{}, 400, ReasonMalformed},
		{"name not token", head("GET / HTTP/1.1", "Host: a", "X(y): b"), Limits{}, 400, ReasonMalformed},
		{"empty name", head("GET / HTTP/1.1", "Host: a", ": b"), Limits{}, 400, ReasonMalformed},
		{"no colon", head("GET / HTTP/1.1", "Host: a", "Xy"), Limits{}, 400, ReasonMalformed},
		{"NUL in value", head("GET / HTTP/1.1", "Host: a", "X: a\x00b"), Limits{}, 400, ReasonMalformed},
		{"DEL in value", head("GET / HTTP/1.1", "Host: a", "X: a\x7fb"), Limits{}, 400, ReasonMalformed},
		{"not ended", []byte("GET / HTTP/1.1\r\nHost: a\r\n"), Limits{}, 400, ReasonMalformed},
		{"bytes after the end", []byte("GET / HTTP/1.1\r\nHost: a\r\n\r\nX: y\r\n\r\n"), Limits{}, 400, ReasonMalformed},

		// Limits.
		{"too many headers", head("GET / HTTP/1.1", "Host: a", "A: 1", "B: 2", "C: 3"), small, 431, ReasonTooManyHeaders},
		{"header line too long", head("GET / HTTP/1.1", "Host: a", "X: "+strings.Repeat("a", 38)), small, 431, ReasonLineTooLong},
		{"request line too long", head("GET /"+strings.Repeat("a", 30)+" HTTP/1.1", "Host: a"), small, 431, ReasonLineTooLong},
		{"head too large", head("GET / HTTP/1.1", "Host: a", "X: "+strings.Repeat("a", 30), "Y: "+strings.Repeat("a", 30), "Z: "+strings.Repeat("a", 30)), Limits{MaxHeadBytes: 100}, 431, ReasonHeadTooLarge},

		// Framing.
		{"duplicate equal content-length", head("POST / HTTP/1.1", "Host: a", "Content-Length: 5", "content-length: 5"), Limits{}, 400, ReasonSmuggling},
		{"content-length list", head("POST / HTTP/1.1", "Host: a", "Content-Length: 5, 5"), Limits{}, 400, ReasonSmuggling},
		{"content-length sign", head("POST / HTTP/1.1", "Host: a", "Content-Length: +5"), Limits{}, 400, ReasonSmuggling},
		{"content-length negative", head("POST / HTTP/1.1", "Host: a", "Content-Length: -1"), Limits{}, 400, ReasonSmuggling},
		{"content-length empty", head("POST / HTTP/1.1", "Host: a", "Content-Length:"), Limits{}, 400, ReasonSmuggling},
		{"content-length overflow", head("POST / HTTP/1.1", "Host: a", "Content-Length: 9999999999999999999"), Limits{}, 400, ReasonSmuggling},
		{"te and cl", head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", "Content-Length: 5"), Limits{}, 400, ReasonSmuggling},
		{"cl and te", head("POST / HTTP/1.1", "Host: a", "Content-Length: 5", "Transfer-Encoding: chunked"), Limits{}, 400, ReasonSmuggling},
		{"two te", head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), Limits{}, 400, ReasonSmuggling},
		{"te not chunked", head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: gzip"), Limits{}, 400, ReasonSmuggling},
		{"te chunked not last", head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked, gzip"), Limits{}, 400, ReasonSmuggling},
		{"te chunked twice", head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked, chunked"), Limits{}, 400, ReasonSmuggling},
		{"te lookalike", head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: xchunked"), Limits{}, 400, ReasonSmuggling},
		{"te empty element", head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: , chunked"), Limits{}, 400, ReasonSmuggling},
		{"te on http/1.0", head("POST / HTTP/1.0", "Transfer-Encoding: chunked"), Limits{}, 400, ReasonSmuggling},
		{"te on upgrade", ws(nil, "Transfer-Encoding: chunked"), Limits{}, 400, ReasonSmuggling},
		{"body on upgrade", ws(nil, "Content-Length: 5"), Limits{}, 400, ReasonSmuggling},

		// Host and Origin.
		{"no host", head("GET / HTTP/1.1", "X: a"), Limits{}, 400, ReasonHost},
		{"two hosts", head("GET / HTTP/1.1", "Host: a", "Host: a"), Limits{}, 400, ReasonHost},
		{"host with space", head("GET / HTTP/1.1", "Host: a b"), Limits{}, 400, ReasonHost},
		{"host with userinfo", head("GET / HTTP/1.1", "Host: u@a"), Limits{}, 400, ReasonHost},
		{"host with path", head("GET / HTTP/1.1", "Host: a/b"), Limits{}, 400, ReasonHost},
		{"host bad port", head("GET / HTTP/1.1", "Host: a:8o"), Limits{}, 400, ReasonHost},
		{"host percent-encoded", head("GET / HTTP/1.1", "Host: %61"), Limits{}, 400, ReasonHost},
		{"host two colons", head("GET / HTTP/1.1", "Host: a:1:2"), Limits{}, 400, ReasonHost},
		{"host bad ipv6", head("GET / HTTP/1.1", "Host: [::1"), Limits{}, 400, ReasonHost},
		{"two origins", ws(nil, "Origin: https://evil.example"), Limits{}, 400, ReasonMalformed},

		// WebSocket.
		{"upgrade with post", ws(map[int]string{0: "POST /ws HTTP/1.1"}), Limits{}, 400, ReasonBadUpgrade},
		{"upgrade on http/1.0", ws(map[int]string{0: "GET /ws HTTP/1.0"}), Limits{}, 400, ReasonBadUpgrade},
		{"upgrade without connection", ws(map[int]string{3: ""}), Limits{}, 400, ReasonBadUpgrade},
		{"upgrade connection keep-alive", ws(map[int]string{3: "Connection: keep-alive"}), Limits{}, 400, ReasonBadUpgrade},
		{"upgrade connection lookalike", ws(map[int]string{3: "Connection: upgraded"}), Limits{}, 400, ReasonBadUpgrade},
		{"upgrade offers h2c too", ws(map[int]string{2: "Upgrade: websocket, h2c"}), Limits{}, 400, ReasonBadUpgrade},
		{"second upgrade header", ws(nil, "Upgrade: h2c"), Limits{}, 400, ReasonBadUpgrade},
		{"connection lists xff", ws(map[int]string{3: "Connection: Upgrade, X-Forwarded-For"}), Limits{}, 400, ReasonBadUpgrade},
		{"connection lists key", ws(nil, "Connection: Sec-WebSocket-Key"), Limits{}, 400, ReasonBadUpgrade},
		{"version 8", ws(map[int]string{5: "Sec-WebSocket-Version: 8"}), Limits{}, 426, ReasonBadVersion},
		{"version list", ws(map[int]string{5: "Sec-WebSocket-Version: 13, 8"}), Limits{}, 426, ReasonBadVersion},
		{"no version", ws(map[int]string{5: ""}), Limits{}, 426, ReasonBadVersion},
		{"two versions", ws(nil, "Sec-WebSocket-Version: 13"), Limits{}, 400, ReasonBadUpgrade},
		{"no key", ws(map[int]string{4: ""}), Limits{}, 400, ReasonBadUpgrade},
		{"two keys", ws(nil, "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="), Limits{}, 400, ReasonBadUpgrade},
		{"short key", ws(map[int]string{4: "Sec-WebSocket-Key: dGhlIHNhbXBsZQ=="}), Limits{}, 400, ReasonBadUpgrade},
		{"key not base64", ws(map[int]string{4: "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j*Q=="}), Limits{}, 400, ReasonBadUpgrade},
		{"key without padding", ws(map[int]string{4: "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ"}), Limits{}, 400, ReasonBadUpgrade},
		{"key url alphabet", ws(map[int]string{4: "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j_Q=="}), Limits{}, 400, ReasonBadUpgrade},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := ParseRequest(tt.head, tt.lim)
			var he *Error
			if !errors.As(err, &he) {
				t.Fatalf("ParseRequest(%q) = %+v, %v; want *Error", tt.head, r, err)
			}
			if he.Status != tt.status || he.Reason != tt.reason {
				t.Errorf("got %d %s (%v), want %d %s", he.Status, he.Reason, err, tt.status, tt.reason)
			}
		})
	}
}

// TestValidKeyMatchesBase64 checks the hand-written key check against
// encoding/base64's (non-strict) decoder for every byte in every position.
func TestValidKeyMatchesBase64(t *testing.T) {
	base := []byte("dGhlIHNhbXBsZSBub25jZQ==")
	for i := range base {
		for c := 0; c < 256; c++ {
			k := bytes.Clone(base)
			k[i] = byte(c)
			dec, err := base64.StdEncoding.DecodeString(string(k))
			want := err == nil && len(dec) == 16 && !bytes.ContainsAny(k, "\r\n")
			if got := validKey(string(k)); got != want {
				t.Errorf("validKey(%q) = %v, want %v", k, got, want)
			}
		}
	}
}

func TestLimitsDefaults(t *testing.T) {
	got := Limits{MaxHeaders: -1}.withDefaults()
	want := Limits{DefaultMaxHeadBytes, DefaultMaxHeaders, DefaultMaxLineBytes}
	if got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}
	if got := (Limits{1, 2, 3}).withDefaults(); got != (Limits{1, 2, 3}) {
		t.Errorf("explicit limits changed: %+v", got)
	}
}

func TestErrorString(t *testing.T) {
	if got := (&Error{400, ReasonSmuggling, "bare LF"}).Error(); got != "handshake: 400 smuggling: bare LF" {
		t.Errorf("got %q", got)
	}
	if got := (&Error{Status: 431, Reason: ReasonHeadTooLarge}).Error(); got != "handshake: 431 head_too_large" {
		t.Errorf("got %q", got)
	}
}
