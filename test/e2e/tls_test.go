package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/wsplice/wsplice/pkg/agent"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/dataplane"
	"github.com/wsplice/wsplice/pkg/proxy"
	"github.com/wsplice/wsplice/pkg/tlsterm/tlstest"
	"golang.org/x/sys/unix"
)

// closeLog records the connections the agent closed.
type closeLog struct {
	mu      sync.Mutex
	results []dataplane.Result
	conns   []*proxy.Conn
	ch      chan dataplane.Result
}

func newCloseLog() *closeLog { return &closeLog{ch: make(chan dataplane.Result, 100)} }

func (l *closeLog) add(c *proxy.Conn, r dataplane.Result) {
	l.mu.Lock()
	l.results = append(l.results, r)
	l.conns = append(l.conns, c)
	l.mu.Unlock()
	l.ch <- r
}

func (l *closeLog) next(t *testing.T, within time.Duration) dataplane.Result {
	t.Helper()
	select {
	case r := <-l.ch:
		return r
	case <-time.After(within):
		t.Fatalf("no connection closed within %v", within)
	}
	return dataplane.Result{}
}

func (l *closeLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.results)
}

// startAgentLog is startAgent with the closed connections recorded.
func startAgentLog(t *testing.T, cfg *config.Config) (*agent.Agent, *closeLog) {
	t.Helper()
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("config: %v", err)
	}
	cl := newCloseLog()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan *agent.Agent, 1)
	errc := make(chan error, 1)
	go func() {
		errc <- agent.Run(ctx, agent.Options{Config: cfg, Logger: testLogger(t), OnClose: cl.add, Ready: func(a *agent.Agent) { ready <- a }})
	}()
	select {
	case a := <-ready:
		t.Cleanup(func() {
			cancel()
			if err := <-errc; err != nil {
				t.Errorf("agent: %v", err)
			}
		})
		if cfg.Dataplane == "sockmap" && a.Sockmap == nil {
			t.Fatal("sockmap requested but the agent runs without it")
		}
		return a, cl
	case err := <-errc:
		cancel()
		t.Fatalf("agent did not start: %v", err)
	}
	return nil, nil
}

// echoHandler is a WebSocket echo that greets with "hello from NAME" and,
// for a plain request, answers NAME and the forwarding headers.
func echoHandler(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "" {
			fmt.Fprintf(w, "%s: xff=%s proto=%s\n", name, r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Proto"))
			return
		}
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(64 << 20)
		ctx := r.Context()
		if c.Write(ctx, websocket.MessageText, []byte("hello from "+name)) != nil {
			return
		}
		for {
			typ, msg, err := c.Read(ctx)
			if err != nil || c.Write(ctx, typ, msg) != nil {
				return
			}
		}
	})
}

// tlsEcho starts a TLS WebSocket echo backend on addr with leaf's
// certificate and returns its address.
func tlsEcho(t *testing.T, name string, leaf *tlstest.Leaf, addr string) string {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: echoHandler(name), TLSConfig: &tls.Config{Certificates: []tls.Certificate{leaf.TLS(t)}},
		ReadHeaderTimeout: 5 * time.Second, ErrorLog: nil}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// wssDial opens wss://host/path with every TCP connection going to addr
// (the agent), and reads the backend's greeting.
func wssDial(t *testing.T, ctx context.Context, addr, host, path string, tcfg *tls.Config) (*websocket.Conn, string) {
	t.Helper()
	c, greeting, err := wssDialErr(ctx, addr, host, path, tcfg)
	if err != nil {
		t.Fatalf("wss dial %s via %s: %v", host, addr, err)
	}
	return c, greeting
}

func wssDialErr(ctx context.Context, addr, host, path string, tcfg *tls.Config) (*websocket.Conn, string, error) {
	tr := &http.Transport{
		TLSClientConfig: tcfg,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		},
	}
	c, _, err := websocket.Dial(ctx, "wss://"+host+path, &websocket.DialOptions{HTTPClient: &http.Client{Transport: tr}})
	if err != nil {
		return nil, "", err
	}
	c.SetReadLimit(8 << 20)
	_, hello, err := c.Read(ctx)
	if err != nil || !strings.HasPrefix(string(hello), "hello from ") {
		c.CloseNow()
		return nil, "", fmt.Errorf("greeting %q: %v", hello, err)
	}
	return c, strings.TrimPrefix(string(hello), "hello from "), nil
}

