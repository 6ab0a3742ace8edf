package agent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/spf13/cobra"

	dto "github.com/prometheus/client_model/go"

	"github.com/wsplice/wsplice/pkg/admin"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/test/testutil"
)

// epAgent is an agent started for a test, with its endpoints.
type epAgent struct {
	*Agent
	cfg     *config.Config
	socket  string
	access  string
	cancel  context.CancelFunc
	done    chan error
	stopped bool
}

func epLogger() *slog.Logger {
	if os.Getenv("WSPLICE_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// epConfig is one websocket listener ("ws", route /ws/ to pool p) and one
// with a short idle timeout ("idle", same pool), metrics on a loopback
// port, the admin socket and a JSON access log in the test's directory.
// Each socket has its own loopback address: validation refuses the same
// "host:0" twice.
func epConfig(t *testing.T, plane string, backends ...string) *config.Config {
	dir := t.TempDir()
	cfg := &config.Config{
		Dataplane:    plane,
		DrainTimeout: config.Duration(300 * time.Millisecond),
		Listeners: []config.Listener{
			{Name: "ws", Address: "127.0.0.1:0", Routes: []config.Route{{Path: "/ws/", Pool: "p"}}},
			{Name: "idle", Address: "127.0.0.2:0", Routes: []config.Route{{Path: "/ws/", Pool: "p"}}, IdleTimeout: config.Duration(300 * time.Millisecond)},
		},
		Pools:   []config.Pool{{Name: "p", Balance: "first", ConnectTimeout: config.Duration(time.Second)}},
		Metrics: config.Metrics{Address: "127.0.0.3:0"},
		Admin:   config.Admin{Socket: filepath.Join(dir, "run", "admin.sock")},
		Log:     config.Log{Access: filepath.Join(dir, "access.log"), Format: "json"},
		Tune:    config.Tune{Mode: "off"},
	}
	for _, b := range backends {
		cfg.Pools[0].Backends = append(cfg.Pools[0].Backends, config.Backend{Address: b})
	}
	return cfg
}

// startEP runs an agent on cfg with its endpoints until the test ends.
func startEP(t *testing.T, cfg *config.Config) *epAgent {
	t.Helper()
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("config: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan *Agent, 1)
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{Config: cfg, Logger: epLogger(), Ready: func(a *Agent) {
			// Until Agent.start calls it; a second call is a no-op.
			if err := a.startEndpoints(); err != nil {
				t.Errorf("startEndpoints: %v", err)
			}
			ready <- a
		}})
	}()
	var a *Agent
	select {
	case a = <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("agent did not start: %v", err)
	}
	e := &epAgent{Agent: a, cfg: cfg, socket: cfg.Admin.Socket, access: cfg.Log.Access, cancel: cancel, done: done}
	t.Cleanup(func() { e.stop(t) })
	if cfg.Dataplane == "sockmap" && a.Sockmap == nil {
		t.Fatal("sockmap requested but the agent runs without it")
	}
	return e
}

// stop cancels the agent and waits for Run to return.
func (e *epAgent) stop(t *testing.T) {
	if e.stopped {
		return
	}
	e.stopped = true
	e.cancel()
	if err := <-e.done; err != nil {
		t.Errorf("agent: %v", err)
	}
	// Until Run calls it; a second call is a no-op.
	e.stopEndpoints()
}

func (e *epAgent) addr(listener string) string { return e.Proxy.Addrs()[listener].String() }

func (e *epAgent) metricsURL() string {
	return "http://" + e.endpoints().httpLn.Addr().String()
}

// scrape returns the metric families the agent exports now.
func (e *epAgent) scrape(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(e.metricsURL() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}

// value returns the sum of the series of name whose labels include want
// (counter, gauge or untyped), and how many series matched.
func value(mfs map[string]*dto.MetricFamily, name string, want map[string]string) (float64, int) {
	mf := mfs[name]
	if mf == nil {
		return 0, 0
	}
	sum, n := 0.0, 0
next:
	for _, m := range mf.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if labels[k] != v {
				continue next
			}
		}
		n++
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Histogram != nil:
			sum += float64(m.Histogram.GetSampleCount())
		}
	}
	return sum, n
}

// eventually retries cond for up to 5 s.
func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		ok, got := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still %s after 5s", what, got)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// echoBackend is a WebSocket-shaped TCP backend: it answers the upgrade
// with 101, then echoes bytes. A chunk containing "FIN!" makes it close
// cleanly, "RST!" makes it reset.
func echoBackend(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				serveEcho(c.(*net.TCPConn))
			}()
		}
	}()
	return ln.Addr().String()
}

