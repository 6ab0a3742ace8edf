package handshake

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"
)

// goHello returns the ClientHello records crypto/tls sends with cfg.
func goHello(tb testing.TB, cfg *tls.Config) []byte {
	tb.Helper()
	rc := &recordConn{}
	c := tls.Client(rc, cfg)
	c.SetDeadline(time.Now().Add(time.Second))
	_ = c.Handshake() // fails: nobody answers
	if rc.out.Len() == 0 {
		tb.Fatal("crypto/tls wrote no ClientHello")
	}
	return rc.out.Bytes()
}

// recordConn records writes; reads see in (then EOF).
type recordConn struct {
	in  bytes.Reader
	out bytes.Buffer
}

func (c *recordConn) Read(b []byte) (int, error)       { return c.in.Read(b) }
func (c *recordConn) Write(b []byte) (int, error)      { return c.out.Write(b) }
func (c *recordConn) Close() error                     { return nil }
func (c *recordConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *recordConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *recordConn) SetDeadline(time.Time) error      { return nil }
func (c *recordConn) SetReadDeadline(time.Time) error  { return nil }
func (c *recordConn) SetWriteDeadline(time.Time) error { return nil }

// reframe splits the handshake message carried by records into records
// of at most size bytes each.
func reframe(tb testing.TB, records []byte, size int) []byte {
	tb.Helper()
	var msg []byte
	for r := records; len(r) > 0; {
		n := int(r[3])<<8 | int(r[4])
		msg = append(msg, r[5:5+n]...)
		r = r[5+n:]
	}
	var out []byte
	for len(msg) > 0 {
		n := min(size, len(msg))
		out = append(out, recordTypeHS, 3, 1, byte(n>>8), byte(n))
		out = append(out, msg[:n]...)
		msg = msg[n:]
	}
	return out
}

// helloBody builds a ClientHello body with the given extensions, each
// already encoded as type, length, data.
func helloBody(exts ...[]byte) []byte {
	b := []byte{3, 3}
	b = append(b, make([]byte, 32)...) // random
	b = append(b, 0)                   // session id
	b = append(b, 0, 2, 0x13, 0x01)    // one cipher suite
	b = append(b, 1, 0)                // null compression
	if exts != nil {
		var e []byte
		for _, x := range exts {
			e = append(e, x...)
		}
		b = append(b, byte(len(e)>>8), byte(len(e)))
		b = append(b, e...)
	}
	return b
}

// records wraps a handshake body as a ClientHello in one record.
func records(body []byte) []byte {
	msg := append([]byte{hsTypeClientHello, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
	return append([]byte{recordTypeHS, 3, 1, byte(len(msg) >> 8), byte(len(msg))}, msg...)
}

func ext(typ uint16, data []byte) []byte {
	return append([]byte{byte(typ >> 8), byte(typ), byte(len(data) >> 8), byte(len(data))}, data...)
}

// sniExt encodes a server_name extension with host_name entries.
func sniExt(names ...string) []byte {
	var list []byte
	for _, n := range names {
		list = append(list, 0, byte(len(n)>>8), byte(len(n)))
		list = append(list, n...)
	}
	return ext(extServerName, append([]byte{byte(len(list) >> 8), byte(len(list))}, list...))
}

func TestClientHelloFromGo(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  *tls.Config
		sni  string
		max  uint16
	}{
		{"sni", &tls.Config{ServerName: "Chat.Example.COM", NextProtos: []string{"http/1.1"}}, "chat.example.com", tls.VersionTLS13},
		{"no sni", &tls.Config{InsecureSkipVerify: true}, "", tls.VersionTLS13},
		{"ip literal is not sent", &tls.Config{ServerName: "192.0.2.1"}, "", tls.VersionTLS13},
		{"tls 1.2 only", &tls.Config{ServerName: "a.b", MaxVersion: tls.VersionTLS12}, "a.b", tls.VersionTLS12},
		{"tls 1.0 only", &tls.Config{ServerName: "old.example", MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11}, "old.example", tls.VersionTLS11},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := goHello(t, tc.cfg)
			h, err := ParseClientHello(raw, 16<<10)
			if err != nil {
				t.Fatal(err)
			}
			if h.ServerName != tc.sni || h.MaxVersion() != tc.max || h.Len != len(raw) {
				t.Fatalf("got sni %q max %#x len %d, want %q %#x %d", h.ServerName, h.MaxVersion(), h.Len, tc.sni, tc.max, len(raw))
			}
			if !slices.Equal(h.ALPN, tc.cfg.NextProtos) {
				t.Fatalf("alpn %q, want %q", h.ALPN, tc.cfg.NextProtos)
			}
		})
	}
}

