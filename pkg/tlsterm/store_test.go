package tlsterm

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/wsplice/wsplice/pkg/tlsterm/tlstest"
)

// serve accepts one connection on a loopback listener and runs the store's
// handshake on it; the result arrives on the returned channel.
type result struct {
	conn *tls.Conn
	err  error
}

func serve(t *testing.T, s *Store, timeout time.Duration) (string, <-chan result) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan result, 1)
	go func() {
		c, err := ln.AcceptTCP()
		if err != nil {
			ch <- result{err: err}
			return
		}
		tc, err := s.Handshake(c, timeout)
		if err != nil {
			c.Close()
		} else {
			t.Cleanup(func() { tc.Close() })
		}
		ch <- result{tc, err}
	}()
	return ln.Addr().String(), ch
}

func dial(t *testing.T, addr string, cfg *tls.Config) (*tls.Conn, error) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(c, cfg)
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		c.Close()
		return nil, err
	}
	t.Cleanup(func() { tc.Close() })
	return tc, nil
}

func wait(t *testing.T, ch <-chan result) result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("server handshake did not finish")
	}
	return result{}
}

func reasonOf(err error) string {
	var he *HandshakeError
	if errors.As(err, &he) {
		return he.Reason
	}
	return "not a HandshakeError: " + err.Error()
}

func TestSNISelection(t *testing.T) {
	ca := tlstest.NewCA(t, "test")
	def := ca.Issue("default", "default.example")
	exact := ca.Issue("exact", "chat.example.com")
	wild := ca.Issue("wild", "*.example.com")
	s, err := New(Options{Certificates: []CertFiles{
		{def.CertFile, def.KeyFile}, {exact.CertFile, exact.KeyFile}, {wild.CertFile, wild.KeyFile},
	}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ sni, want string }{
		{"chat.example.com", "exact"},
		{"CHAT.Example.com", "exact"},
		{"feed.example.com", "wild"},
		{"a.b.example.com", "default"}, // a wildcard covers one label
		{"example.com", "default"},
		{"other.test", "default"},
		{"", "default"},
	} {
		addr, ch := serve(t, s, 5*time.Second)
		cfg := &tls.Config{ServerName: tc.sni, InsecureSkipVerify: true, NextProtos: []string{"h2", "http/1.1"}}
		c, err := dial(t, addr, cfg)
		if err != nil {
			t.Fatalf("sni %q: %v", tc.sni, err)
		}
		r := wait(t, ch)
		if r.err != nil {
			t.Fatalf("sni %q: server: %v", tc.sni, r.err)
		}
		st := c.ConnectionState()
		if got := st.PeerCertificates[0].Subject.CommonName; got != tc.want {
			t.Errorf("sni %q: served %q, want %q", tc.sni, got, tc.want)
		}
		if st.NegotiatedProtocol != "http/1.1" {
			t.Errorf("alpn %q, want http/1.1", st.NegotiatedProtocol)
		}
		if sc, ok := r.conn.NetConn().(*ServerConn); !ok || sc.ServerName() != strings.ToLower(tc.sni) && sc.ServerName() != tc.sni {
			t.Errorf("server conn %T records sni %q", r.conn.NetConn(), sc.ServerName())
		}
	}
	if names := s.Certificates()[2].Names; len(names) != 1 || names[0] != "*.example.com" {
		t.Fatalf("names %q", names)
	}
}

func TestHandshakeRefusals(t *testing.T) {
	ca := tlstest.NewCA(t, "test")
	other := tlstest.NewCA(t, "other")
	srv := ca.Issue("srv", "ws.example.com")
	good := ca.Issue("client")
	bad := other.Issue("intruder")
	files := []CertFiles{{srv.CertFile, srv.KeyFile}}
	strict, err := New(Options{Certificates: files, RejectUnknownSNI: true, ClientCA: ca.CAFile})
	if err != nil {
		t.Fatal(err)
	}
	optional, err := New(Options{Certificates: files, ClientCA: ca.CAFile, ClientCertOptional: true})
	if err != nil {
		t.Fatal(err)
	}
	tls13, err := New(Options{Certificates: files, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	goodCert, badCert := good.TLS(t), bad.TLS(t)
	base := func() *tls.Config { return ca.ClientConfig("ws.example.com") }
	// crypto/tls sends only a certificate from a CA the server asks for:
	// force the foreign one out.
	withBad := func() *tls.Config {
		c := base()
		c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &badCert, nil }
		return c
	}
	for _, tc := range []struct {
		name   string
		store  *Store
		client func() *tls.Config
		raw    string // sent instead of a handshake
		reason string // "" = success
	}{
		{"client cert", strict, func() *tls.Config { c := base(); c.Certificates = []tls.Certificate{goodCert}; return c }, "", ""},
		{"no client cert", strict, base, "", ReasonClientCert},
		{"client cert from another CA", strict, withBad, "", ReasonClientCert},
		{"optional without cert", optional, base, "", ""},
		{"optional with a bad cert", optional, withBad, "", ReasonClientCert},
		{"unknown sni rejected", strict, func() *tls.Config { c := base(); c.ServerName = "nope.example"; c.InsecureSkipVerify = true; return c }, "", ReasonUnknownSNI},
		{"tls 1.0 and 1.1 only", optional, func() *tls.Config {
			c := base()
			c.MinVersion, c.MaxVersion = tls.VersionTLS10, tls.VersionTLS11
			return c
		}, "", ReasonVersion},
		{"tls 1.2 on a 1.3 listener", tls13, func() *tls.Config { c := base(); c.MaxVersion = tls.VersionTLS12; return c }, "", ReasonVersion},
		{"plain http", optional, nil, "GET / HTTP/1.1\r\nHost: ws.example.com\r\n\r\n", ReasonNotTLS},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, ch := serve(t, tc.store, 5*time.Second)
			var cerr error
			if tc.client != nil {
				c, err := dial(t, addr, tc.client())
				cerr = err
				if err == nil {
					// TLS 1.3 reports a client certificate refusal on the
					// first read.
					c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
					_, cerr = c.Read(make([]byte, 1))
					if errors.Is(cerr, os.ErrDeadlineExceeded) {
						cerr = nil
					}
				}
			} else {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				io.WriteString(c, tc.raw)
			}
			r := wait(t, ch)
			if tc.reason == "" {
				if r.err != nil || cerr != nil {
					t.Fatalf("server %v, client %v", r.err, cerr)
				}
				return
			}
			if r.err == nil {
				t.Fatalf("handshake succeeded, want %s", tc.reason)
			}
			if got := reasonOf(r.err); got != tc.reason {
				t.Fatalf("reason %s (%v), want %s", got, r.err, tc.reason)
			}
			if tc.client != nil && cerr == nil {
				t.Fatalf("client saw no error")
			}
		})
	}
}