const (
	wsKey     = "dGhlIHNhbXBsZSBub25jZQ=="
	switching = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)

func serveEcho(c *net.TCPConn) {
	defer c.Close()
	br := bufio.NewReader(c)
	if _, err := readHead(br); err != nil {
		return
	}
	if _, err := io.WriteString(c, switching); err != nil {
		return
	}
	buf := make([]byte, 64<<10)
	for {
		n, err := br.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			switch {
			case bytes.Contains(chunk, []byte("FIN!")):
				c.CloseWrite()
				io.Copy(io.Discard, br) // until the client closes too
				return
			case bytes.Contains(chunk, []byte("RST!")):
				c.SetLinger(0)
				return
			}
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func readHead(br *bufio.Reader) (string, error) {
	var sb strings.Builder
	for {
		line, err := br.ReadString('\n')
		sb.WriteString(line)
		if err != nil {
			return sb.String(), err
		}
		if line == "\r\n" {
			return sb.String(), nil
		}
	}
}

// wsClient is an upgraded client connection through the agent.
type wsClient struct {
	*net.TCPConn
	br *bufio.Reader
}

func dialWS(t *testing.T, addr string) *wsClient {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	req := "GET /ws/chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: " + wsKey + "\r\nSec-WebSocket-Version: 13\r\n\r\n"
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	head, err := readHead(br)
	if err != nil || !strings.HasPrefix(head, "HTTP/1.1 101") {
		t.Fatalf("upgrade through the agent: %q, %v", head, err)
	}
	c.SetReadDeadline(time.Time{})
	return &wsClient{TCPConn: c.(*net.TCPConn), br: br}
}

// echo sends b and reads it back.
func (c *wsClient) echo(t *testing.T, b []byte) {
	t.Helper()
	errc := make(chan error, 1)
	go func() { _, err := c.Write(b); errc <- err }()
	got := make([]byte, len(b))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c.br, got); err != nil {
		t.Fatalf("echo: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, b) {
		t.Fatal("echo: bytes differ")
	}
}

func pattern(n int) []byte {
	b := make([]byte, n)
	x := uint32(2654435761)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

// forEachPlane runs fn on splice, and on sockmap where the test is
// privileged.
func forEachPlane(t *testing.T, fn func(t *testing.T, plane string)) {
	for _, p := range []string{"splice", "sockmap"} {
		t.Run(p, func(t *testing.T) {
			if p == "sockmap" {
				testutil.RequirePrivileged(t)
			}
			fn(t, p)
		})
	}
}

// requireCloseHook skips what depends on the proxy calling connClosed
// until Agent.start wires it (proxy.Options{OnClose: a.connClosed}).
func (e *epAgent) requireCloseHook(t *testing.T) {
	t.Helper()
	if !e.endpoints().closeHook.Load() {
		t.Skip("proxy OnClose is not wired to Agent.connClosed yet: closed-connection metrics are not recorded")
	}
}

// TestMetricsMatchTraffic sends known bytes through the agent and finds
// exactly them in a scrape, live and after the connection closed.
func TestMetricsMatchTraffic(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		be := echoBackend(t)
		cfg := epConfig(t, plane, be)
		cfg.Metrics.PerConnection = true
		cfg.Metrics.MaxSeries = 1
		e := startEP(t, cfg)

		const n = 300 << 10
		c := dialWS(t, e.addr("ws"))
		c.echo(t, pattern(n))
		labels := map[string]string{"pool": "p", "backend": be}
		dir := func(d string) map[string]string {
			return map[string]string{"pool": "p", "backend": be, "direction": d}
		}
		eventually(t, "live bytes", func() (bool, string) {
			mfs := e.scrape(t)
			in, _ := value(mfs, "wsplice_bytes_total", dir("to_backend"))
			out, _ := value(mfs, "wsplice_bytes_total", dir("to_client"))
			return in == n && out == n, fmt.Sprintf("to_backend %v to_client %v, want %d", in, out, n)
		})
		mfs := e.scrape(t)
		conn := map[string]string{"listener": "ws", "route": "/ws/", "pool": "p", "backend": be, "dataplane": plane}
		for _, tc := range []struct {
			name   string
			labels map[string]string
			want   float64
		}{
			{"wsplice_connections_active", conn, 1},
			{"wsplice_connections_total", conn, 1},
			{"wsplice_backend_up", labels, 1},
			{"wsplice_backend_active_connections", labels, 1},
			{"wsplice_accepted_connections_total", nil, 1},
			{"wsplice_build_info", nil, 1},
			{"wsplice_draining", nil, 0},
			{"wsplice_connection_info", map[string]string{"backend": be, "dataplane": plane}, 1},
			{"wsplice_connection_bytes_total", map[string]string{"direction": "to_backend"}, n},
			{"wsplice_connection_series_omitted", nil, 0},
		} {
			if got, series := value(mfs, tc.name, tc.labels); got != tc.want || series == 0 {
				t.Errorf("%s%v = %v (%d series), want %v", tc.name, tc.labels, got, series, tc.want)
			}
		}
		if _, series := value(mfs, "wsplice_segments_total", dir("to_backend")); series != 1 {
			t.Errorf("segments_total: %d series", series)
		}
		// A second connection goes over metrics.max_series = 1.
		c2 := dialWS(t, e.addr("ws"))
		c2.echo(t, []byte("x"))
		eventually(t, "omitted series", func() (bool, string) {
			v, _ := value(e.scrape(t), "wsplice_connection_series_omitted", nil)
			return v == 1, fmt.Sprint(v)
		})
		c2.Close()

		for _, path := range []string{"/healthz", "/readyz"} {
			resp, err := http.Get(e.metricsURL() + path)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Errorf("%s: %s", path, resp.Status)
			}
		}

		// Close: the totals keep the connection's bytes.
		c.Close()
		eventually(t, "no active connection", func() (bool, string) {
			v, _ := value(e.scrape(t), "wsplice_connections_active", nil)
			return v == 0, fmt.Sprint(v)
		})
		e.requireCloseHook(t)
		eventually(t, "closed totals", func() (bool, string) {
			mfs := e.scrape(t)
			in, _ := value(mfs, "wsplice_bytes_total", dir("to_backend"))
			total, _ := value(mfs, "wsplice_connections_total", map[string]string{"backend": be})
			closed, _ := value(mfs, "wsplice_connections_closed_total", map[string]string{"backend": be, "reason": "client_fin"})
			dur, _ := value(mfs, "wsplice_connection_duration_seconds", map[string]string{"listener": "ws"})
			return in == n+1 && total == 2 && closed == 2 && dur == 2,
				fmt.Sprintf("to_backend %v (want %d), connections_total %v, client_fin %v, durations %v (want 2 each)", in, n+1, total, closed, dur)
		})
		if !e.endpoints().establishHook.Load() {
			t.Log("handshake and connect histograms not checked: the proxy does not call connEstablished yet")
			return
		}
		if v, _ := value(e.scrape(t), "wsplice_handshake_duration_seconds", map[string]string{"listener": "ws"}); v != 2 {
			t.Errorf("handshake observations %v, want 2", v)
		}
	})
}