// TestReadClientHelloSplit: a hello split over many records, and records
// split into 1-byte reads, give the same answer, and everything read is
// returned for forwarding.
func TestReadClientHelloSplit(t *testing.T) {
	raw := goHello(t, &tls.Config{ServerName: "split.example.com"})
	early := []byte("\x17\x03\x03\x00\x01x") // bytes behind the hello
	for _, recSize := range []int{0, 1, 7, 100, 512} {
		in := raw
		if recSize > 0 {
			in = reframe(t, raw, recSize)
		}
		for _, chunk := range []int{1, 3, 1000, 1 << 20} {
			data := append(slices.Clone(in), early...)
			cr := &countingReader{r: &chunkReader{data, chunk}}
			h, got, err := ReadClientHello(cr, 64<<10)
			if err != nil {
				t.Fatalf("records of %d, reads of %d: %v", recSize, chunk, err)
			}
			if h.ServerName != "split.example.com" || h.Len != len(in) {
				t.Fatalf("records of %d, reads of %d: sni %q len %d (want %d)", recSize, chunk, h.ServerName, h.Len, len(in))
			}
			if !bytes.HasPrefix(data, got) || len(got) < len(in) {
				t.Fatalf("returned %d bytes that are not the %d-byte prefix read", len(got), len(in))
			}
			if chunk == 1 && len(got) != len(in) {
				t.Fatalf("read %d bytes one at a time, hello is %d: read past it", len(got), len(in))
			}
		}
	}
}

// stallReader returns data, then blocks (returns an error after a while:
// a test that waits on it failed).
type stallReader struct {
	data []byte
	done bool
}

func (r *stallReader) Read(b []byte) (int, error) {
	if !r.done {
		r.done = true
		return copy(b, r.data), nil
	}
	time.Sleep(2 * time.Second)
	return 0, errors.New("stalled: read again after the answer was known")
}

func TestReadClientHelloRefusesFast(t *testing.T) {
	for _, tc := range []struct {
		name string
		data string
		want error
	}{
		{"http", "G", ErrNotTLS},
		{"sslv2", "\x80", ErrNotTLS},
		{"alert", "\x15\x03\x01\x00\x02", ErrNotTLS},
		{"version", "\x16\x02\x00\x00\x01", ErrNotTLS},
		{"empty record", "\x16\x03\x01\x00\x00", ErrMalformedHello},
		{"huge record", "\x16\x03\x01\x40\x01", ErrMalformedHello},
		{"server hello", "\x16\x03\x01\x00\x04\x02\x00\x00\x00", ErrMalformedHello},
		{"hello over limit", "\x16\x03\x01\x00\x04\x01\x01\x00\x00", ErrHelloTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			_, raw, err := ReadClientHello(&stallReader{data: []byte(tc.data)}, 4096)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
			if string(raw) != tc.data {
				t.Fatalf("raw %q, want %q", raw, tc.data)
			}
			if time.Since(start) > time.Second {
				t.Fatal("waited for more bytes")
			}
		})
	}
}

func TestReadClientHelloLimit(t *testing.T) {
	// A real hello padded beyond the limit: refused, never read past it.
	pad := strings.Repeat("x", 3000)
	body := helloBody(sniExt("a.example"), ext(21, []byte(pad)))
	data := records(body)
	for _, chunk := range []int{1, 100, 1 << 20} {
		cr := &countingReader{r: &chunkReader{data, chunk}}
		_, _, err := ReadClientHello(cr, 2048)
		if !errors.Is(err, ErrHelloTooLarge) {
			t.Fatalf("reads of %d: err %v, want ErrHelloTooLarge", chunk, err)
		}
		if cr.n > 2048 {
			t.Fatalf("read %d bytes, limit 2048", cr.n)
		}
	}
	// Within the limit it parses.
	if h, _, err := ReadClientHello(bytes.NewReader(data), 4096); err != nil || h.ServerName != "a.example" {
		t.Fatalf("%v %v", h, err)
	}
}