func echoOnce(t *testing.T, ctx context.Context, c *websocket.Conn, msg string) {
	t.Helper()
	if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		t.Fatal(err)
	}
	if _, got, err := c.Read(ctx); err != nil || string(got) != msg {
		t.Fatalf("echo %q: %q %v", msg, got, err)
	}
}

// tlsConfig is simpleConfig with the listener terminating TLS.
func tlsConfig(plane string, leaf *tlstest.Leaf, backends ...string) *config.Config {
	cfg := simpleConfig(plane, backends...)
	cfg.Listeners[0].TLS = &config.TLS{Certificates: []config.Certificate{{Cert: leaf.CertFile, Key: leaf.KeyFile}}}
	return cfg
}

// TestTLSTerminateEcho: wss:// through the agent to plain ws backends, on
// the copy plane whatever the listener's data plane.
func TestTLSTerminateEcho(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		ca := tlstest.NewCA(t, "e2e")
		leaf := ca.Issue("ws", "ws.example.com")
		a, cl := startAgentLog(t, tlsConfig(plane, leaf, echoBackends(t, 2)...))
		addr := a.Addr("ws").String()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		c, _ := wssDial(t, ctx, addr, "ws.example.com", "/ws/echo", ca.ClientConfig("ws.example.com"))
		defer c.CloseNow()
		for size := 1; size <= 1<<20; size *= 4 {
			msg := pattern(size, byte(size))
			if err := c.Write(ctx, websocket.MessageBinary, msg); err != nil {
				t.Fatal(err)
			}
			if _, got, err := c.Read(ctx); err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("%d bytes: %d back, %v", size, len(got), err)
			}
		}
		conns := a.Proxy.Conns()
		if len(conns) != 1 || conns[0].Plane.Kind() != dataplane.KindCopy {
			t.Fatalf("connections %d, plane %v; want 1 on copy", len(conns), conns[0].Plane.Kind())
		}
		if st, ok := a.Proxy.Stats(conns[0]); !ok || st.Plane != dataplane.KindCopy || st.ClientToBackend.Bytes < 1<<20 {
			t.Fatalf("stats %+v %v", st, ok)
		}
		c.Close(websocket.StatusNormalClosure, "")
		r := cl.next(t, 10*time.Second)
		if r.Plane != dataplane.KindCopy || (r.Reason != dataplane.ReasonClientFIN && r.Reason != dataplane.ReasonBackendFIN) {
			t.Fatalf("closed on %s with %s", r.Plane, r.Reason)
		}
		if a.Proxy.TLSStats().Handshakes != 1 {
			t.Fatalf("tls stats %+v", a.Proxy.TLSStats())
		}
	})
}

// tlsUpgrade dials addr over TLS, sends an upgrade request and returns the
// connection with a reader after the response head.
func tlsUpgrade(t *testing.T, addr string, cfg *tls.Config, path string) (*tls.Conn, *bufio.Reader, string) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, upgradeRequest(path)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	head, err := readHead(br)
	if err != nil {
		t.Fatalf("response head: %v (%q)", err, head)
	}
	c.SetReadDeadline(time.Time{})
	return c, br, head
}

// TestTLSForwardedProto: a terminated request reaches the backend with
// X-Forwarded-Proto: https (a client's own value replaced) and the
// WebSocket bytes pass both ways.
func TestTLSForwardedProto(t *testing.T) {
	ca := tlstest.NewCA(t, "e2e")
	leaf := ca.Issue("ws", "ws.example.com")
	heads := make(chan string, 1)
	be := rawBackend(t, func(c net.Conn, br *bufio.Reader, head string) {
		heads <- head
		io.WriteString(c, switching)
		io.Copy(c, br)
	})
	a, _ := startAgentLog(t, tlsConfig("splice", leaf, be))
	c, br, resp := tlsUpgrade(t, a.Addr("ws").String(), ca.ClientConfig("ws.example.com"), "/ws/x")
	if !strings.HasPrefix(resp, "HTTP/1.1 101") {
		t.Fatalf("response %q", resp)
	}
	head := <-heads
	if !strings.Contains(head, "X-Forwarded-Proto: https\r\n") || !strings.Contains(head, "X-Forwarded-For: 127.0.0.1\r\n") {
		t.Fatalf("backend got head:\n%s", head)
	}
	msg := pattern(100000, 7)
	go c.Write(msg)
	got := make([]byte, len(msg))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo: %v", err)
	}
}