// TestReadyzWhileDraining: readiness goes false as soon as the drain starts
// and liveness stays true.
func TestReadyzWhileDraining(t *testing.T) {
	be := echoBackend(t)
	cfg := epConfig(t, "splice", be)
	cfg.DrainTimeout = config.Duration(2 * time.Second)
	e := startEP(t, cfg)
	c := dialWS(t, e.addr("ws"))
	c.echo(t, []byte("hold the drain open"))
	url := e.metricsURL()
	e.cancel()
	eventually(t, "readyz during the drain", func() (bool, string) {
		resp, err := http.Get(url + "/readyz")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable, resp.Status
	})
	resp, err := http.Get(url + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("healthz during the drain: %s", resp.Status)
	}
	c.Close()
}

// accessLine is one access-log line as JSON.
type accessLine struct {
	Time      time.Time `json:"time"`
	Msg       string    `json:"msg"`
	ID        uint64    `json:"id"`
	Listener  string    `json:"listener"`
	Client    string    `json:"client"`
	Route     string    `json:"route"`
	Pool      string    `json:"pool"`
	Backend   string    `json:"backend"`
	Status    int       `json:"status"`
	Dataplane string    `json:"dataplane"`
	BytesIn   uint64    `json:"bytes_in"`
	BytesOut  uint64    `json:"bytes_out"`
	Duration  string    `json:"duration"`
	Reason    string    `json:"reason"`
}