func TestHandshakeTimeoutAndEOF(t *testing.T) {
	ca := tlstest.NewCA(t, "test")
	srv := ca.Issue("srv", "ws.example.com")
	s, err := New(Options{Certificates: []CertFiles{{srv.CertFile, srv.KeyFile}}})
	if err != nil {
		t.Fatal(err)
	}
	addr, ch := serve(t, s, 300*time.Millisecond)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte{0x16, 3, 1}) // a hello that never ends
	if r := wait(t, ch); reasonOf(r.err) != ReasonTimeout {
		t.Fatalf("stalled client: %v", r.err)
	}
	addr, ch = serve(t, s, 5*time.Second)
	c2, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c2.Close()
	if r := wait(t, ch); r.err != io.EOF {
		t.Fatalf("client gone before its hello: %v, want io.EOF", r.err)
	}
}

// TestReload: new files are served after Reload, live connections carry
// on, and a bad file leaves the old certificate serving.
func TestReload(t *testing.T) {
	ca := tlstest.NewCA(t, "test")
	v1 := ca.Issue("v1", "ws.example.com")
	v2 := ca.Issue("v2", "ws.example.com")
	s, err := New(Options{Certificates: []CertFiles{{v1.CertFile, v1.KeyFile}}})
	if err != nil {
		t.Fatal(err)
	}
	served := func() string {
		t.Helper()
		addr, ch := serve(t, s, 5*time.Second)
		c, err := dial(t, addr, ca.ClientConfig("ws.example.com"))
		if err != nil {
			t.Fatal(err)
		}
		if r := wait(t, ch); r.err != nil {
			t.Fatal(r.err)
		}
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	// A connection made before the reload.
	addr, ch := serve(t, s, 5*time.Second)
	live, err := dial(t, addr, ca.ClientConfig("ws.example.com"))
	if err != nil {
		t.Fatal(err)
	}
	liveSrv := wait(t, ch).conn

	if changed, err := s.ReloadIfChanged(); changed || err != nil {
		t.Fatalf("nothing changed: %v %v", changed, err)
	}
	tlstest.WriteFile(t, v1.CertFile, v2.CertPEM)
	tlstest.WriteFile(t, v1.KeyFile, v2.KeyPEM)
	if changed, err := s.ReloadIfChanged(); !changed || err != nil {
		t.Fatalf("files changed: %v %v", changed, err)
	}
	if got := served(); got != "v2" {
		t.Fatalf("served %s after reload, want v2", got)
	}

	// A certificate that does not match its key: refused, v2 stays.
	v3 := ca.Issue("v3", "ws.example.com")
	tlstest.WriteFile(t, v1.CertFile, v3.CertPEM)
	changed, err := s.ReloadIfChanged()
	if !changed || err == nil || !strings.Contains(err.Error(), v1.CertFile) {
		t.Fatalf("mismatched key: changed %v, err %v (want an error naming %s)", changed, err, v1.CertFile)
	}
	if s.LastError() == nil {
		t.Fatal("LastError is nil after a failed reload")
	}
	if got := served(); got != "v2" {
		t.Fatalf("served %s after a bad reload, want v2", got)
	}
	// Not retried until a file changes again; then the key lands and it loads.
	if changed, _ := s.ReloadIfChanged(); changed {
		t.Fatal("a failed reload was retried with no change")
	}
	tlstest.WriteFile(t, v1.KeyFile, v3.KeyPEM)
	if changed, err := s.ReloadIfChanged(); !changed || err != nil {
		t.Fatalf("key landed: %v %v", changed, err)
	}
	if got := served(); got != "v3" {
		t.Fatalf("served %s, want v3", got)
	}
	// Garbage and a missing file.
	tlstest.WriteFile(t, v1.CertFile, []byte("not pem"))
	if err := s.Reload(); err == nil {
		t.Fatal("garbage loaded")
	}
	os.Remove(v1.KeyFile)
	if err := s.Reload(); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing key: %v", err)
	}
	if got := served(); got != "v3" {
		t.Fatalf("served %s, want v3", got)
	}

	// The connection from before every reload still works.
	go func() {
		b := make([]byte, 5)
		if _, err := io.ReadFull(liveSrv, b); err == nil {
			liveSrv.Write(b)
		}
	}()
	live.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := live.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 5)
	if _, err := io.ReadFull(live, b); err != nil || string(b) != "hello" {
		t.Fatalf("live connection: %q %v", b, err)
	}
}

