package metrics

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
)

// fakeSource is a Source driven by the test.
type fakeSource struct {
	mu       sync.Mutex
	conns    []Conn
	backends []Backend
	proxy    ProxyCounters
	draining bool
	sockmap  *SockmapCounters
	smErr    error
	splice   *SpliceStats
	tls      *TLSStats
	panicOn  string
}

func (f *fakeSource) EachConn(fn func(*Conn)) {
	f.mu.Lock()
	conns := append([]Conn(nil), f.conns...)
	p := f.panicOn
	f.mu.Unlock()
	if p == "conns" {
		panic("boom")
	}
	for i := range conns {
		fn(&conns[i])
	}
}

func (f *fakeSource) Backends() []Backend {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.panicOn == "backends" {
		panic("boom")
	}
	return append([]Backend(nil), f.backends...)
}

func (f *fakeSource) Proxy() ProxyCounters {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.proxy
}

func (f *fakeSource) Draining() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.draining
}

func (f *fakeSource) Sockmap() (SockmapCounters, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.smErr != nil {
		return SockmapCounters{}, false, f.smErr
	}
	if f.sockmap == nil {
		return SockmapCounters{}, false, nil
	}
	return *f.sockmap, true, nil
}

func (f *fakeSource) Splice() (SpliceStats, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.splice == nil {
		return SpliceStats{}, false
	}
	return *f.splice, true
}

func (f *fakeSource) TLS() (TLSStats, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.panicOn == "tls" {
		panic("boom")
	}
	if f.tls == nil {
		return TLSStats{}, false
	}
	return *f.tls, true
}

