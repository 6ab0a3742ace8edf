// Package metrics exposes wsplice to Prometheus. Nothing is counted per
// packet: the Collector reads the agent's own counters (connection table,
// data-plane counters read from BPF maps or the splice plane, proxy
// counters, pool state) when it is scraped. Only what cannot be read later
// is recorded as it happens: the handshake and backend connect times of a
// new connection, and the final counters of a closed one, so that totals
// stay monotonic after the connection is gone.
package metrics

import (
	"net/http"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const namespace = "wsplice"

// DefaultMaxSeries bounds the per-connection series when Options.MaxSeries
// is 0.
const DefaultMaxSeries = 1000

// Options configure a Collector.
type Options struct {
	// PerConnection adds series labelled with connection ids, for at most
	// MaxSeries connections (the oldest). Off by default: a label per
	// connection is unbounded cardinality for Prometheus.
	PerConnection bool
	MaxSeries     int
	// Version is the build_info version label; empty reads the module's
	// build information.
	Version string
}

// Established is what ObserveEstablished records of a new connection.
type Established struct {
	Listener  string
	Pool      string
	Backend   string
	Handshake time.Duration // accept → handed to the data plane
	Connect   time.Duration // backend TCP connect of the successful try; 0 if unknown
}

// Closed is what ObserveClosed records of a connection that ended: its
// labels and final counters, why it closed and how long it lived.
type Closed struct {
	Conn     Conn
	Reason   string
	Duration time.Duration
}

// Collector is the agent's Prometheus collector. It is safe for concurrent
// use: scrapes may overlap each other and the Observe calls.
type Collector struct {
	src  Source
	opts Options

	version, revision string

	handshake *prometheus.HistogramVec
	duration  *prometheus.HistogramVec
	connect   *prometheus.HistogramVec

	mu sync.Mutex
	// Accumulated at close: the final counters of closed connections.
	closedConns   map[connKey]uint64
	closedFlows   map[beKey][2]Flow
	closedReasons map[reasonKey]uint64
	// The value last exported for each counter built from closed + live,
	// so that a connection caught between the table and its close
	// callback never makes a total go down (see Collect).
	lastConns map[connKey]uint64
	lastFlows map[beKey][2]Flow
	errors    map[string]uint64
}

type connKey struct{ listener, route, pool, backend, dataplane string }

type beKey struct{ pool, backend string }

type reasonKey struct{ pool, backend, reason string }

// Sources of scrape errors (wsplice_scrape_errors_total's source label).
const (
	srcConns    = "connections"
	srcBackends = "backends"
	srcProxy    = "proxy"
	srcSockmap  = "sockmap"
	srcSplice   = "splice"
	srcTLS      = "tls"
)

var errorSources = []string{srcConns, srcBackends, srcProxy, srcSockmap, srcSplice, srcTLS}

// New returns a Collector reading src.
func New(src Source, opts Options) *Collector {
	if opts.MaxSeries <= 0 {
		opts.MaxSeries = DefaultMaxSeries
	}
	c := &Collector{
		src: src, opts: opts,
		handshake: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "handshake_duration_seconds",
			Help:    "Time from accept to the hand-off to a data plane (request head, routing, backend connect, response head), per established connection.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"listener"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "connection_duration_seconds",
			Help:    "Lifetime of closed connections, from accept to close.",
			Buckets: []float64{.1, .5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 604800},
		}, []string{"listener"}),
		connect: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "backend_connect_duration_seconds",
			Help:    "Backend TCP connect time of established connections.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"pool", "backend"}),
		closedConns:   map[connKey]uint64{},
		closedFlows:   map[beKey][2]Flow{},
		closedReasons: map[reasonKey]uint64{},
		lastConns:     map[connKey]uint64{},
		lastFlows:     map[beKey][2]Flow{},
		errors:        map[string]uint64{},
	}
	c.version, c.revision = buildInfo(opts.Version)
	return c
}

