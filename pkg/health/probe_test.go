package health

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestParseExpect(t *testing.T) {
	for _, tc := range []struct {
		in       []string
		pass     []int
		fail     []int
		bad      bool
		wantText string
	}{
		{nil, []int{200, 204, 301, 399}, []int{101, 404, 500}, false, "http_2xx, http_3xx"},
		{[]string{"http_2xx"}, []int{200, 299}, []int{302, 500}, false, "http_2xx"},
		{[]string{"http_2xx", "http_4xx"}, []int{200, 404}, []int{302, 500}, false, "http_2xx, http_4xx"},
		{[]string{"http_6xx"}, nil, nil, true, ""},
		{[]string{"2xx"}, nil, nil, true, ""},
	} {
		m, err := parseExpect(tc.in)
		if (err != nil) != tc.bad {
			t.Errorf("%v: err %v", tc.in, err)
			continue
		}
		for _, s := range tc.pass {
			if !m.has(s) {
				t.Errorf("%v: %d should pass", tc.in, s)
			}
		}
		for _, s := range tc.fail {
			if m.has(s) {
				t.Errorf("%v: %d should fail", tc.in, s)
			}
		}
		if !tc.bad && m.String() != tc.wantText {
			t.Errorf("%v: String() = %q", tc.in, m.String())
		}
	}
}

// TestAcceptKey uses the example of RFC 6455 §1.3.
func TestAcceptKey(t *testing.T) {
	if got := acceptKey("dGhlIHNhbXBsZSBub25jZQ=="); got != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" {
		t.Errorf("acceptKey = %q", got)
	}
}

// rawServer answers every connection with respond(request) and closes it.
// The request heads it saw are sent on reqs.
func rawServer(t *testing.T, respond func(req *http.Request) string) (string, chan *http.Request) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	reqs := make(chan *http.Request, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(2 * time.Second))
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				select {
				case reqs <- req:
				default:
				}
				resp := respond(req)
				if resp == "" {
					return // hang up without an answer
				}
				io.WriteString(c, resp)
				if strings.HasPrefix(resp, "HTTP/1.1 101") {
					// Read the client's close frame (2+4 bytes of header
					// and mask, then the payload), then hang up as a
					// server does after answering it.
					hdr := make([]byte, 2)
					if _, err := io.ReadFull(c, hdr); err == nil {
						io.CopyN(io.Discard, c, 4+int64(hdr[1]&0x7f))
					}
				}
			}()
		}
	}()
	return ln.Addr().String(), reqs
}