func readAccess(t *testing.T, path string) []accessLine {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []accessLine
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		var l accessLine
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatalf("access log line %q: %v", line, err)
		}
		out = append(out, l)
	}
	return out
}

// waitAccess waits for the close line of the connection from client.
func waitAccess(t *testing.T, path, client string) accessLine {
	t.Helper()
	var found accessLine
	eventually(t, "access line of "+client, func() (bool, string) {
		for _, l := range readAccess(t, path) {
			if l.Client == client && l.Reason != string(reasonOpen) {
				found = l
				return true, ""
			}
		}
		return false, "no line"
	})
	return found
}

// TestAccessLogReasons closes a connection in every way and checks each
// one's access-log line, then the periodic line of a long-lived one.
func TestAccessLogReasons(t *testing.T) {
	be := echoBackend(t)
	cfg := epConfig(t, "splice", be)
	cfg.Log.AccessInterval = config.Duration(150 * time.Millisecond)
	e := startEP(t, cfg)
	ac := admin.NewClient(e.socket)
	defer ac.Close()

	for _, tc := range []struct {
		reason   string
		listener string
		sent     string // bytes the client sends (echoed unless a command)
		echoed   bool
		close    func(t *testing.T, c *wsClient)
	}{
		{"client_fin", "ws", "hello", true, func(t *testing.T, c *wsClient) {
			c.CloseWrite()
			io.Copy(io.Discard, c.br)
			c.Close()
		}},
		{"backend_fin", "ws", "FIN!", false, func(t *testing.T, c *wsClient) {
			io.Copy(io.Discard, c.br) // the backend's FIN arrives
			c.Close()
		}},
		{"client_reset", "ws", "hello", true, func(t *testing.T, c *wsClient) {
			c.SetLinger(0)
			c.Close()
		}},
		{"backend_reset", "ws", "RST!", false, func(t *testing.T, c *wsClient) {
			io.Copy(io.Discard, c.br)
			c.Close()
		}},
		{"idle_timeout", "idle", "hello", true, func(t *testing.T, c *wsClient) {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			io.Copy(io.Discard, c.br) // the agent closes after 300ms of silence
			c.Close()
		}},
		{"kill", "ws", "hello", true, func(t *testing.T, c *wsClient) {
			cs, err := ac.Conns(context.Background(), admin.ConnQuery{Client: c.LocalAddr().String()})
			if err != nil || len(cs) != 1 {
				t.Fatalf("finding the connection to kill: %v %v", cs, err)
			}
			if err := ac.Kill(context.Background(), cs[0].ID); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			io.Copy(io.Discard, c.br)
			c.Close()
		}},
	} {
		t.Run(tc.reason, func(t *testing.T) {
			c := dialWS(t, e.addr(tc.listener))
			if tc.echoed {
				c.echo(t, []byte(tc.sent))
			} else if _, err := io.WriteString(c, tc.sent); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			tc.close(t, c)
			l := waitAccess(t, e.access, c.LocalAddr().String())
			wantOut := uint64(0)
			if tc.echoed {
				wantOut = uint64(len(tc.sent))
			}
			if l.Reason != tc.reason || l.Listener != tc.listener || l.Route != "/ws/" || l.Pool != "p" || l.Backend != be ||
				l.Status != 101 || l.Dataplane != "splice" || l.BytesIn != uint64(len(tc.sent)) || l.BytesOut != wantOut ||
				l.Msg != "conn" || l.ID == 0 || l.Time.Before(start.Add(-time.Second)) {
				t.Errorf("access line %+v\nwant reason %s, listener %s, route /ws/, backend %s, status 101, splice, %d bytes in, %d out",
					l, tc.reason, tc.listener, be, len(tc.sent), wantOut)
			}
			if d, err := time.ParseDuration(l.Duration); err != nil || d <= 0 {
				t.Errorf("duration %q", l.Duration)
			}
		})
	}

	// A long-lived connection gets periodic "open" lines, then its close
	// line says drain when the agent stops under it.
	c := dialWS(t, e.addr("ws"))
	c.echo(t, []byte("long-lived"))
	client := c.LocalAddr().String()
	eventually(t, "periodic line", func() (bool, string) {
		for _, l := range readAccess(t, e.access) {
			if l.Client == client && l.Reason == string(reasonOpen) {
				if l.BytesIn != 10 || l.BytesOut != 10 || l.Status != 101 {
					return false, fmt.Sprintf("%+v", l)
				}
				return true, ""
			}
		}
		return false, "no open line"
	})
	e.stop(t) // drain_timeout 300ms, then the drain closes it
	if l := waitAccess(t, e.access, client); l.Reason != "drain" || l.BytesIn != 10 {
		t.Errorf("close line at shutdown: %+v, want reason drain", l)
	}
}