// TestTLSCertificateSelection: the certificate follows the SNI (exact,
// wildcard one label deep, else the first); with unknown_sni: reject an
// unknown name fails the handshake and is counted.
func TestTLSCertificateSelection(t *testing.T) {
	ca := tlstest.NewCA(t, "e2e")
	def := ca.Issue("default", "default.example")
	exact := ca.Issue("exact", "chat.example.com")
	wild := ca.Issue("wild", "*.example.com")
	cfg := simpleConfig("splice", echoBackends(t, 1)...)
	certs := []config.Certificate{{Cert: def.CertFile, Key: def.KeyFile}, {Cert: exact.CertFile, Key: exact.KeyFile}, {Cert: wild.CertFile, Key: wild.KeyFile}}
	cfg.Listeners[0].TLS = &config.TLS{Certificates: certs}
	strict := cfg.Listeners[0]
	strict.Name, strict.Address, strict.TLS = "strict", "127.0.0.2:0", &config.TLS{Certificates: certs, UnknownSNI: "reject"}
	cfg.Listeners = append(cfg.Listeners, strict)
	a, _ := startAgentLog(t, cfg)
	served := func(listener, sni string) (string, error) {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", a.Addr(listener).String(),
			&tls.Config{ServerName: sni, InsecureSkipVerify: true})
		if err != nil {
			return "", err
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName, nil
	}
	for _, tc := range []struct{ sni, want string }{
		{"chat.example.com", "exact"}, {"feed.example.com", "wild"}, {"a.b.example.com", "default"},
		{"unknown.test", "default"}, {"", "default"},
	} {
		if got, err := served("ws", tc.sni); err != nil || got != tc.want {
			t.Errorf("sni %q: served %q (%v), want %q", tc.sni, got, err, tc.want)
		}
	}
	if got, err := served("strict", "feed.example.com"); err != nil || got != "wild" {
		t.Errorf("strict listener, known name: %q %v", got, err)
	}
	if _, err := served("strict", "unknown.test"); err == nil || !strings.Contains(err.Error(), "unrecognized name") {
		t.Fatalf("strict listener, unknown name: %v, want an unrecognized_name alert", err)
	}
	waitFor(t, "tls_unknown_sni counted", func() bool { return a.Proxy.Counters.Refusals()["tls_unknown_sni"] == 1 })
}

// TestTLSRefusesOldVersions: a client offering only TLS 1.0 and 1.1 is
// refused with a protocol_version alert and counted; plain HTTP on the TLS
// port gets no HTTP answer, only a close.
func TestTLSRefusesOldVersions(t *testing.T) {
	ca := tlstest.NewCA(t, "e2e")
	leaf := ca.Issue("ws", "ws.example.com")
	a, cl := startAgentLog(t, tlsConfig("splice", leaf, echoBackends(t, 1)...))
	addr := a.Addr("ws").String()
	cfg := ca.ClientConfig("ws.example.com")
	cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS10, tls.VersionTLS11
	_, err := tls.Dial("tcp", addr, cfg)
	if err == nil || !strings.Contains(err.Error(), "protocol version") {
		t.Fatalf("TLS 1.1 client: %v, want a protocol version alert", err)
	}
	waitFor(t, "tls_version counted", func() bool { return a.Proxy.Counters.Refusals()["tls_version"] == 1 })

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, upgradeRequest("/ws/"))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, _ := io.ReadAll(c)
	if bytes.Contains(b, []byte("HTTP/1.1")) {
		t.Fatalf("plain HTTP on the TLS port got an HTTP answer: %q", b)
	}
	waitFor(t, "tls_not_tls counted", func() bool { return a.Proxy.Counters.Refusals()["tls_not_tls"] == 1 })
	// TLS 1.2 and 1.3 work.
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		cfg := ca.ClientConfig("ws.example.com")
		cfg.MinVersion, cfg.MaxVersion = v, v
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, _ := wssDial(t, ctx, addr, "ws.example.com", "/ws/", cfg)
		echoOnce(t, ctx, c, "hi")
		c.CloseNow()
		cancel()
	}
	if cl.count() > 2 {
		t.Fatalf("refused connections reached a plane: %d closed", cl.count())
	}
}

