package handshake

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

// FuzzClientHello checks the passthrough parser: it never panics, never
// reads past its limit, gives the same answer however the bytes are split
// into reads, and — the property routing depends on — never reads a
// different server name than crypto/tls does from the same bytes. The seed
// corpus is in testdata/fuzz/FuzzClientHello.
func FuzzClientHello(f *testing.F) {
	f.Add(records(helloBody(sniExt("seed.example"))), uint8(0), uint16(0))
	f.Fuzz(func(t *testing.T, data []byte, chunk uint8, maxBytes uint16) {
		lim := 512 + int(maxBytes%(32<<10))
		cr := &countingReader{r: &chunkReader{data, int(chunk%32) + 1}}
		h, raw, err := ReadClientHello(cr, lim)
		if cr.n > lim {
			t.Fatalf("read %d bytes, limit %d", cr.n, lim)
		}
		if !bytes.HasPrefix(data, raw) {
			t.Fatalf("returned bytes are not a prefix of the input")
		}
		h1, err1 := ParseClientHello(data, lim)
		if (err == nil) != (err1 == nil) || err != nil && errorKind(err) != errorKind(err1) {
			t.Fatalf("chunked read: %v; whole: %v", err, err1)
		}
		if err != nil {
			if errorKind(err) == "other" && !errors.Is(err, io.ErrUnexpectedEOF) && err != io.EOF {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		if h.ServerName != h1.ServerName || h.Len != h1.Len || h.Len > len(raw) {
			t.Fatalf("chunked %+v, whole %+v", h, h1)
		}
		if h.ServerName != strings.ToLower(h.ServerName) || (h.ServerName != "" && !validHostName([]byte(h.ServerName))) {
			t.Fatalf("server name %q", h.ServerName)
		}
		if goName, ok := goServerName(data[:h.Len]); ok && !strings.EqualFold(goName, h.ServerName) {
			t.Fatalf("crypto/tls reads server name %q, we read %q", goName, h.ServerName)
		}
	})
}

func errorKind(err error) string {
	for _, e := range []error{ErrNotTLS, ErrMalformedHello, ErrHelloTooLarge} {
		if errors.Is(err, e) {
			return e.Error()
		}
	}
	return "other"
}

var errStop = errors.New("stop")

// goServerName runs a crypto/tls server handshake on data and returns the
// server name it parsed, if it got as far as parsing a ClientHello.
func goServerName(data []byte) (string, bool) {
	var name string
	var got bool
	cfg := &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		name, got = h.ServerName, true
		return nil, errStop
	}}
	rc := &recordConn{}
	rc.in.Reset(data)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = tls.Server(rc, cfg).HandshakeContext(ctx)
	return name, got
}

// TestClientHelloAgreesWithGo runs the differential check on the hellos
// crypto/tls itself sends.
func TestClientHelloAgreesWithGo(t *testing.T) {
	for _, sni := range []string{"a.example", "UPPER.example.com", "x-y_z.example", ""} {
		raw := goHello(t, &tls.Config{ServerName: sni, InsecureSkipVerify: sni == ""})
		h, err := ParseClientHello(raw, 16<<10)
		if err != nil {
			t.Fatal(err)
		}
		name, ok := goServerName(raw)
		if !ok || !strings.EqualFold(name, h.ServerName) {
			t.Fatalf("crypto/tls %q (%v), we %q", name, ok, h.ServerName)
		}
	}
}