func TestWebSocketCheck(t *testing.T) {
	good := func(r *http.Request) string {
		return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " +
			acceptKey(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n"
	}
	for _, tc := range []struct {
		name    string
		respond func(*http.Request) string
		errHas  string
	}{
		{"good", good, ""},
		{"connection list", func(r *http.Request) string {
			return strings.Replace(good(r), "Connection: Upgrade", "Connection: keep-alive, upgrade", 1)
		}, ""},
		{"wrong accept", func(r *http.Request) string {
			return strings.Replace(good(r), acceptKey(r.Header.Get("Sec-WebSocket-Key")), acceptKey("AAAAAAAAAAAAAAAAAAAAAA=="), 1)
		}, "Sec-WebSocket-Accept"},
		{"no upgrade header", func(r *http.Request) string { return strings.Replace(good(r), "Upgrade: websocket\r\n", "", 1) }, "Upgrade"},
		{"not 101", func(*http.Request) string { return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" }, "status 200"},
		{"hang up", func(*http.Request) string { return "" }, "connection closed"},
		{"huge head", func(*http.Request) string {
			return "HTTP/1.1 101 Switching Protocols\r\nX: " + strings.Repeat("a", 2*maxResponseHead) + "\r\n\r\n"
		}, "read response"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, reqs := rawServer(t, tc.respond)
			p := &prober{typ: CheckWebSocket, timeout: time.Second, path: "/ws?x=1", host: "chat.example.com"}
			err := p.probe(t.Context(), addr)
			switch {
			case tc.errHas == "" && err != nil:
				t.Fatalf("check failed: %v", err)
			case tc.errHas != "" && (err == nil || !strings.Contains(err.Error(), tc.errHas)):
				t.Fatalf("err = %v, want one mentioning %q", err, tc.errHas)
			}
			r := <-reqs
			if r.Host != "chat.example.com" || r.URL.String() != "/ws?x=1" || r.Header.Get("Sec-WebSocket-Version") != "13" ||
				len(r.Header.Get("Sec-WebSocket-Key")) != 24 {
				t.Errorf("request: host %q target %q headers %v", r.Host, r.URL, r.Header)
			}
		})
	}
}

// TestWebSocketKeysRandom: every check sends a fresh key.
func TestWebSocketKeysRandom(t *testing.T) {
	addr, reqs := rawServer(t, func(*http.Request) string { return "" })
	p := &prober{typ: CheckWebSocket, timeout: time.Second, path: "/"}
	seen := map[string]bool{}
	for range 5 {
		p.probe(t.Context(), addr)
		seen[(<-reqs).Header.Get("Sec-WebSocket-Key")] = true
	}
	if len(seen) != 5 {
		t.Errorf("%d distinct keys in 5 checks", len(seen))
	}
}

func TestHTTPCheck(t *testing.T) {
	for _, tc := range []struct {
		status int
		expect []string
		ok     bool
	}{
		{200, nil, true},
		{204, []string{"http_2xx"}, true},
		{302, []string{"http_2xx"}, false},
		{302, nil, true},
		{404, nil, false},
		{503, nil, false},
		{503, []string{"http_5xx"}, true},
	} {
		addr, reqs := rawServer(t, func(*http.Request) string {
			return "HTTP/1.1 " + itoa(tc.status) + " X\r\nContent-Length: 0\r\n\r\n"
		})
		m, _ := parseExpect(tc.expect)
		p := &prober{typ: CheckHTTP, timeout: time.Second, path: "/healthz", expect: m}
		err := p.probe(t.Context(), addr)
		if (err == nil) != tc.ok {
			t.Errorf("status %d expect %v: err %v", tc.status, tc.expect, err)
		}
		if r := <-reqs; r.URL.Path != "/healthz" || r.Host != addr || r.Header.Get("User-Agent") != userAgent {
			t.Errorf("request %s %s host %q ua %q", r.Method, r.URL, r.Host, r.Header.Get("User-Agent"))
		}
	}
}

func itoa(n int) string {
	return string([]byte{byte('0' + n/100), byte('0' + n/10%10), byte('0' + n%10)})
}

// TestProbeTimeout: a backend that accepts and never answers fails the
// check at the timeout, not later.
func TestProbeTimeout(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close() // never accepts: the kernel completes connects from the backlog
	lg := watchLag(t)
	for _, typ := range []CheckType{CheckHTTP, CheckWebSocket} {
		lg.reset()
		p := &prober{typ: typ, timeout: 30 * time.Millisecond, path: "/", expect: 1 << 2}
		t0 := time.Now()
		err := p.probe(t.Context(), ln.Addr().String())
		took := time.Since(t0)
		var te interface{ Timeout() bool }
		if err == nil || !errors.As(err, &te) || !te.Timeout() {
			t.Errorf("%s: err %v, want a timeout", typ, err)
		}
		if took > lg.allow(30*time.Millisecond, 2) {
			t.Errorf("%s: took %s with a 30ms timeout", typ, took)
		}
	}
	// A TCP check passes: the kernel accepted.
	p := &prober{typ: CheckTCP, timeout: 30 * time.Millisecond}
	if err := p.probe(t.Context(), ln.Addr().String()); err != nil {
		t.Errorf("tcp check of a listening socket: %v", err)
	}
}

// TestCloseFrame: a client close frame is final, opcode 8, masked, and
// carries the code and reason.
func TestCloseFrame(t *testing.T) {
	f := closeFrame(1001, "health check")
	if f[0] != 0x88 || f[1]&0x80 == 0 || int(f[1]&0x7f) != 2+len("health check") || len(f) != 2+4+int(f[1]&0x7f) {
		t.Fatalf("frame header % x", f[:2])
	}
	mask, payload := f[2:6], f[6:]
	for i := range payload {
		payload[i] ^= mask[i%4]
	}
	if code := int(payload[0])<<8 | int(payload[1]); code != 1001 || string(payload[2:]) != "health check" {
		t.Errorf("payload code %d reason %q", code, payload[2:])
	}
}