// TestTLSClientCertificate: with client_ca, a client without a certificate
// from that CA gets no connection; one with it gets its echo.
func TestTLSClientCertificate(t *testing.T) {
	ca := tlstest.NewCA(t, "e2e")
	clients := tlstest.NewCA(t, "clients")
	leaf := ca.Issue("ws", "ws.example.com")
	cfg := tlsConfig("splice", leaf, echoBackends(t, 1)...)
	cfg.Listeners[0].TLS.ClientCA = clients.CAFile
	a, _ := startAgentLog(t, cfg)
	addr := a.Addr("ws").String()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, _, err := wssDialErr(ctx, addr, "ws.example.com", "/ws/", ca.ClientConfig("ws.example.com")); err == nil {
		t.Fatal("a client without a certificate got through")
	}
	waitFor(t, "tls_client_cert counted", func() bool { return a.Proxy.Counters.Refusals()["tls_client_cert"] >= 1 })
	withCert := ca.ClientConfig("ws.example.com")
	withCert.Certificates = []tls.Certificate{clients.Issue("alice").TLS(t)}
	c, _ := wssDial(t, ctx, addr, "ws.example.com", "/ws/", withCert)
	defer c.CloseNow()
	echoOnce(t, ctx, c, "alice")
}

// TestTLSCertificateReload: new certificate files are served after the
// file watcher, a configuration reload or ReloadCertificates picks them up;
// a file that does not load leaves the previous certificate serving and
// says why; a connection open through all of it keeps working.
func TestTLSCertificateReload(t *testing.T) {
	ca := tlstest.NewCA(t, "e2e")
	v1 := ca.Issue("v1", "ws.example.com")
	cfg := tlsConfig("splice", v1, echoBackends(t, 1)...)
	cfg.Listeners[0].TLS.WatchInterval = config.Duration(time.Second)
	a, cl := startAgentLog(t, cfg)
	addr := a.Addr("ws").String()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	served := func() string {
		c, err := tls.Dial("tcp", addr, ca.ClientConfig("ws.example.com"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	live, _ := wssDial(t, ctx, addr, "ws.example.com", "/ws/", ca.ClientConfig("ws.example.com"))
	defer live.CloseNow()
	echoOnce(t, ctx, live, "before")

	// 1. The watcher picks up renewed files.
	v2 := ca.Issue("v2", "ws.example.com")
	tlstest.WriteFile(t, v1.KeyFile, v2.KeyPEM)
	tlstest.WriteFile(t, v1.CertFile, v2.CertPEM)
	waitFor(t, "v2 served", func() bool { return served() == "v2" })
	echoOnce(t, ctx, live, "after v2")

	// 2. A broken file: v2 stays, the failure is counted.
	tlstest.WriteFile(t, v1.CertFile, []byte("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n"))
	waitFor(t, "a failed reload", func() bool { return a.Proxy.TLSStats().ReloadFailures >= 1 })
	if got := served(); got != "v2" {
		t.Fatalf("served %s after a broken file, want v2", got)
	}
	// The configuration reload path refuses it too, naming the file.
	err := a.Proxy.Reload(cfg)
	if err == nil || !strings.Contains(err.Error(), v1.CertFile) {
		t.Fatalf("config reload with a broken certificate: %v", err)
	}
	if got := served(); got != "v2" {
		t.Fatalf("served %s after a refused reload, want v2", got)
	}
	echoOnce(t, ctx, live, "after broken")

	// 3. Fixed files, reloaded on demand (SIGHUP without a config file).
	v3 := ca.Issue("v3", "ws.example.com")
	tlstest.WriteFile(t, v1.KeyFile, v3.KeyPEM)
	tlstest.WriteFile(t, v1.CertFile, v3.CertPEM)
	if err := a.Proxy.ReloadCertificates(); err != nil {
		t.Fatal(err)
	}
	if got := served(); got != "v3" {
		t.Fatalf("served %s, want v3", got)
	}
	// And through a configuration reload.
	v4 := ca.Issue("v4", "ws.example.com")
	tlstest.WriteFile(t, v1.KeyFile, v4.KeyPEM)
	tlstest.WriteFile(t, v1.CertFile, v4.CertPEM)
	if err := a.Proxy.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if got := served(); got != "v4" {
		t.Fatalf("served %s, want v4", got)
	}
	echoOnce(t, ctx, live, "at the end")
	if n := cl.count(); n != 0 {
		t.Fatalf("%d connections closed during the reloads", n)
	}
}

// TestBackendTLS: TLS from the agent to the backends, verified against a
// CA, from a plain and from a terminating listener; a backend whose
// certificate does not verify is a 502.
func TestBackendTLS(t *testing.T) {
	ca := tlstest.NewCA(t, "e2e")
	beLeaf := ca.Issue("backend", "backend.internal", "127.0.0.1")
	be := tlsEcho(t, "tls-backend", beLeaf, "127.0.0.1:0")
	front := ca.Issue("ws", "ws.example.com")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	t.Run("plain client", func(t *testing.T) {
		cfg := simpleConfig("splice", be)
		cfg.Listeners[0].TLS = &config.TLS{Backend: &config.BackendTLS{CA: ca.CAFile}}
		a, _ := startAgentLog(t, cfg)
		c := dialWS(t, ctx, a.Addr("ws").String(), "/ws/", nil)
		defer c.CloseNow()
		echoOnce(t, ctx, c, "through backend tls")
		if conns := a.Proxy.Conns(); len(conns) != 1 || conns[0].Plane.Kind() != dataplane.KindCopy {
			t.Fatalf("conns %v", conns)
		}
	})
	t.Run("tls client", func(t *testing.T) {
		cfg := tlsConfig("splice", front, be)
		cfg.Listeners[0].TLS.Backend = &config.BackendTLS{CA: ca.CAFile, ServerName: "backend.internal"}
		a, _ := startAgentLog(t, cfg)
		c, name := wssDial(t, ctx, a.Addr("ws").String(), "ws.example.com", "/ws/", ca.ClientConfig("ws.example.com"))
		defer c.CloseNow()
		if name != "tls-backend" {
			t.Fatalf("greeting from %q", name)
		}
		echoOnce(t, ctx, c, "tls both sides")
	})
	t.Run("unverified backend", func(t *testing.T) {
		other := tlstest.NewCA(t, "other")
		cfg := simpleConfig("splice", be)
		cfg.Listeners[0].TLS = &config.TLS{Backend: &config.BackendTLS{CA: other.CAFile}}
		a, _ := startAgentLog(t, cfg)
		if code, _ := rawRequest(t, a.Addr("ws").String(), upgradeRequest("/ws/")); code != 502 {
			t.Fatalf("status %d, want 502", code)
		}
		if n := a.Proxy.Counters.Refusals()["backend_tls"]; n != 1 {
			t.Fatalf("backend_tls refusals %d", n)
		}
	})
}

// passthroughSetup is three TLS echo backends behind a tls_passthrough
// listener: chat.example.com → chat, *.example.com → feed, anything else
// → fallback (the listener's pool).
type passthroughSetup struct {
	ca   *tlstest.CA
	a    *agent.Agent
	cl   *closeLog
	addr string
}

func newPassthrough(t *testing.T, plane string, edit func(*config.Listener)) *passthroughSetup {
	ca := tlstest.NewCA(t, "e2e")
	chat := tlsEcho(t, "chat", ca.Issue("chat", "chat.example.com"), "127.0.0.1:0")
	feed := tlsEcho(t, "feed", ca.Issue("feed", "*.example.com"), "127.0.0.1:0")
	fallback := tlsEcho(t, "fallback", ca.Issue("fallback", "other.test", "127.0.0.1"), "127.0.0.1:0")
	cfg := &config.Config{
		Dataplane: plane, Tune: config.Tune{Mode: "off"}, Admin: config.Admin{Socket: "none"},
		DrainTimeout: config.Duration(2 * time.Second),
		Pools: []config.Pool{
			{Name: "chat", Backends: []config.Backend{{Address: chat}}},
			{Name: "feed", Backends: []config.Backend{{Address: feed}}},
			{Name: "fallback", Backends: []config.Backend{{Address: fallback}}},
		},
		Listeners: []config.Listener{{
			Name: "tls", Address: "127.0.0.1:0", Mode: "tls_passthrough", Pool: "fallback",
			HandshakeTimeout: config.Duration(time.Second),
			SNI: &config.SNI{HashKey: "sni", Routes: []config.SNIRoute{
				{ServerName: "chat.example.com", Pool: "chat"},
				{ServerName: "*.example.com", Pool: "feed"},
			}},
		}},
	}
	if edit != nil {
		edit(&cfg.Listeners[0])
	}
	a, cl := startAgentLog(t, cfg)
	return &passthroughSetup{ca: ca, a: a, cl: cl, addr: a.Addr("tls").String()}
}

// TestSNIPassthrough: wss:// sessions routed by SNI without decrypting,
// exact and wildcard names to two pools, an unknown name and a hello
// without SNI to the default pool, junk closed; every one counted; the
// encrypted stream on the listener's data plane.
func TestSNIPassthrough(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		s := newPassthrough(t, plane, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		for _, tc := range []struct{ host, want, route string }{
			{"chat.example.com", "chat", "sni:chat.example.com"},
			{"live.example.com", "feed", "sni:*.example.com"},
			{"other.test", "fallback", "sni:unknown_sni"},
		} {
			c, name := wssDial(t, ctx, s.addr, tc.host, "/", s.ca.ClientConfig(tc.host))
			if name != tc.want {
				t.Fatalf("%s went to %s, want %s", tc.host, name, tc.want)
			}
			for size := 1; size <= 1<<20; size *= 16 {
				msg := strings.Repeat("p", size)
				echoOnce(t, ctx, c, msg)
			}
			conns := s.a.Proxy.Conns()
			if len(conns) != 1 || conns[0].Route != tc.route {
				t.Fatalf("%s: conns %d, route %q", tc.host, len(conns), conns[0].Route)
			}
			st, _ := s.a.Proxy.Stats(conns[0])
			if string(st.Plane) != plane && !st.Demoted {
				t.Fatalf("%s: on plane %s, want %s", tc.host, st.Plane, plane)
			}
			c.Close(websocket.StatusNormalClosure, "")
			if r := s.cl.next(t, 10*time.Second); r.ClientToBackend.Bytes < 1<<20 {
				t.Fatalf("%s: closed with %+v", tc.host, r)
			}
		}
		// No SNI at all (an IP-literal client): the default pool.
		c, err := tls.Dial("tcp", s.addr, &tls.Config{RootCAs: s.ca.Pool, ServerName: "127.0.0.1"})
		if err != nil {
			t.Fatalf("hello without sni: %v", err)
		}
		if cn := c.ConnectionState().PeerCertificates[0].Subject.CommonName; cn != "fallback" {
			t.Fatalf("hello without sni reached %s", cn)
		}
		c.Close()
		// Not TLS: closed and counted.
		raw, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(raw, "GET / HTTP/1.1\r\nHost: chat.example.com\r\n\r\n")
		raw.SetReadDeadline(time.Now().Add(5 * time.Second))
		if b, _ := io.ReadAll(raw); len(b) != 0 {
			t.Fatalf("junk got an answer: %q", b)
		}
		raw.Close()
		waitFor(t, "counters", func() bool {
			fb := s.a.Proxy.TLSStats().PassthroughFallbacks
			return fb["unknown_sni"] == 1 && fb["no_sni"] == 1 && s.a.Proxy.Counters.Refusals()["tls_malformed_hello"] == 1
		})
	})
}

// TestSNIPassthroughClose: with no_sni: close and no default pool, hellos
// without a route are closed and counted; a hello that never ends is
// closed at handshake_timeout.
func TestSNIPassthroughClose(t *testing.T) {
	s := newPassthrough(t, "splice", func(l *config.Listener) {
		l.Pool = ""
		l.SNI.NoSNI = "close"
	})
	if _, err := tls.Dial("tcp", s.addr, &tls.Config{RootCAs: s.ca.Pool, ServerName: "other.test"}); err == nil {
		t.Fatal("an unknown name got through without a default pool")
	}
	if _, err := tls.Dial("tcp", s.addr, &tls.Config{RootCAs: s.ca.Pool, ServerName: "127.0.0.1"}); err == nil {
		t.Fatal("a hello without sni got through with no_sni: close")
	}
	c, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	c.Write([]byte{0x16, 3, 1, 0, 200, 1}) // and nothing more
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	io.ReadAll(c)
	if el := time.Since(start); el < 900*time.Millisecond || el > 5*time.Second {
		t.Fatalf("stalled hello closed after %v, want about the 1s handshake_timeout", el)
	}
	waitFor(t, "refusals counted", func() bool {
		r := s.a.Proxy.Counters.Refusals()
		return r["tls_unknown_sni"] == 1 && r["tls_no_sni"] == 1 && r["tls_hello_timeout"] == 1
	})
}

// trickleConn writes its first write (the ClientHello) one byte per TCP
// segment.
type trickleConn struct {
	*net.TCPConn
	once sync.Once
	segs int
}

func (c *trickleConn) Write(b []byte) (int, error) {
	first := false
	c.once.Do(func() { first = true })
	if !first {
		return c.TCPConn.Write(b)
	}
	c.SetNoDelay(true)
	for i := range b {
		if _, err := c.TCPConn.Write(b[i : i+1]); err != nil {
			return i, err
		}
		c.segs++
		time.Sleep(200 * time.Microsecond)
	}
	return len(b), nil
}

// TestSNIPassthroughSplitHello: a ClientHello arriving one byte per TCP
// segment is reassembled, routed, and the session works.
func TestSNIPassthroughSplitHello(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		s := newPassthrough(t, plane, func(l *config.Listener) { l.HandshakeTimeout = config.Duration(10 * time.Second) })
		var tc *trickleConn
		tr := &http.Transport{DialTLSContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			raw, err := net.Dial("tcp", s.addr)
			if err != nil {
				return nil, err
			}
			tc = &trickleConn{TCPConn: raw.(*net.TCPConn)}
			c := tls.Client(tc, s.ca.ClientConfig("chat.example.com"))
			return c, c.HandshakeContext(ctx)
		}}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, _, err := websocket.Dial(ctx, "wss://chat.example.com/", &websocket.DialOptions{HTTPClient: &http.Client{Transport: tr}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseNow()
		if _, hello, err := c.Read(ctx); err != nil || string(hello) != "hello from chat" {
			t.Fatalf("greeting %q %v", hello, err)
		}
		echoOnce(t, ctx, c, "split hello")
		if tc.segs < 200 {
			t.Fatalf("hello written in %d writes", tc.segs)
		}
		t.Logf("ClientHello sent as %d one-byte writes", tc.segs)
	})
}

// tcpInfo reads the TCP_INFO of c.
func tcpInfo(t *testing.T, c *net.TCPConn) *unix.TCPInfo {
	t.Helper()
	rc, _ := c.SyscallConn()
	var ti *unix.TCPInfo
	var err error
	rc.Control(func(fd uintptr) { ti, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if err != nil {
		t.Fatal(err)
	}
	return ti
}

// deafen makes c drop every segment it receives, unanswered (a socket
// filter that keeps nothing), after what it sent is acknowledged: to the
// agent the client has vanished, as behind a NAT that forgot it.
func deafen(t *testing.T, c *net.TCPConn) {
	t.Helper()
	waitFor(t, "client's bytes acknowledged", func() bool { return tcpInfo(t, c).Unacked == 0 })
	filter := []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: 0}}
	rc, _ := c.SyscallConn()
	var serr error
	rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: 1, Filter: &filter[0]})
	})
	if serr != nil {
		t.Fatal(serr)
	}
}