// NewRegistry returns the agent's own registry (never the global one) with
// c, the Go runtime and the process collectors (open file descriptors
// matter to a balancer).
func NewRegistry(c *Collector) *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(c, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// Handler serves reg in the Prometheus text format. Errors of individual
// collectors are reported in the response, not as a failed scrape.
func Handler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError, Registry: reg})
}

// ObserveEstablished records the handshake and connect times of a
// connection that was just handed to a data plane.
func (c *Collector) ObserveEstablished(e Established) {
	c.handshake.WithLabelValues(e.Listener).Observe(e.Handshake.Seconds())
	if e.Connect > 0 {
		c.connect.WithLabelValues(e.Pool, e.Backend).Observe(e.Connect.Seconds())
	}
}

// ObserveClosed records a closed connection: its final byte and segment
// counts join the totals, its lifetime the duration histogram. It must be
// called exactly once for every connection that was established.
func (c *Collector) ObserveClosed(cl Closed) {
	k := cl.Conn
	c.duration.WithLabelValues(k.Listener).Observe(cl.Duration.Seconds())
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closedConns[connKey{k.Listener, k.Route, k.Pool, k.Backend, k.Dataplane}]++
	c.closedReasons[reasonKey{k.Pool, k.Backend, cl.Reason}]++
	bk := beKey{k.Pool, k.Backend}
	f := c.closedFlows[bk]
	f[0] = add(f[0], k.ToBackend)
	f[1] = add(f[1], k.ToClient)
	c.closedFlows[bk] = f
}

func add(a, b Flow) Flow { return Flow{Bytes: a.Bytes + b.Bytes, Segments: a.Segments + b.Segments} }

func maxFlow(a, b Flow) Flow {
	return Flow{Bytes: max(a.Bytes, b.Bytes), Segments: max(a.Segments, b.Segments)}
}