func (f *fakeSource) set(fn func(f *fakeSource)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func conn(id uint64, backend, plane string, in, out uint64) Conn {
	return Conn{
		ID: id, Listener: "ws", Route: "/ws/", Pool: "p", Backend: backend, Dataplane: plane,
		Client: "192.0.2.1:40000", Start: time.Unix(1700000000, 0),
		ToBackend: Flow{Bytes: in, Segments: 1}, ToClient: Flow{Bytes: out, Segments: 2},
	}
}

// TestValues checks the exported values against a known state: live
// connections, one closed connection, backends, proxy and plane counters.
func TestValues(t *testing.T) {
	src := &fakeSource{
		conns: []Conn{conn(1, "10.0.0.1:80", "sockmap", 100, 1000), conn(2, "10.0.0.1:80", "splice", 5, 50)},
		backends: []Backend{
			{Pool: "p", Address: "10.0.0.1:80", Weight: 2, Active: 2, Healthy: true},
			{Pool: "p", Address: "10.0.0.2:80", Weight: 1, Healthy: false, Draining: true, Backup: true},
		},
		proxy: ProxyCounters{Accepted: 10, Established: 3, ConnectFails: 1, PlaneFallbacks: 1,
			Refusals: map[string]uint64{"no_route": 4, "per_ip_rate": 2}},
		sockmap: &SockmapCounters{Active: 1, Demotions: map[string]uint64{"parked": 1}, IntegrityResets: 0, ParkedBytes: 4096},
		splice:  &SpliceStats{Conns: 1, PipesIdle: 2, PipesTotal: 3},
	}
	c := New(src, Options{Version: "v1.2.3"})
	closed := conn(3, "10.0.0.1:80", "sockmap", 7, 70)
	c.ObserveClosed(Closed{Conn: closed, Reason: "client_fin", Duration: 90 * time.Second})

	want := `
# HELP wsplice_bytes_total Payload bytes forwarded after the handshake, by backend and direction (to_backend, to_client).
# TYPE wsplice_bytes_total counter
wsplice_bytes_total{backend="10.0.0.1:80",direction="to_backend",pool="p"} 112
wsplice_bytes_total{backend="10.0.0.1:80",direction="to_client",pool="p"} 1120
# HELP wsplice_connections_active Established connections now, by the data plane they were handed to.
# TYPE wsplice_connections_active gauge
wsplice_connections_active{backend="10.0.0.1:80",dataplane="sockmap",listener="ws",pool="p",route="/ws/"} 1
wsplice_connections_active{backend="10.0.0.1:80",dataplane="splice",listener="ws",pool="p",route="/ws/"} 1
# HELP wsplice_connections_total Connections established (handed to a data plane) since the agent started.
# TYPE wsplice_connections_total counter
wsplice_connections_total{backend="10.0.0.1:80",dataplane="sockmap",listener="ws",pool="p",route="/ws/"} 2
wsplice_connections_total{backend="10.0.0.1:80",dataplane="splice",listener="ws",pool="p",route="/ws/"} 1
# HELP wsplice_connections_closed_total Established connections that closed, by close reason.
# TYPE wsplice_connections_closed_total counter
wsplice_connections_closed_total{backend="10.0.0.1:80",pool="p",reason="client_fin"} 1
# HELP wsplice_refusals_total Connections refused before reaching a backend, by reason.
# TYPE wsplice_refusals_total counter
wsplice_refusals_total{reason="no_route"} 4
wsplice_refusals_total{reason="per_ip_rate"} 2
# HELP wsplice_backend_up 1 if the backend passes health checks and is not configured down, else 0.
# TYPE wsplice_backend_up gauge
wsplice_backend_up{backend="10.0.0.1:80",pool="p"} 1
wsplice_backend_up{backend="10.0.0.2:80",pool="p"} 0
# HELP wsplice_backend_draining 1 while an operator drains the backend (no new connections), else 0.
# TYPE wsplice_backend_draining gauge
wsplice_backend_draining{backend="10.0.0.1:80",pool="p"} 0
wsplice_backend_draining{backend="10.0.0.2:80",pool="p"} 1
# HELP wsplice_sockmap_parked_bytes Estimated bytes parked in the kernel for connections on the kernel path (charged to no socket).
# TYPE wsplice_sockmap_parked_bytes gauge
wsplice_sockmap_parked_bytes 4096
# HELP wsplice_sockmap_demotions_total Connections demoted from the kernel path to splice, by reason (parked, rate, insert).
# TYPE wsplice_sockmap_demotions_total counter
wsplice_sockmap_demotions_total{reason="parked"} 1
# HELP wsplice_splice_pipes Pipes held by the splice plane, by state (idle in the pool, or busy moving bytes).
# TYPE wsplice_splice_pipes gauge
wsplice_splice_pipes{state="busy"} 1
wsplice_splice_pipes{state="idle"} 2
# HELP wsplice_accepted_connections_total TCP connections accepted by the listeners, before limits and the handshake.
# TYPE wsplice_accepted_connections_total counter
wsplice_accepted_connections_total 10
# HELP wsplice_connection_duration_seconds Lifetime of closed connections, from accept to close.
# TYPE wsplice_connection_duration_seconds histogram
wsplice_connection_duration_seconds_bucket{listener="ws",le="0.1"} 0
wsplice_connection_duration_seconds_bucket{listener="ws",le="0.5"} 0
wsplice_connection_duration_seconds_bucket{listener="ws",le="1"} 0
wsplice_connection_duration_seconds_bucket{listener="ws",le="5"} 0
wsplice_connection_duration_seconds_bucket{listener="ws",le="10"} 0
wsplice_connection_duration_seconds_bucket{listener="ws",le="30"} 0
wsplice_connection_duration_seconds_bucket{listener="ws",le="60"} 0
wsplice_connection_duration_seconds_bucket{listener="ws",le="300"} 1
wsplice_connection_duration_seconds_bucket{listener="ws",le="600"} 1
wsplice_connection_duration_seconds_bucket{listener="ws",le="1800"} 1
wsplice_connection_duration_seconds_bucket{listener="ws",le="3600"} 1
wsplice_connection_duration_seconds_bucket{listener="ws",le="7200"} 1
wsplice_connection_duration_seconds_bucket{listener="ws",le="14400"} 1
wsplice_connection_duration_seconds_bucket{listener="ws",le="28800"} 1
wsplice_connection_duration_seconds_bucket{listener="ws",le="86400"} 1
wsplice_connection_duration_seconds_bucket{listener="ws",le="604800"} 1
wsplice_connection_duration_seconds_bucket{listener="ws",le="+Inf"} 1
wsplice_connection_duration_seconds_sum{listener="ws"} 90
wsplice_connection_duration_seconds_count{listener="ws"} 1
# HELP wsplice_build_info Build information of the running agent; the value is 1.
# TYPE wsplice_build_info gauge
`
	names := []string{
		"wsplice_bytes_total", "wsplice_connections_active", "wsplice_connections_total", "wsplice_connections_closed_total",
		"wsplice_refusals_total", "wsplice_backend_up", "wsplice_backend_draining", "wsplice_sockmap_parked_bytes",
		"wsplice_sockmap_demotions_total", "wsplice_splice_pipes", "wsplice_accepted_connections_total",
		"wsplice_connection_duration_seconds",
	}
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), names...); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(c, "wsplice_connection_info"); n != 0 {
		t.Errorf("per-connection series are on by default: %d", n)
	}
	if n := testutil.CollectAndCount(c, "wsplice_build_info"); n != 1 {
		t.Errorf("build_info: %d series", n)
	}
}