// ssTimer returns the timer column ss shows for the TCP socket local→remote.
func ssTimer(t *testing.T, local, remote net.Addr) string {
	out, err := exec.Command("ss", "-tnoH", "state", "established",
		fmt.Sprintf("( sport = :%d and dport = :%d )", local.(*net.TCPAddr).Port, remote.(*net.TCPAddr).Port)).Output()
	if err != nil {
		return ""
	}
	if i := strings.Index(string(out), "timer:("); i >= 0 {
		return strings.Fields(string(out)[i:])[0]
	}
	return ""
}

// TestKeepaliveDeadPeer: the agent probes an idle client (the probes are
// seen arriving at the client, and ss shows the keepalive timer on the
// agent's socket), and when the client stops answering the connection is
// closed after about idle + interval × count — on the kernel path, on
// splice, and terminated on the copy plane, which names the reason
// client_timeout.
func TestKeepaliveDeadPeer(t *testing.T) {
	run := func(t *testing.T, plane string, terminate bool) {
		ca := tlstest.NewCA(t, "e2e")
		leaf := ca.Issue("ws", "ws.example.com")
		backend := rawBackend(t, func(c net.Conn, br *bufio.Reader, head string) {
			io.WriteString(c, switching)
			io.Copy(c, br)
		})
		cfg := simpleConfig(plane, backend)
		if terminate {
			cfg = tlsConfig(plane, leaf, backend)
		}
		off := false
		cfg.Listeners[0].Keepalive = config.Keepalive{
			Client:  config.KeepaliveSide{Idle: config.Duration(time.Second), Interval: config.Duration(time.Second), Count: 2},
			Backend: config.KeepaliveSide{Enabled: &off},
		}
		a, cl := startAgentLog(t, cfg)
		addr := a.Addr("ws").String()
		d := net.Dialer{KeepAlive: -1} // only the agent probes
		raw, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		var c io.ReadWriter = raw
		if terminate {
			tc := tls.Client(raw, ca.ClientConfig("ws.example.com"))
			if err := tc.Handshake(); err != nil {
				t.Fatal(err)
			}
			c = tc
		}
		io.WriteString(c, upgradeRequest("/ws/"))
		br := bufio.NewReader(c)
		if head, err := readHead(br); err != nil || !strings.HasPrefix(head, "HTTP/1.1 101") {
			t.Fatalf("upgrade: %q %v", head, err)
		}
		io.WriteString(c, "ping")
		if b := make([]byte, 4); func() error { _, err := io.ReadFull(br, b); return err }() != nil {
			t.Fatal("no echo")
		}
		tcp := raw.(*net.TCPConn)

		// Idle: the agent's probes arrive (each is a segment the client
		// receives and answers with an ACK).
		in0 := tcpInfo(t, tcp).Segs_in
		time.Sleep(3500 * time.Millisecond)
		probes := tcpInfo(t, tcp).Segs_in - in0
		if probes < 2 {
			t.Fatalf("%d segments reached the idle client in 3.5 s: no keepalive probes", probes)
		}
		timer := ssTimer(t, raw.RemoteAddr(), raw.LocalAddr())
		t.Logf("%d keepalive probes in 3.5 s idle; agent socket %s", probes, timer)
		if timer != "" && !strings.HasPrefix(timer, "timer:(keepalive") {
			t.Fatalf("agent's client socket timer %s, want keepalive", timer)
		}

		deafen(t, tcp)
		start := time.Now()
		r := cl.next(t, 20*time.Second)
		el := time.Since(start)
		t.Logf("dead client found after %v: %s on %s", el.Round(10*time.Millisecond), r.Reason, r.Plane)
		// user_timeout defaults to idle + interval × count = 3 s.
		if el > 8*time.Second {
			t.Errorf("took %v, want about 3s", el)
		}
		switch {
		case terminate && r.Reason != dataplane.ReasonClientTimeout:
			t.Errorf("reason %s, want %s", r.Reason, dataplane.ReasonClientTimeout)
		case !terminate && r.Reason != dataplane.ReasonClientTimeout && r.Reason != dataplane.ReasonClientReset:
			t.Errorf("reason %s, want client_timeout or client_reset", r.Reason)
		}
	}
	forEachPlane(t, func(t *testing.T, plane string) { run(t, plane, false) })
	t.Run("tls-copy", func(t *testing.T) { run(t, "splice", true) })
}

// TestKeepaliveOff: with keepalive disabled the agent sends no probes
// (Go's own 15 s default is off too).
func TestKeepaliveOff(t *testing.T) {
	backend := rawBackend(t, func(c net.Conn, br *bufio.Reader, head string) {
		io.WriteString(c, switching)
		io.Copy(c, br)
	})
	cfg := simpleConfig("splice", backend)
	off := false
	cfg.Listeners[0].Keepalive.Client.Enabled = &off
	a, _ := startAgentLog(t, cfg)
	c, _, head := rawUpgrade(t, a.Addr("ws").String(), "/ws/", nil)
	if !strings.HasPrefix(head, "HTTP/1.1 101") {
		t.Fatal(head)
	}
	if timer := ssTimer(t, c.RemoteAddr(), c.LocalAddr()); strings.Contains(timer, "keepalive") {
		t.Fatalf("agent socket has %s with keepalive off", timer)
	}
}