// The descriptors. Labels are fixed here; their values come from the
// config (listener, route, pool, backend) or from small fixed sets.
var (
	connLabels = []string{"listener", "route", "pool", "backend", "dataplane"}
	beLabels   = []string{"pool", "backend"}

	descBuildInfo = desc("build_info", "Build information of the running agent; the value is 1.", "version", "revision", "goversion")
	descDraining  = desc("draining", "1 while the agent drains for shutdown (readiness is false), else 0.")
	descAccepted  = desc("accepted_connections_total", "TCP connections accepted by the listeners, before limits and the handshake.")
	descActive    = desc("connections_active", "Established connections now, by the data plane they were handed to.", connLabels...)
	descTotal     = desc("connections_total", "Connections established (handed to a data plane) since the agent started.", connLabels...)
	descClosed    = desc("connections_closed_total", "Established connections that closed, by close reason.", "pool", "backend", "reason")
	descRefusals  = desc("refusals_total", "Connections refused before reaching a backend, by reason.", "reason")
	descConnFail  = desc("backend_connect_failures_total", "Backend connect attempts that failed (each try counts).")
	descFallbacks = desc("dataplane_fallbacks_total", "Connections the sockmap plane refused at start that went to splice instead.")
	descBytes     = desc("bytes_total", "Payload bytes forwarded after the handshake, by backend and direction (to_backend, to_client).", "pool", "backend", "direction")
	descSegments  = desc("segments_total", "Segments (sockmap: skbs; splice: reads) that carried the forwarded bytes, by backend and direction.", "pool", "backend", "direction")

	descBackendUp       = desc("backend_up", "1 if the backend passes health checks and is not configured down, else 0.", beLabels...)
	descBackendDraining = desc("backend_draining", "1 while an operator drains the backend (no new connections), else 0.", beLabels...)
	descBackendWeight   = desc("backend_weight", "The backend's effective weight.", beLabels...)
	descBackendActive   = desc("backend_active_connections", "Connections counted on the backend (established and connecting).", beLabels...)
	descBackendBackup   = desc("backend_backup", "1 if the backend is a backup (takes traffic only when no primary can), else 0.", beLabels...)

	descSpliceConns = desc("splice_connections", "Connections on the splice plane, including those demoted from sockmap.")
	descSplicePipes = desc("splice_pipes", "Pipes held by the splice plane, by state (idle in the pool, or busy moving bytes).", "state")

	descSMConns        = desc("sockmap_connections", "Connections started on the sockmap plane and still open, by state (kernel path, or demoted to splice).", "state")
	descSMDemotions    = desc("sockmap_demotions_total", "Connections demoted from the kernel path to splice, by reason (parked, rate, insert).", "reason")
	descSMDemoteFail   = desc("sockmap_demote_failures_total", "Demotions that ended in a reset of both sides (other than integrity).")
	descSMIntegrity    = desc("sockmap_integrity_resets_total", "Hand-offs from the kernel whose byte counts did not add up; both sides were reset.")
	descSMInsertFail   = desc("sockmap_insert_failures_total", "Sockhash insertions that failed (the socket had FIN, the map was full...).")
	descSMRedirectFail = desc("sockmap_redirect_failures_total", "Segments the verdict program dropped because the peer socket was missing.")
	descSMRedirectRst  = desc("sockmap_redirect_resets_total", "Connections reset because a redirect failed.")
	descSMParked       = desc("sockmap_parked_bytes", "Estimated bytes parked in the kernel for connections on the kernel path (charged to no socket).")
	descSMIterPasses   = desc("sockmap_iterator_passes_total", "iter/tcp passes run to take sockets out of the verdict map under their locks.")
	descSMIterSeconds  = desc("sockmap_iterator_seconds_total", "Time spent in iter/tcp passes.")
	descSMDrainSeconds = desc("sockmap_demotion_drain_seconds_total", "Time demoted connections waited for their parked bytes to drain before the hand-off.")

	descTLSHandshakes = desc("tls_handshakes_total", "TLS handshakes completed on listeners that terminate TLS (failed ones are in wsplice_refusals_total with a tls_ reason).")
	descTLSFallbacks  = desc("tls_passthrough_fallbacks_total", "ClientHellos a tls_passthrough listener sent to its pool instead of a route, by reason (no_sni, unknown_sni, malformed).", "reason")
	descTLSReloads    = desc("tls_certificate_reloads_total", "Certificate reloads after a file changed, by result (ok, or failed: the previous certificates kept serving).", "result")
	descCopyConns     = desc("copy_connections", "Connections on the copy plane (TLS-terminated or TLS to the backend).")

	descScrapeErrors = desc("scrape_errors_total", "Failures while reading a source of metrics at scrape time (the rest of the scrape still succeeds).", "source")

	descConnInfo    = desc("connection_info", "One series per established connection (per_connection only); the value is 1.", "id", "client", "listener", "route", "pool", "backend", "dataplane")
	descConnBytes   = desc("connection_bytes_total", "Bytes forwarded by one connection, by direction (per_connection only).", "id", "direction")
	descConnStart   = desc("connection_start_time_seconds", "Unix time at which one connection was accepted (per_connection only).", "id")
	descConnOmitted = desc("connection_series_omitted", "Established connections left out of the per-connection series by metrics.max_series.")
)

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", name), help, labels, nil)
}

var allDescs = []*prometheus.Desc{
	descBuildInfo, descDraining, descAccepted, descActive, descTotal, descClosed, descRefusals, descConnFail,
	descFallbacks, descBytes, descSegments, descBackendUp, descBackendDraining, descBackendWeight,
	descBackendActive, descBackendBackup, descSpliceConns, descSplicePipes, descSMConns, descSMDemotions,
	descSMDemoteFail, descSMIntegrity, descSMInsertFail, descSMRedirectFail, descSMRedirectRst, descSMParked,
	descSMIterPasses, descSMIterSeconds, descSMDrainSeconds, descTLSHandshakes, descTLSFallbacks, descTLSReloads,
	descCopyConns, descScrapeErrors, descConnInfo, descConnBytes,
	descConnStart, descConnOmitted,
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
	c.handshake.Describe(ch)
	c.duration.Describe(ch)
	c.connect.Describe(ch)
}

