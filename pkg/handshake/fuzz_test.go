package handshake

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"
)

// The seed corpus lives in testdata/fuzz/<FuzzName>/; the f.Add seeds
// below are the few that need no file.

func FuzzParseRequest(f *testing.F) {
	f.Add(ws(nil))
	f.Add(head("GET / HTTP/1.1", "Host: a"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ParseRequest(data, Limits{})
		if err != nil {
			var he *Error
			if !errors.As(err, &he) || he.Reason == "" {
				t.Fatalf("error %v is not an *Error with a reason", err)
			}
			switch he.Status {
			case 400, 426, 431, 501, 505:
			default:
				t.Fatalf("unexpected status in %v", err)
			}
			return
		}
		// What ParseRequest accepts, ReadHead returns whole, and alone.
		h, rest, err := ReadHead(bytes.NewReader(data), Limits{})
		if err != nil || !bytes.Equal(h, data) || rest != nil {
			t.Fatalf("ParseRequest accepts %q but ReadHead gives %q, %q, %v", data, h, rest, err)
		}
		if r.Upgrade && (r.Method != "GET" || r.Proto != "HTTP/1.1") {
			t.Fatalf("upgrade with %s %s", r.Method, r.Proto)
		}
		if lowerASCII(r.Host) != r.Host {
			t.Fatalf("Host %q not lower case", r.Host)
		}
		_, _, _ = r.Origin(), r.Cookie("session"), r.Query("token")
		checkRewriteRoundTrip(t, r, Limits{})
		// A different parser (a Go backend) reads what we accepted, and
		// what we send, the same way.
		fw := Forwarding{ClientAddr: netip.MustParseAddrPort("192.0.2.1:1"), Proto: "https", Headers: true, Close: !r.Upgrade}
		checkGoReadsRequest(t, data, r)
		checkGoReadsRequest(t, r.AppendRewritten(nil, fw), r)
	})
}

func FuzzReadHead(f *testing.F) {
	f.Add(append(ws(nil), "\x81\x00"...), uint8(1), uint16(0), uint16(0))
	f.Fuzz(func(t *testing.T, data []byte, chunk uint8, maxHead, maxLine uint16) {
		lim := Limits{MaxHeadBytes: int(maxHead % 4096), MaxLineBytes: int(maxLine % 1024)}
		cr := &countingReader{r: &chunkReader{data, int(chunk%64) + 1}}
		h, rest, err := ReadHead(cr, lim)
		if max := lim.withDefaults().MaxHeadBytes; cr.n > max {
			t.Fatalf("read %d bytes, limit %d", cr.n, max)
		}
		// The split of the reads must not change the outcome.
		h1, _, err1 := ReadHead(bytes.NewReader(data), lim)
		if !bytes.Equal(h, h1) || !sameError(err, err1) {
			t.Fatalf("chunks of %d: %q, %v; one read: %q, %v", chunk%64+1, h, err, h1, err1)
		}
		if err != nil {
			return
		}
		if got := append(bytes.Clone(h), rest...); !bytes.HasPrefix(data, got) {
			t.Fatalf("head+rest %q is not a prefix of the input", got)
		}
		if len(h) > lim.withDefaults().MaxHeadBytes {
			t.Fatalf("head of %d bytes", len(h))
		}
		if i := bytes.Index(h, crlfcrlf); i != len(h)-4 {
			t.Fatalf("head %q: first CRLFCRLF at %d", h, i)
		}
		if bytes.Count(h, []byte("\n")) != bytes.Count(h, []byte("\r\n")) || bytes.Count(h, []byte("\r")) != bytes.Count(h, []byte("\r\n")) {
			t.Fatalf("head %q has a bare CR or LF", h)
		}
	})
}

// checkGoReadsRequest checks that net/http's parser accepts a head this
// package accepted and agrees on the request line, Host and framing. Only
// "Transfer-Encoding: chunked" is compared; net/http refuses other codings
// outright (501), which is a refusal, not a disagreement.
func checkGoReadsRequest(t *testing.T, data []byte, r *Request) {
	t.Helper()
	te := r.Header("Transfer-Encoding")
	if te != "" && !strings.EqualFold(te, "chunked") {
		return
	}
	req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(data)))
	if err != nil {
		t.Fatalf("net/http refuses %q: %v", data, err)
	}
	if req.Method != r.Method || req.RequestURI != r.Target || !strings.EqualFold(req.Host, r.Host) {
		t.Fatalf("net/http reads %q as %q %q host %q; we read %q %q host %q", data, req.Method, req.RequestURI, req.Host, r.Method, r.Target, r.Host)
	}
	wantCL := int64(0)
	switch cl := r.Header("Content-Length"); {
	case te != "":
		wantCL = -1
	case cl != "":
		wantCL, _ = strconv.ParseInt(cl, 10, 64)
	}
	if req.ContentLength != wantCL {
		t.Fatalf("net/http reads %q with ContentLength %d, want %d", data, req.ContentLength, wantCL)
	}
}

func sameError(a, b error) bool {
	var ea, eb *Error
	switch {
	case a == nil || b == nil:
		return a == b
	case errors.As(a, &ea) && errors.As(b, &eb):
		return ea.Status == eb.Status && ea.Reason == eb.Reason
	}
	return errors.Is(a, io.EOF) == errors.Is(b, io.EOF) && errors.Is(a, io.ErrUnexpectedEOF) == errors.Is(b, io.ErrUnexpectedEOF)
}

func FuzzParseResponse(f *testing.F) {
	f.Add(head("HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ParseResponse(data, Limits{})
		if err != nil {
			var he *Error
			if !errors.As(err, &he) || he.Status != 502 || he.Reason == "" {
				t.Fatalf("error %v is not a 502 *Error", err)
			}
			return
		}
		if r.Status < 100 || r.Status > 999 || r.Upgrade && r.Status != 101 {
			t.Fatalf("status %d upgrade %v", r.Status, r.Upgrade)
		}
		if r.Proto != "HTTP/1.1" && r.Proto != "HTTP/1.0" {
			t.Fatalf("proto %q", r.Proto)
		}
		h, rest, err := ReadHead(bytes.NewReader(data), Limits{})
		if err != nil || !bytes.Equal(h, data) || rest != nil {
			t.Fatalf("ParseResponse accepts %q but ReadHead gives %q, %q, %v", data, h, rest, err)
		}
		for _, f := range r.Headers {
			if nameIs(f.Name, "Transfer-Encoding") {
				return // net/http refuses codings it does not implement
			}
		}
		resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(data)), nil)
		if err != nil {
			t.Fatalf("net/http refuses %q: %v", data, err)
		}
		if resp.StatusCode != r.Status || resp.Proto != r.Proto {
			t.Fatalf("net/http reads %q as %s %d", data, resp.Proto, resp.StatusCode)
		}
	})
}
