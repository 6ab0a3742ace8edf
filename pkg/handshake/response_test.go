package handshake

import (
	"bytes"
	"errors"
	"strconv"
	"strings"
	"testing"
)

func TestParseResponse(t *testing.T) {
	tests := []struct {
		name    string
		head    []byte
		status  int
		reason  string
		upgrade bool
	}{
		{"websocket", head("HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), 101, "Switching Protocols", true},
		{"websocket, case and lists", head("HTTP/1.1 101 Switching Protocols", "upgrade: WebSocket", "connection: keep-alive, upgrade"), 101, "Switching Protocols", true},
		{"101 to h2c", head("HTTP/1.1 101 Switching Protocols", "Upgrade: h2c", "Connection: Upgrade"), 101, "Switching Protocols", false},
		{"101 to two protocols", head("HTTP/1.1 101 Switching Protocols", "Upgrade: websocket, h2c", "Connection: Upgrade"), 101, "Switching Protocols", false},
		{"101 without connection", head("HTTP/1.1 101 Switching Protocols", "Upgrade: websocket"), 101, "Switching Protocols", false},
		{"200 with upgrade headers", head("HTTP/1.1 200 OK", "Upgrade: websocket", "Connection: Upgrade", "Content-Length: 0"), 200, "OK", false},
		{"no reason phrase", head("HTTP/1.1 404"), 404, "", false},
		{"empty reason phrase", head("HTTP/1.1 404 "), 404, "", false},
		{"http/1.0", head("HTTP/1.0 503 Service Unavailable", "Retry-After: 1"), 503, "Service Unavailable", false},
		{"chunked", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"), 200, "OK", false},
		{"obs-text reason", head("HTTP/1.1 200 Tr\xe8s bien"), 200, "Tr\xe8s bien", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := ParseResponse(tt.head, Limits{})
			if err != nil {
				t.Fatal(err)
			}
			if r.Status != tt.status || r.Reason != tt.reason || r.Upgrade != tt.upgrade {
				t.Errorf("got %d %q upgrade %v, want %d %q %v", r.Status, r.Reason, r.Upgrade, tt.status, tt.reason, tt.upgrade)
			}
		})
	}
}

func TestParseResponseRefuses(t *testing.T) {
	tests := []struct {
		name   string
		head   []byte
		lim    Limits
		reason string
	}{
		{"short code", head("HTTP/1.1 20 OK"), Limits{}, ReasonMalformed},
		{"code with letters", head("HTTP/1.1 2x0 OK"), Limits{}, ReasonMalformed},
		{"code 0xx", head("HTTP/1.1 099 Hm"), Limits{}, ReasonMalformed},
		{"code too long", head("HTTP/1.1 2000 OK"), Limits{}, ReasonMalformed},
		{"no code", head("HTTP/1.1"), Limits{}, ReasonMalformed},
		{"http/2", head("HTTP/2.0 200 OK"), Limits{}, ReasonHTTPVersion},
		{"junk version", head("ICY 200 OK"), Limits{}, ReasonMalformed},
		{"control in reason", head("HTTP/1.1 200 O\x01K"), Limits{}, ReasonMalformed},
		{"bare LF", []byte("HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n"), Limits{}, ReasonSmuggling},
		{"obs-fold", head("HTTP/1.1 200 OK", "X: a", " b"), Limits{}, ReasonSmuggling},
		{"space before colon", head("HTTP/1.1 200 OK", "Content-Length : 0"), Limits{}, ReasonSmuggling},
		{"duplicate content-length", head("HTTP/1.1 200 OK", "Content-Length: 0", "Content-Length: 0"), Limits{}, ReasonSmuggling},
		{"bad content-length", head("HTTP/1.1 200 OK", "Content-Length: 0x10"), Limits{}, ReasonSmuggling},
		{"te and cl", head("HTTP/1.1 200 OK", "Content-Length: 0", "Transfer-Encoding: chunked"), Limits{}, ReasonSmuggling},
		{"too many headers", head("HTTP/1.1 200 OK", "A: 1", "B: 2"), Limits{MaxHeaders: 1}, ReasonTooManyHeaders},
		{"too large", head("HTTP/1.1 200 OK", "A: "+strings.Repeat("a", 100)), Limits{MaxHeadBytes: 64}, ReasonHeadTooLarge},
		{"line too long", head("HTTP/1.1 200 OK", "A: "+strings.Repeat("a", 100)), Limits{MaxLineBytes: 64}, ReasonLineTooLong},
		{"not ended", []byte("HTTP/1.1 200 OK\r\n"), Limits{}, ReasonMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseResponse(tt.head, tt.lim)
			var he *Error
			if !errors.As(err, &he) || he.Status != 502 || he.Reason != tt.reason {
				t.Errorf("got %v, want 502 %s", err, tt.reason)
			}
		})
	}
}

func TestWriteError(t *testing.T) {
	var b bytes.Buffer
	if err := WriteError(&b, 400); err != nil {
		t.Fatal(err)
	}
	want := "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 12\r\nConnection: close\r\n\r\nBad Request\n"
	if b.String() != want {
		t.Errorf("got %q\nwant %q", b.String(), want)
	}

	b.Reset()
	if err := WriteError(&b, 426); err != nil {
		t.Fatal(err)
	}
	want = "HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 17\r\n" +
		"Connection: Upgrade, close\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\nUpgrade Required\n"
	if b.String() != want {
		t.Errorf("got %q\nwant %q", b.String(), want)
	}

	// Every status the balancer uses parses back, with the body its
	// Content-Length announces.
	for _, status := range []int{400, 403, 404, 405, 408, 413, 414, 418, 421, 426, 429, 431, 500, 501, 502, 503, 504, 505, 599} {
		b.Reset()
		if err := WriteError(&b, status, Header{"Retry-After", "1"}, Header{"X-Request-Id", "a\tb"}); err != nil {
			t.Fatal(err)
		}
		h, rest, err := ReadHead(&b, Limits{})
		if err != nil {
			t.Fatalf("%d: %v", status, err)
		}
		r, err := ParseResponse(h, Limits{})
		if err != nil {
			t.Fatalf("%d: %q: %v", status, h, err)
		}
		var cl string
		for _, f := range r.Headers {
			if f.Name == "Content-Length" {
				cl = f.Value
			}
		}
		if r.Status != status || r.Reason != StatusText(status) || cl != strconv.Itoa(len(rest)) || string(rest) != StatusText(status)+"\n" {
			t.Errorf("%d: got %q + %q", status, h, rest)
		}
		if r.Headers[3] != (Header{"Retry-After", "1"}) && r.Headers[5] != (Header{"Retry-After", "1"}) {
			t.Errorf("%d: extra header missing: %q", status, r.Headers)
		}
	}
}

type shortWriter struct{}

func (shortWriter) Write(p []byte) (int, error) { return len(p) / 2, nil }

func TestWriteErrorRefuses(t *testing.T) {
	for _, tt := range []struct {
		status int
		extra  []Header
	}{
		{200, nil},
		{101, nil},
		{600, nil},
		{503, []Header{{"Retry-After", "1\r\nSet-Cookie: x=1"}}},
		{503, []Header{{"Bad Name", "1"}}},
		{503, []Header{{"", "1"}}},
		{400, []Header{{"content-length", "0"}}},
		{400, []Header{{"Connection", "keep-alive"}}},
	} {
		var b bytes.Buffer
		if err := WriteError(&b, tt.status, tt.extra...); err == nil || b.Len() != 0 {
			t.Errorf("WriteError(%d, %q) = %v, wrote %q", tt.status, tt.extra, err, b.String())
		}
	}
	if err := WriteError(shortWriter{}, 400); err == nil {
		t.Error("short write not reported")
	}
}