// Collect implements prometheus.Collector: it reads every source now.
//
// Totals that include live connections (connections_total, bytes_total,
// segments_total) are closed + live. The proxy removes a connection from
// its table just before the close callback runs, and the data plane
// forgets it just before that, so a scrape can see a connection in neither
// place. Reading the closed totals before the live ones guarantees a
// connection is never counted twice; the brief gap where it is counted
// nowhere is hidden by never exporting less than the last value exported.
// The exported value can lag by one connection's bytes for one scrape; it
// never goes down (which Prometheus would read as a counter reset).
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(descBuildInfo, prometheus.GaugeValue, 1, c.version, c.revision, runtime.Version())

	c.mu.Lock()
	closedConns := clone(c.closedConns)
	closedFlows := clone(c.closedFlows)
	reasons := clone(c.closedReasons)
	c.mu.Unlock()

	liveConns := map[connKey]uint64{}
	liveFlows := map[beKey][2]Flow{}
	c.guard(srcConns, func() { c.collectConns(ch, liveConns, liveFlows) })

	c.mu.Lock()
	conns := c.monotonicConns(closedConns, liveConns)
	flows := c.monotonicFlows(closedFlows, liveFlows)
	c.mu.Unlock()

	for k, v := range conns {
		lv := []string{k.listener, k.route, k.pool, k.backend, k.dataplane}
		ch <- prometheus.MustNewConstMetric(descTotal, prometheus.CounterValue, float64(v), lv...)
		ch <- prometheus.MustNewConstMetric(descActive, prometheus.GaugeValue, float64(liveConns[k]), lv...)
	}
	for k, f := range flows {
		for i, dir := range []string{ToBackend, ToClient} {
			ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(f[i].Bytes), k.pool, k.backend, dir)
			ch <- prometheus.MustNewConstMetric(descSegments, prometheus.CounterValue, float64(f[i].Segments), k.pool, k.backend, dir)
		}
	}
	for k, v := range reasons {
		ch <- prometheus.MustNewConstMetric(descClosed, prometheus.CounterValue, float64(v), k.pool, k.backend, k.reason)
	}

	c.guard(srcProxy, func() { c.collectProxy(ch) })
	c.guard(srcBackends, func() { c.collectBackends(ch) })
	c.guard(srcSplice, func() { c.collectSplice(ch) })
	c.guard(srcSockmap, func() { c.collectSockmap(ch) })
	c.guard(srcTLS, func() { c.collectTLS(ch) })

	c.handshake.Collect(ch)
	c.duration.Collect(ch)
	c.connect.Collect(ch)

	c.mu.Lock()
	for _, s := range errorSources {
		ch <- prometheus.MustNewConstMetric(descScrapeErrors, prometheus.CounterValue, float64(c.errors[s]), s)
	}
	c.mu.Unlock()
}

// guard runs one part of a scrape; a panic in a source counts as a scrape
// error of that source instead of killing the agent (the registry runs
// collectors on their own goroutines, where a panic is fatal).
func (c *Collector) guard(source string, fn func()) {
	defer func() {
		if r := recover(); r != nil {
			c.countError(source)
		}
	}()
	fn()
}

func (c *Collector) countError(source string) {
	c.mu.Lock()
	c.errors[source]++
	c.mu.Unlock()
}