// TestMonotonicAcrossClose walks a connection through the window where it
// has left the proxy's table but its close callback has not run yet: the
// totals must never go down, and must be exact once the close is recorded.
func TestMonotonicAcrossClose(t *testing.T) {
	src := &fakeSource{conns: []Conn{conn(1, "b:1", "splice", 1000, 2000)}}
	c := New(src, Options{})
	bytesTo := func() float64 {
		return testutil.ToFloat64(onlyMetric(t, c, "wsplice_bytes_total", `direction="to_backend"`))
	}
	total := func() float64 {
		return testutil.ToFloat64(onlyMetric(t, c, "wsplice_connections_total", ""))
	}
	if got := bytesTo(); got != 1000 {
		t.Fatalf("live bytes = %v, want 1000", got)
	}
	// More bytes, then the connection leaves the table.
	src.set(func(f *fakeSource) { f.conns = nil })
	if got, n := bytesTo(), total(); got != 1000 || n != 1 {
		t.Fatalf("in the gap: bytes %v connections %v, want the last values 1000 and 1", got, n)
	}
	final := conn(1, "b:1", "splice", 1500, 2500)
	c.ObserveClosed(Closed{Conn: final, Reason: "backend_fin", Duration: time.Second})
	if got, n := bytesTo(), total(); got != 1500 || n != 1 {
		t.Fatalf("after close: bytes %v connections %v, want 1500 and 1", got, n)
	}
	// A new connection on the same backend adds to the closed total.
	src.set(func(f *fakeSource) { f.conns = []Conn{conn(2, "b:1", "splice", 10, 0)} })
	if got, n := bytesTo(), total(); got != 1510 || n != 2 {
		t.Fatalf("with a new conn: bytes %v connections %v, want 1510 and 2", got, n)
	}
	// The active gauge of a label set with no live connection is 0, not gone.
	src.set(func(f *fakeSource) { f.conns = nil })
	if got := testutil.ToFloat64(onlyMetric(t, c, "wsplice_connections_active", "")); got != 0 {
		t.Fatalf("active = %v, want 0", got)
	}
}

