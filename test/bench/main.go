// Command bench is wsplice's benchmark harness (make bench, make
// bench-quick). It starts echo backends, each target in turn — direct (no
// proxy), wsplice on sockmap and on splice, nginx and HAProxy from the
// distribution — and a lean load generator, interleaves the targets and
// repeats, writes every measurement as a JSON line and prints markdown
// tables with ratios against direct and nginx.
//
// The generator, the idle-connection holder and the backends are this same
// binary re-executed with -role, so each has its own CPU accounting and its
// own file descriptors (the proxy needs two per connection, the others one).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// bgCtx is the harness's context; cancelled on SIGINT/SIGTERM.
var bgCtx = context.Background()

// Result is one measurement, written as one JSON line.
type Result struct {
	Kind   string `json:"kind"` // "result"
	Round  int    `json:"round"`
	Target string `json:"target"`
	Test   string `json:"test"` // echo, bulk, hs, idle, slow, chatty
	Conns  int    `json:"conns"`
	Size   int    `json:"size,omitempty"`

	DurS float64 `json:"dur_s,omitempty"`
	// BgBusy is the machine's busy share sampled just before the run;
	// Noisy marks runs that went ahead above the threshold after waiting.
	BgBusy  float64 `json:"bg_busy"`
	WaitedS float64 `json:"waited_s,omitempty"`
	Noisy   bool    `json:"noisy,omitempty"`
	// MachineBusy is the machine's busy share during the run.
	MachineBusy float64 `json:"machine_busy,omitempty"`
	// OtherLoad estimates the share of the machine used by processes that
	// are not part of the run, during the run (busy minus attributed).
	OtherLoad float64 `json:"other_load,omitempty"`
	Errors    int     `json:"errors"`
	Note      string  `json:"note,omitempty"`

	Msgs     int64   `json:"msgs,omitempty"`
	MsgsPerS float64 `json:"msgs_per_s,omitempty"`
	P50us    float64 `json:"p50_us,omitempty"`
	P99us    float64 `json:"p99_us,omitempty"`
	P999us   float64 `json:"p999_us,omitempty"`

	// Bytes is what the backends read in the window; AckMBps is the rate
	// of the acks that came back over the reverse direction.
	Bytes   int64   `json:"bytes,omitempty"`
	MBps    float64 `json:"mb_per_s,omitempty"`
	AckMBps float64 `json:"ack_mb_per_s,omitempty"`

	Handshakes int64   `json:"handshakes,omitempty"`
	HsPerS     float64 `json:"hs_per_s,omitempty"`
	HsP50ms    float64 `json:"hs_p50_ms,omitempty"`
	HsP99ms    float64 `json:"hs_p99_ms,omitempty"`

	// CPUBusyS is whole-machine busy CPU seconds in the window (/proc/stat);
	// CPUAttrS is the CPU of the generator, backends, proxy and every kernel
	// thread plus irq/softirq time: what other load on a shared machine
	// does not inflate (much).
	CPUBusyS       float64 `json:"cpu_busy_s,omitempty"`
	CPUAttrS       float64 `json:"cpu_attr_s,omitempty"`
	CPUMsPerMB     float64 `json:"cpu_ms_per_mb,omitempty"`
	CPUAttrMsPerMB float64 `json:"cpu_attr_ms_per_mb,omitempty"`
	CPUUsPerHs     float64 `json:"cpu_us_per_hs,omitempty"`
	CPUAttrUsPerHs float64 `json:"cpu_attr_us_per_hs,omitempty"`

	// Chatty test: each connection sends a message every PeriodMs
	// (jittered) and waits for its echo. ProxyPID is set when there is a
	// proxy (not direct); then an absent proxy_* figure means 0.
	// ProxyCPUS is user+sys of the proxy and its descendants (nginx's
	// workers) from /proc/PID/stat; KthreadCPUS is every kernel thread's
	// (kernel workers, ksoftirqd: whole machine, not only ours). The
	// per-message figures are ms per 1000 messages (= µs per message).
	PeriodMs         float64 `json:"period_ms,omitempty"`
	ConnectS         float64 `json:"connect_s,omitempty"`
	ProxyPID         int     `json:"proxy_pid,omitempty"`
	ProxyCPUS        float64 `json:"proxy_cpu_s,omitempty"`
	ProxyCPUPct      float64 `json:"proxy_cpu_pct,omitempty"` // % of one CPU
	KthreadCPUS      float64 `json:"kthread_cpu_s,omitempty"`
	GenCPUPct        float64 `json:"gen_cpu_pct,omitempty"` // the generator's own CPU, % of one CPU (it is pinned to one)
	ProxyMsPerKMsg   float64 `json:"proxy_ms_per_kmsg,omitempty"`
	KthreadMsPerKMsg float64 `json:"kthread_ms_per_kmsg,omitempty"`
	AttrMsPerKMsg    float64 `json:"cpu_attr_ms_per_kmsg,omitempty"`
	CPUMsPerKMsg     float64 `json:"cpu_ms_per_kmsg,omitempty"`

	IdleConns    int     `json:"idle_conns,omitempty"`
	RSSBefore    int64   `json:"rss_before,omitempty"`
	RSSAfter     int64   `json:"rss_after,omitempty"`
	RSSPerConn   float64 `json:"rss_per_conn,omitempty"`
	SlabPerConn  float64 `json:"slab_per_conn,omitempty"`
	UnrecPerConn float64 `json:"sunreclaim_per_conn,omitempty"`
	// SlabObjsPerConn counts slab objects in use (/proc/slabinfo).
	SlabObjsPerConn float64 `json:"slab_objs_per_conn,omitempty"`
	AvailPerConn    float64 `json:"avail_per_conn,omitempty"`

	SentBytes      int64   `json:"sent_bytes,omitempty"`
	AckedBytes     int64   `json:"acked_bytes,omitempty"` // acks the client got by the end of the window
	ReadBytes      int64   `json:"read_bytes,omitempty"`  // what the backend read (its own count)
	PeakAvailDelta int64   `json:"peak_avail_delta,omitempty"`
	PeakSlabDelta  int64   `json:"peak_slab_delta,omitempty"`
	PeakRSSDelta   int64   `json:"peak_rss_delta,omitempty"`
	RecoverS       float64 `json:"recover_s,omitempty"`
	NotRecovered   bool    `json:"not_recovered,omitempty"` // still above baseline + 32 MiB after the longest wait
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		role    = flag.String("role", "", "internal: backend, gen or idle (the harness re-executes itself)")
		quick   = flag.Bool("quick", false, "a shorter run (about 3 minutes): one round, shorter windows, fewer idle and chatty connections")
		out     = flag.String("out", "bench-results.jsonl", "JSON lines output, one line per measurement")
		md      = flag.String("md", "", "also write the markdown report to this file")
		pin     = flag.Bool("pin", true, "pin the generator to CPU 0 and the proxy to CPU 1 (taskset)")
		only    = flag.String("targets", "", "comma-separated target names to run (default: all)")
		rounds  = flag.Int("rounds", 0, "rounds of the interleaved tests (default 3, quick 1)")
		dur     = flag.Duration("dur", 0, "measurement window per run (default 2s, quick 1s)")
		idleN   = flag.Int("idle", 0, "idle connections per target (default 8000, quick 1000)")
		busyMax = flag.Float64("busy", 0.25, "background busy share of the machine above which a run waits and retries")
		tests   = flag.String("tests", "", "comma-separated tests to run: echo1, echo100, bulk1, bulk8, hs, chatty, idle, slow (default: all)")
		chatN   = flag.Int("chatty", 0, "connections of the chatty test (default 4000, quick 1000; capped by the open-file limit)")
		chatDur = flag.Duration("chatty-dur", 0, "measurement window of the chatty test (default 15s, quick 6s)")
		wsBin   = flag.String("wsplice", "", "agent binary (default: go build ./cmd/wsplice into a temporary directory)")

		// Internal flags of the re-executed roles.
		n      = flag.Int("n", 2, "backend: ports to serve")
		test   = flag.String("test", "", "gen: echo, bulk, hs, slow or chatty")
		period = flag.Duration("period", 200*time.Millisecond, "gen chatty: mean time between one connection's messages")
		addr   = flag.String("addr", "", "gen/idle: target address")
		conns  = flag.Int("conns", 1, "gen/idle: connections")
		useTLS = flag.Bool("tls", false, "idle: TLS handshake before the upgrade (TLS-terminating targets)")
		size   = flag.Int("size", 64, "gen: message size")
		warm   = flag.Duration("warm", 300*time.Millisecond, "gen: warm-up before the window")
		pids   = flag.String("pids", "", "gen: PIDs whose CPU is attributed to the run")
		rate   = flag.Int64("rate", 1<<20, "gen slow: reader bytes/s")
		capB   = flag.Int64("cap", 1<<30, "gen slow: most bytes the sender pushes")
		proxy  = flag.Int("proxy", 0, "gen slow: proxy PID for RSS; gen chatty: proxy PID for CPU (with its descendants)")
		stats  = flag.String("stats", "", "gen: the backends' stats address")
		recov  = flag.Duration("recover", 5*time.Second, "gen slow: longest wait for kernel memory to come back after the close")
	)
	flag.Parse()
	switch *role {
	case "backend":
		return runBackend(*n)
	case "idle":
		return runIdle(*addr, *conns, *useTLS)
	case "gen":
		var ps []int
		for _, s := range strings.Split(*pids, ",") {
			if p, err := strconv.Atoi(s); err == nil && p > 0 {
				ps = append(ps, p)
			}
		}
		return runGen(genOpts{test: *test, addr: *addr, conns: *conns, size: *size, dur: *dur, warm: *warm,
			pids: ps, rate: *rate, cap: *capB, proxy: *proxy, stats: *stats, recover: *recov, period: *period})
	case "":
	default:
		return fmt.Errorf("unknown role %q", *role)
	}

	p := defaultPlan(*quick)
	if *rounds > 0 {
		p.rounds = *rounds
	}
	if *dur > 0 {
		p.dur = *dur
	}
	if *idleN > 0 {
		p.idleConns = *idleN
	}
	if *chatN > 0 {
		p.chattyConns = *chatN
	}
	if *chatDur > 0 {
		p.chattyDur = *chatDur
	}
	p.busyMax = *busyMax
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	bgCtx = ctx
	h := &harness{plan: p, pin: *pin, outPath: *out, mdPath: *md, wsplice: *wsBin}
	if *tests != "" {
		h.tests = map[string]bool{}
		for _, s := range strings.Split(*tests, ",") {
			h.tests[strings.TrimSpace(s)] = true
		}
	}
	if *only != "" {
		h.only = map[string]bool{}
		for _, s := range strings.Split(*only, ",") {
			h.only[strings.TrimSpace(s)] = true
		}
	}
	return h.run(ctx)
}