func TestNewErrors(t *testing.T) {
	ca := tlstest.NewCA(t, "test")
	l := ca.Issue("x", "x.example")
	for _, o := range []Options{
		{},
		{Certificates: []CertFiles{{l.CertFile, "/nonexistent.key"}}},
		{Certificates: []CertFiles{{l.CertFile, l.KeyFile}}, ClientCA: l.KeyFile},
		{Certificates: []CertFiles{{l.CertFile, l.KeyFile}}, MinVersion: tls.VersionTLS11},
	} {
		if _, err := New(o); err == nil {
			t.Errorf("%+v: accepted", o)
		}
	}
}

func TestBackend(t *testing.T) {
	ca := tlstest.NewCA(t, "backend")
	srvLeaf := ca.Issue("backend", "backend.internal", "127.0.0.1")
	clientLeaf := ca.Issue("agent")
	front, err := New(Options{Certificates: []CertFiles{{srvLeaf.CertFile, srvLeaf.KeyFile}}, ClientCA: ca.CAFile})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		opts BackendOptions
		ok   bool
	}{
		{"by ip", BackendOptions{CA: ca.CAFile, Cert: clientLeaf.CertFile, Key: clientLeaf.KeyFile}, true},
		{"by name", BackendOptions{CA: ca.CAFile, ServerName: "backend.internal", Cert: clientLeaf.CertFile, Key: clientLeaf.KeyFile}, true},
		{"wrong name", BackendOptions{CA: ca.CAFile, ServerName: "other.internal", Cert: clientLeaf.CertFile, Key: clientLeaf.KeyFile}, false},
		{"system roots", BackendOptions{Cert: clientLeaf.CertFile, Key: clientLeaf.KeyFile}, false},
		{"insecure", BackendOptions{InsecureSkipVerify: true, Cert: clientLeaf.CertFile, Key: clientLeaf.KeyFile}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := NewBackend(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			addr, ch := serve(t, front, 5*time.Second)
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			tc2, err := b.Handshake(c, addr, 5*time.Second)
			r := wait(t, ch)
			if tc.ok != (err == nil) {
				t.Fatalf("client handshake: %v (server %v)", err, r.err)
			}
			if tc.ok && (r.err != nil || tc2.ConnectionState().PeerCertificates[0].Subject.CommonName != "backend") {
				t.Fatalf("server %v", r.err)
			}
		})
	}
	if _, err := NewBackend(BackendOptions{CA: "/nonexistent"}); err == nil {
		t.Fatal("missing CA accepted")
	}
}

func TestKTLS(t *testing.T) {
	ok, err := KTLS()
	t.Logf("kernel TLS available: %v (%v)", ok, err)
	if ok == (err != nil) {
		t.Fatalf("ok %v with error %v", ok, err)
	}
}