func TestPerConnectionBound(t *testing.T) {
	src := &fakeSource{}
	for i := range 5 {
		src.conns = append(src.conns, conn(uint64(i+1), "b:1", "splice", uint64(i), 0))
	}
	c := New(src, Options{PerConnection: true, MaxSeries: 3})
	if n := testutil.CollectAndCount(c, "wsplice_connection_info"); n != 3 {
		t.Errorf("connection_info: %d series, want 3", n)
	}
	if n := testutil.CollectAndCount(c, "wsplice_connection_bytes_total"); n != 6 {
		t.Errorf("connection_bytes_total: %d series, want 6", n)
	}
	want := `
# HELP wsplice_connection_series_omitted Established connections left out of the per-connection series by metrics.max_series.
# TYPE wsplice_connection_series_omitted gauge
wsplice_connection_series_omitted 2
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "wsplice_connection_series_omitted"); err != nil {
		t.Error(err)
	}
}

func TestScrapeErrors(t *testing.T) {
	src := &fakeSource{panicOn: "backends", smErr: errFake{}}
	c := New(src, Options{})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	for range 2 {
		if _, err := reg.Gather(); err != nil {
			t.Fatal(err)
		}
	}
	// GatherAndCompare gathers a third time.
	want := `
# HELP wsplice_scrape_errors_total Failures while reading a source of metrics at scrape time (the rest of the scrape still succeeds).
# TYPE wsplice_scrape_errors_total counter
wsplice_scrape_errors_total{source="backends"} 3
wsplice_scrape_errors_total{source="connections"} 0
wsplice_scrape_errors_total{source="proxy"} 0
wsplice_scrape_errors_total{source="sockmap"} 3
wsplice_scrape_errors_total{source="splice"} 0
wsplice_scrape_errors_total{source="tls"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "wsplice_scrape_errors_total"); err != nil {
		t.Error(err)
	}
}