// collectConns walks the live connections once: active gauges, live
// counters, and the per-connection series when enabled.
func (c *Collector) collectConns(ch chan<- prometheus.Metric, live map[connKey]uint64, flows map[beKey][2]Flow) {
	perConn, exported, omitted := c.opts.PerConnection, 0, 0
	c.src.EachConn(func(cn *Conn) {
		live[connKey{cn.Listener, cn.Route, cn.Pool, cn.Backend, cn.Dataplane}]++
		bk := beKey{cn.Pool, cn.Backend}
		f := flows[bk]
		f[0] = add(f[0], cn.ToBackend)
		f[1] = add(f[1], cn.ToClient)
		flows[bk] = f
		if !perConn {
			return
		}
		if exported >= c.opts.MaxSeries {
			omitted++
			return
		}
		exported++
		id := strconv.FormatUint(cn.ID, 10)
		ch <- prometheus.MustNewConstMetric(descConnInfo, prometheus.GaugeValue, 1, id, cn.Client, cn.Listener, cn.Route, cn.Pool, cn.Backend, cn.Dataplane)
		ch <- prometheus.MustNewConstMetric(descConnBytes, prometheus.CounterValue, float64(cn.ToBackend.Bytes), id, ToBackend)
		ch <- prometheus.MustNewConstMetric(descConnBytes, prometheus.CounterValue, float64(cn.ToClient.Bytes), id, ToClient)
		ch <- prometheus.MustNewConstMetric(descConnStart, prometheus.GaugeValue, float64(cn.Start.UnixNano())/1e9, id)
	})
	if perConn {
		ch <- prometheus.MustNewConstMetric(descConnOmitted, prometheus.GaugeValue, float64(omitted))
	}
}

// monotonicConns returns closed + live for every known label set, never
// less than last time. Called with c.mu held.
func (c *Collector) monotonicConns(closed, live map[connKey]uint64) map[connKey]uint64 {
	for k, v := range closed {
		c.lastConns[k] = max(c.lastConns[k], v+live[k])
	}
	for k, v := range live {
		if _, ok := closed[k]; !ok {
			c.lastConns[k] = max(c.lastConns[k], v)
		}
	}
	return clone(c.lastConns)
}

// monotonicFlows is monotonicConns for bytes and segments. Called with
// c.mu held.
func (c *Collector) monotonicFlows(closed, live map[beKey][2]Flow) map[beKey][2]Flow {
	upd := func(k beKey, v [2]Flow) {
		last := c.lastFlows[k]
		c.lastFlows[k] = [2]Flow{maxFlow(last[0], v[0]), maxFlow(last[1], v[1])}
	}
	for k, v := range closed {
		l := live[k]
		upd(k, [2]Flow{add(v[0], l[0]), add(v[1], l[1])})
	}
	for k, v := range live {
		if _, ok := closed[k]; !ok {
			upd(k, v)
		}
	}
	return clone(c.lastFlows)
}

func (c *Collector) collectProxy(ch chan<- prometheus.Metric) {
	p := c.src.Proxy()
	ch <- prometheus.MustNewConstMetric(descAccepted, prometheus.CounterValue, float64(p.Accepted))
	ch <- prometheus.MustNewConstMetric(descConnFail, prometheus.CounterValue, float64(p.ConnectFails))
	ch <- prometheus.MustNewConstMetric(descFallbacks, prometheus.CounterValue, float64(p.PlaneFallbacks))
	for _, r := range sortedKeys(p.Refusals) {
		ch <- prometheus.MustNewConstMetric(descRefusals, prometheus.CounterValue, float64(p.Refusals[r]), r)
	}
	ch <- prometheus.MustNewConstMetric(descDraining, prometheus.GaugeValue, b2f(c.src.Draining()))
}

func (c *Collector) collectBackends(ch chan<- prometheus.Metric) {
	for _, b := range c.src.Backends() {
		ch <- prometheus.MustNewConstMetric(descBackendUp, prometheus.GaugeValue, b2f(b.Healthy && !b.Down), b.Pool, b.Address)
		ch <- prometheus.MustNewConstMetric(descBackendDraining, prometheus.GaugeValue, b2f(b.Draining), b.Pool, b.Address)
		ch <- prometheus.MustNewConstMetric(descBackendWeight, prometheus.GaugeValue, float64(b.Weight), b.Pool, b.Address)
		ch <- prometheus.MustNewConstMetric(descBackendActive, prometheus.GaugeValue, float64(b.Active), b.Pool, b.Address)
		ch <- prometheus.MustNewConstMetric(descBackendBackup, prometheus.GaugeValue, b2f(b.Backup), b.Pool, b.Address)
	}
}