func TestReadClientHelloEOF(t *testing.T) {
	raw := goHello(t, &tls.Config{ServerName: "x.example"})
	if _, _, err := ReadClientHello(bytes.NewReader(nil), 4096); err != io.EOF {
		t.Fatalf("empty: %v", err)
	}
	_, got, err := ReadClientHello(bytes.NewReader(raw[:len(raw)-1]), 4096)
	if err != io.ErrUnexpectedEOF || len(got) != len(raw)-1 {
		t.Fatalf("truncated: %v, %d bytes", err, len(got))
	}
}

func TestParseClientHelloMalformed(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
		sni  string // when valid
	}{
		{"no extensions", records(helloBody()), ""},
		{"empty extensions", records(helloBody([]byte{})), ""},
		{"sni", records(helloBody(sniExt("ws.example.com"))), "ws.example.com"},
		{"sni upper case", records(helloBody(sniExt("WS.Example.com"))), "ws.example.com"},
		{"other name type skipped", records(helloBody(ext(0, []byte{0, 6, 1, 0, 3, 'a', 'b', 'c'}))), ""},
		{"duplicate sni extension", records(helloBody(sniExt("a.example"), sniExt("b.example"))), "!"},
		{"two host names", records(helloBody(sniExt("a.example", "b.example"))), "!"},
		{"trailing dot", records(helloBody(sniExt("a.example."))), "!"},
		{"empty name", records(helloBody(sniExt(""))), "!"},
		{"nul in name", records(helloBody(sniExt("a\x00.example"))), "!"},
		{"slash in name", records(helloBody(sniExt("a/b"))), "!"},
		{"empty label", records(helloBody(sniExt("a..b"))), "!"},
		{"long label", records(helloBody(sniExt(strings.Repeat("a", 64) + ".b"))), "!"},
		{"sni list too long", records(helloBody(ext(0, []byte{0, 9, 0, 0, 1, 'a'}))), "!"},
		{"sni trailing bytes", records(helloBody(ext(0, []byte{0, 4, 0, 0, 1, 'a', 0}))), "!"},
		{"extension overruns", records(append(helloBody(), 0, 8, 0, 0, 0, 9, 1)), "!"},
		{"bytes after extensions", records(append(helloBody(sniExt("a.b")), 0)), "!"},
		{"no cipher suites", records([]byte{3, 3, 32: 0, 33: 0, 34: 0, 35: 0, 36: 1, 37: 0}), "!"},
		{"session id too long", records(append(append([]byte{3, 3}, make([]byte, 32)...), 33)), "!"},
		{"alpn empty protocol", records(helloBody(ext(16, []byte{0, 1, 0}))), "!"},
		{"versions odd", records(helloBody(ext(43, []byte{3, 3, 4, 3}))), "!"},
		{"second message after hello", append(records(helloBody())[:0:0], func() []byte {
			r := records(helloBody())
			r[4] += 4
			return append(r, 1, 0, 0, 0)
		}()...), "!"},
		{"alert between fragments", func() []byte {
			r := reframe(t, records(helloBody(sniExt("a.b"))), 10)
			return append(append(slices.Clone(r[:15]), 21, 3, 3, 0, 2, 1, 0), r[15:]...)
		}(), "!"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := ParseClientHello(tc.data, 16<<10)
			if tc.sni == "!" {
				if !errors.Is(err, ErrMalformedHello) {
					t.Fatalf("got %+v, %v; want ErrMalformedHello", h, err)
				}
				return
			}
			if err != nil || h.ServerName != tc.sni {
				t.Fatalf("got %+v, %v; want sni %q", h, err, tc.sni)
			}
		})
	}
}

func BenchmarkReadClientHello(b *testing.B) {
	raw := goHello(b, &tls.Config{ServerName: "bench.example.com", NextProtos: []string{"http/1.1"}})
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := ReadClientHello(bytes.NewReader(raw), 16<<10); err != nil {
			b.Fatal(err)
		}
	}
}