// TestTLS checks the TLS families against known counters: every fallback
// reason is exported (zero until seen, plus any reason the source adds),
// reloads by result, and the copy plane's gauge only while it exists.
func TestTLS(t *testing.T) {
	src := &fakeSource{tls: &TLSStats{
		Handshakes:           42,
		PassthroughFallbacks: map[string]uint64{"no_sni": 3, "malformed": 1},
		Reloads:              2, ReloadFailures: 1,
		CopyPlane: true, CopyConns: 7,
	}}
	c := New(src, Options{})
	want := `
# HELP wsplice_tls_handshakes_total TLS handshakes completed on listeners that terminate TLS (failed ones are in wsplice_refusals_total with a tls_ reason).
# TYPE wsplice_tls_handshakes_total counter
wsplice_tls_handshakes_total 42
# HELP wsplice_tls_passthrough_fallbacks_total ClientHellos a tls_passthrough listener sent to its pool instead of a route, by reason (no_sni, unknown_sni, malformed).
# TYPE wsplice_tls_passthrough_fallbacks_total counter
wsplice_tls_passthrough_fallbacks_total{reason="malformed"} 1
wsplice_tls_passthrough_fallbacks_total{reason="no_sni"} 3
wsplice_tls_passthrough_fallbacks_total{reason="unknown_sni"} 0
# HELP wsplice_tls_certificate_reloads_total Certificate reloads after a file changed, by result (ok, or failed: the previous certificates kept serving).
# TYPE wsplice_tls_certificate_reloads_total counter
wsplice_tls_certificate_reloads_total{result="failed"} 1
wsplice_tls_certificate_reloads_total{result="ok"} 2
# HELP wsplice_copy_connections Connections on the copy plane (TLS-terminated or TLS to the backend).
# TYPE wsplice_copy_connections gauge
wsplice_copy_connections 7
`
	names := []string{"wsplice_tls_handshakes_total", "wsplice_tls_passthrough_fallbacks_total",
		"wsplice_tls_certificate_reloads_total", "wsplice_copy_connections"}
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), names...); err != nil {
		t.Fatal(err)
	}

	// No copy plane: the gauge is gone, the counters stay.
	src.set(func(f *fakeSource) { f.tls.CopyPlane, f.tls.CopyConns = false, 0 })
	if n := testutil.CollectAndCount(c, "wsplice_copy_connections"); n != 0 {
		t.Errorf("copy_connections without a copy plane: %d series", n)
	}
	if n := testutil.CollectAndCount(c, "wsplice_tls_certificate_reloads_total"); n != 2 {
		t.Errorf("certificate_reloads_total: %d series, want 2", n)
	}

	// A source without TLS exports none of the families.
	src.set(func(f *fakeSource) { f.tls = nil })
	for _, n := range names {
		if k := testutil.CollectAndCount(c, n); k != 0 {
			t.Errorf("%s without TLS: %d series", n, k)
		}
	}

	// A panicking source is a scrape error of source "tls".
	src.set(func(f *fakeSource) { f.panicOn = "tls" })
	want = `
# HELP wsplice_scrape_errors_total Failures while reading a source of metrics at scrape time (the rest of the scrape still succeeds).
# TYPE wsplice_scrape_errors_total counter
wsplice_scrape_errors_total{source="backends"} 0
wsplice_scrape_errors_total{source="connections"} 0
wsplice_scrape_errors_total{source="proxy"} 0
wsplice_scrape_errors_total{source="sockmap"} 0
wsplice_scrape_errors_total{source="splice"} 0
wsplice_scrape_errors_total{source="tls"} 1
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "wsplice_scrape_errors_total"); err != nil {
		t.Error(err)
	}
}

type errFake struct{}

func (errFake) Error() string { return "fake" }

// TestLint runs promlint over everything the agent's registry exports,
// with every optional family present.
func TestLint(t *testing.T) {
	src := &fakeSource{
		conns:    []Conn{conn(1, "b:1", "sockmap", 1, 1)},
		backends: []Backend{{Pool: "p", Address: "b:1", Healthy: true}},
		proxy:    ProxyCounters{Refusals: map[string]uint64{"no_route": 1}},
		sockmap:  &SockmapCounters{Demotions: map[string]uint64{"parked": 1}},
		splice:   &SpliceStats{},
		tls:      &TLSStats{Handshakes: 1, CopyPlane: true},
	}
	c := New(src, Options{PerConnection: true})
	c.ObserveEstablished(Established{Listener: "ws", Pool: "p", Backend: "b:1", Handshake: time.Millisecond, Connect: time.Millisecond})
	c.ObserveClosed(Closed{Conn: conn(9, "b:1", "sockmap", 1, 1), Reason: "kill", Duration: time.Second})
	reg := NewRegistry(c)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	// Every descriptor is exported in this state, so none escapes the lint.
	seen := map[string]bool{}
	for _, mf := range mfs {
		seen[mf.GetName()] = true
	}
	for _, d := range allDescs {
		name := descName(d)
		if !seen[name] {
			t.Errorf("%s was not exported, so it was not linted", name)
		}
	}
}

// descName extracts fqName from a Desc's String form.
func descName(d *prometheus.Desc) string {
	s := d.String()
	_, after, _ := strings.Cut(s, `fqName: "`)
	name, _, _ := strings.Cut(after, `"`)
	return name
}

// onlyMetric returns a collector exporting the one series of name whose
// labels contain match.
func onlyMetric(t *testing.T, c prometheus.Collector, name, match string) prometheus.Collector {
	t.Helper()
	ch := make(chan prometheus.Metric, 1000)
	c.Collect(ch)
	close(ch)
	var found []prometheus.Metric
	for m := range ch {
		if descName(m.Desc()) != name || !strings.Contains(m.Desc().String()+metricLabels(m), match) {
			continue
		}
		found = append(found, m)
	}
	if len(found) != 1 {
		t.Fatalf("%s{%s}: %d series, want 1", name, match, len(found))
	}
	return constCollector{found[0]}
}

func metricLabels(m prometheus.Metric) string {
	var sb strings.Builder
	var pb dto.Metric
	if err := m.Write(&pb); err == nil {
		for _, l := range pb.Label {
			sb.WriteString(l.GetName() + `="` + l.GetValue() + `",`)
		}
	}
	return sb.String()
}

type constCollector struct{ m prometheus.Metric }

func (c constCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.m.Desc() }
func (c constCollector) Collect(ch chan<- prometheus.Metric) { ch <- c.m }