// cli runs one operator command in-process against the agent's socket,
// with the root's persistent flags, and returns its output.
func cli(t *testing.T, socket string, args ...string) (string, error) {
	t.Helper()
	root := &cobra.Command{Use: "wsplice", SilenceUsage: true, SilenceErrors: true}
	root.PersistentFlags().StringP("output", "o", "table", "")
	root.PersistentFlags().String("admin-socket", socket, "")
	for _, c := range admin.Commands() {
		root.AddCommand(c())
	}
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func mustCLI(t *testing.T, socket string, args ...string) string {
	t.Helper()
	out, err := cli(t, socket, args...)
	if err != nil {
		t.Fatalf("wsplice %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if os.Getenv("WSPLICE_SHOW_CLI") != "" {
		fmt.Printf("$ wsplice %s\n%s\n", strings.Join(args, " "), out)
	}
	return out
}

// TestCLI runs every operator command against a running agent.
func TestCLI(t *testing.T) {
	be1, be2 := echoBackend(t), echoBackend(t)
	cfg := epConfig(t, "splice", be1, be2)
	e := startEP(t, cfg)
	sock := e.socket

	// Two connections on be1 ("first" picks the first available backend).
	c1 := dialWS(t, e.addr("ws"))
	c1.echo(t, pattern(5000))
	c2 := dialWS(t, e.addr("ws"))
	c2.echo(t, pattern(70))

	out := mustCLI(t, sock, "status")
	for _, want := range []string{"running", "dataplane", "2 established", "p: 2/2 backends up", "metrics"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	var st admin.Status
	if err := json.Unmarshal([]byte(mustCLI(t, sock, "status", "-o", "json")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Connections.Active != 2 || st.Counters.Established != 2 || len(st.Listeners) != 2 || st.PID != os.Getpid() {
		t.Errorf("status json: %+v", st)
	}

	out = mustCLI(t, sock, "conns")
	if n := strings.Count(out, be1); n != 2 || !strings.Contains(out, "RTT(C)") || !strings.Contains(out, "4.9K") {
		t.Errorf("conns table (want 2 rows on %s, 4.9K in):\n%s", be1, out)
	}
	var cs []admin.Conn
	if err := json.Unmarshal([]byte(mustCLI(t, sock, "conns", "-o", "json", "--sort", "in")), &cs); err != nil {
		t.Fatal(err)
	}
	if len(cs) != 2 || cs[0].BytesToBackend != 5000 || cs[0].BytesToClient != 5000 || cs[1].BytesToBackend != 70 {
		t.Fatalf("conns json sorted by in: %+v", cs)
	}
	for _, c := range cs {
		if c.ClientTCP == nil || c.BackendTCP == nil || c.ClientTCP.State != "ESTAB" || c.ClientTCP.RTTMicros == 0 ||
			c.BackendTCP.BytesAcked < 5000 && c.BytesToBackend == 5000 {
			t.Errorf("conn %d TCP detail: client %+v backend %+v", c.ID, c.ClientTCP, c.BackendTCP)
		}
		if c.Status != 101 || c.Dataplane != "splice" || c.Local == "" || c.BackendLocal == "" || c.AgeSeconds <= 0 {
			t.Errorf("conn %+v", c)
		}
	}
	if err := json.Unmarshal([]byte(mustCLI(t, sock, "conns", "-o", "json", "--client", c2.LocalAddr().String())), &cs); err != nil || len(cs) != 1 || cs[0].BytesToBackend != 70 {
		t.Errorf("conns --client: %+v %v", cs, err)
	}
	if err := json.Unmarshal([]byte(mustCLI(t, sock, "conns", "-o", "json", "--backend", be2)), &cs); err != nil || len(cs) != 0 {
		t.Errorf("conns --backend be2: %+v %v", cs, err)
	}
	if err := json.Unmarshal([]byte(mustCLI(t, sock, "conns", "-o", "json", "--route", "/nope")), &cs); err != nil || len(cs) != 0 {
		t.Errorf("conns --route: %+v %v", cs, err)
	}

	// Drain be1: new connections go to be2, be1's stay.
	out = mustCLI(t, sock, "drain", be1)
	if !strings.Contains(out, "draining") {
		t.Errorf("drain output:\n%s", out)
	}
	c3 := dialWS(t, e.addr("ws"))
	c3.echo(t, []byte("after the drain"))
	if err := json.Unmarshal([]byte(mustCLI(t, sock, "conns", "-o", "json", "--backend", be2)), &cs); err != nil || len(cs) != 1 {
		t.Errorf("the new connection should be on %s: %+v %v", be2, cs, err)
	}
	out = mustCLI(t, sock, "backends")
	if !strings.Contains(out, "draining") || !strings.Contains(out, "(admin)") {
		t.Errorf("backends after drain:\n%s", out)
	}
	var bs []admin.Backend
	if err := json.Unmarshal([]byte(mustCLI(t, sock, "backends", "-o", "json")), &bs); err != nil || len(bs) != 2 {
		t.Fatalf("backends json: %v %v", bs, err)
	}
	if bs[0].Address != be1 || bs[0].State != admin.StateDraining || bs[0].Active != 2 || bs[1].Active != 1 || len(bs[0].History) < 2 {
		t.Errorf("backends json: %+v", bs)
	}
	mustCLI(t, sock, "undrain", "p/"+be1)
	out = mustCLI(t, sock, "weight", be2, "5")
	if !strings.Contains(out, "weight 1→5") {
		t.Errorf("weight output:\n%s", out)
	}
	if err := json.Unmarshal([]byte(mustCLI(t, sock, "backends", "-o", "json")), &bs); err != nil || bs[0].State != admin.StateUp || bs[1].Weight != 5 {
		t.Errorf("after undrain and weight: %+v %v", bs, err)
	}

	// Kill c1 by id.
	if err := json.Unmarshal([]byte(mustCLI(t, sock, "conns", "-o", "json", "--client", c1.LocalAddr().String())), &cs); err != nil || len(cs) != 1 {
		t.Fatalf("finding c1: %v %v", cs, err)
	}
	out = mustCLI(t, sock, "kill", fmt.Sprint(cs[0].ID))
	if !strings.Contains(out, fmt.Sprintf("killed connection %d", cs[0].ID)) {
		t.Errorf("kill output: %s", out)
	}
	c1.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, c1.br); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Error("the killed connection stayed open")
	}

	// Errors: unknown names and ids, bad arguments, no agent.
	for _, tc := range []struct {
		args []string
		kind error
	}{
		{[]string{"kill", "999999"}, admin.ErrNotFound},
		{[]string{"drain", "10.255.255.1:1"}, admin.ErrNotFound},
		{[]string{"weight", be2, "1001"}, admin.ErrInvalid},
		{[]string{"weight", be2, "x"}, admin.ErrInvalid},
		{[]string{"conns", "--client", "nope"}, admin.ErrInvalid},
		{[]string{"conns", "--sort", "nope"}, admin.ErrInvalid},
		{[]string{"status", "-o", "yaml"}, admin.ErrInvalid},
		{[]string{"status", "--admin-socket", filepath.Join(t.TempDir(), "none.sock")}, admin.ErrNoAgent},
	} {
		if _, err := cli(t, sock, tc.args...); !errors.Is(err, tc.kind) {
			t.Errorf("wsplice %s: %v, want %v", strings.Join(tc.args, " "), err, tc.kind)
		}
	}
}

// TestSecondAgentRefused: a second agent on the same admin socket fails at
// start, and the first keeps serving.
func TestSecondAgentRefused(t *testing.T) {
	be := echoBackend(t)
	cfg := epConfig(t, "splice", be)
	e := startEP(t, cfg)
	cfg2 := epConfig(t, "splice", be)
	cfg2.Admin.Socket = cfg.Admin.Socket
	cfg2.SetDefaults()
	a2 := &Agent{cfg: cfg2, log: epLogger()}
	// Once Agent.start calls startEndpoints itself, start is what fails.
	err := a2.start()
	if err == nil {
		err = a2.startEndpoints()
	}
	defer func() {
		a2.stopEndpoints()
		if a2.Proxy != nil {
			a2.Proxy.Shutdown(context.Background(), 0)
		}
		a2.stopPlanes()
	}()
	if !errors.Is(err, admin.ErrAgentRunning) {
		t.Fatalf("second agent's endpoints: %v, want ErrAgentRunning", err)
	}
	if _, err := admin.NewClient(e.socket).Status(context.Background()); err != nil {
		t.Fatalf("first agent after the refused second: %v", err)
	}
}