func (c *Collector) collectSplice(ch chan<- prometheus.Metric) {
	s, ok := c.src.Splice()
	if !ok {
		return
	}
	ch <- prometheus.MustNewConstMetric(descSpliceConns, prometheus.GaugeValue, float64(s.Conns))
	ch <- prometheus.MustNewConstMetric(descSplicePipes, prometheus.GaugeValue, float64(s.PipesIdle), "idle")
	ch <- prometheus.MustNewConstMetric(descSplicePipes, prometheus.GaugeValue, float64(max(s.PipesTotal-s.PipesIdle, 0)), "busy")
}

func (c *Collector) collectSockmap(ch chan<- prometheus.Metric) {
	s, ok, err := c.src.Sockmap()
	if err != nil {
		c.countError(srcSockmap)
		return
	}
	if !ok {
		return
	}
	gauge := func(d *prometheus.Desc, v float64, lv ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, lv...)
	}
	counter := func(d *prometheus.Desc, v float64, lv ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, lv...)
	}
	gauge(descSMConns, float64(s.Active), "kernel")
	gauge(descSMConns, float64(s.Demoted), "demoted")
	for _, r := range sortedKeys(s.Demotions) {
		counter(descSMDemotions, float64(s.Demotions[r]), r)
	}
	counter(descSMDemoteFail, float64(s.DemoteFailures))
	counter(descSMIntegrity, float64(s.IntegrityResets))
	counter(descSMInsertFail, float64(s.InsertFailures))
	counter(descSMRedirectFail, float64(s.RedirectFailures))
	counter(descSMRedirectRst, float64(s.RedirectResets))
	gauge(descSMParked, float64(max(s.ParkedBytes, 0)))
	counter(descSMIterPasses, float64(s.IterPasses))
	counter(descSMIterSeconds, s.IterTime.Seconds())
	counter(descSMDrainSeconds, s.DrainTime.Seconds())
}

func (c *Collector) collectTLS(ch chan<- prometheus.Metric) {
	t, ok := c.src.TLS()
	if !ok {
		return
	}
	counter := func(d *prometheus.Desc, v uint64, lv ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), lv...)
	}
	counter(descTLSHandshakes, t.Handshakes)
	reasons := map[string]uint64{}
	for _, r := range TLSFallbackReasons {
		reasons[r] = 0
	}
	for r, v := range t.PassthroughFallbacks {
		reasons[r] = v
	}
	for _, r := range sortedKeys(reasons) {
		counter(descTLSFallbacks, reasons[r], r)
	}
	counter(descTLSReloads, t.Reloads, "ok")
	counter(descTLSReloads, t.ReloadFailures, "failed")
	if t.CopyPlane {
		ch <- prometheus.MustNewConstMetric(descCopyConns, prometheus.GaugeValue, float64(max(t.CopyConns, 0)))
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func clone[K comparable, V any](m map[K]V) map[K]V {
	out := make(map[K]V, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// buildInfo returns the version and VCS revision of the running binary.
func buildInfo(version string) (string, string) {
	rev := ""
	bi, ok := debug.ReadBuildInfo()
	if ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				rev = s.Value
			}
		}
	}
	if version == "" {
		switch {
		case ok && bi.Main.Version != "" && bi.Main.Version != "(devel)":
			version = bi.Main.Version
		case len(rev) >= 12:
			version = "devel-" + rev[:12]
		default:
			version = "devel"
		}
	}
	return version, rev
}

// Version returns the version the build_info metric reports when
// Options.Version is empty.
func Version() string { v, _ := buildInfo(""); return v }

var _ prometheus.Collector = (*Collector)(nil)
