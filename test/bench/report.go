package main

// The markdown report: medians over rounds per target, ratios against
// direct and nginx, and the targets checked against numbers from
// the same run.

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// median of metric over the successful runs of (target, test, conns).
func (h *harness) median(target, test string, conns int, metric func(Result) float64) float64 {
	var v []float64
	for _, r := range h.results {
		if r.Target != target || r.Test != test || (conns > 0 && r.Conns != conns) || strings.HasPrefix(r.Note, "run failed") {
			continue
		}
		x := metric(r)
		if math.IsNaN(x) {
			continue
		}
		v = append(v, x)
	}
	if len(v) == 0 {
		return math.NaN()
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// spread is the smallest and largest value of metric over the successful
// runs of (target, test, conns), and how many there were.
func (h *harness) spread(target, test string, conns int, metric func(Result) float64) (lo, hi float64, n int) {
	lo, hi = math.Inf(1), math.Inf(-1)
	for _, r := range h.results {
		if r.Target != target || r.Test != test || (conns > 0 && r.Conns != conns) || strings.HasPrefix(r.Note, "run failed") {
			continue
		}
		x := metric(r)
		if math.IsNaN(x) {
			continue
		}
		lo, hi, n = min(lo, x), max(hi, x), n+1
	}
	return lo, hi, n
}

// errorsOf sums errors of (target, test).
func (h *harness) errorsOf(target, test string) int {
	n := 0
	for _, r := range h.results {
		if r.Target == target && r.Test == test {
			n += r.Errors
		}
	}
	return n
}

func num(v float64, prec int) string {
	if math.IsNaN(v) {
		return "—"
	}
	return fmt.Sprintf("%.*f", prec, v)
}

// lat formats microseconds: one decimal under 100, none above.
func lat(v float64) string {
	if math.IsNaN(v) {
		return "—"
	}
	if v < 100 {
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.0f", v)
}

func ratio(v, base float64) string {
	if math.IsNaN(v) || math.IsNaN(base) || base == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f×", v/base)
}

type table struct {
	b *strings.Builder
}

func (t table) row(cells ...string) {
	t.b.WriteString("| " + strings.Join(cells, " | ") + " |\n")
}

func (t table) head(cells ...string) {
	t.row(cells...)
	sep := make([]string, len(cells))
	for i := range sep {
		sep[i] = "---"
		if i > 0 {
			sep[i] = "---:"
		}
	}
	t.row(sep...)
}

func (h *harness) report(elapsed time.Duration) string {
	var b strings.Builder
	t := table{&b}
	m := h.mach
	p := h.plan
	fmt.Fprintf(&b, "## wsplice benchmark (%s run), %s\n\n", p.name, m.Date)
	fmt.Fprintf(&b, "Machine: `nproc` %d, kernel %s, CPU %s, %s RAM, open-file hard limit %s. Go %s, wsplice %s, nginx %s, HAProxy %s.\n\n",
		m.Nproc, m.Kernel, m.CPU, m.MemGB, m.NofileH, m.Go, m.Commit, m.Nginx, m.HAProxy)
	pin := "no pinning"
	if h.genCPU != "" {
		pin = fmt.Sprintf("generator pinned to CPU %s and each proxy to CPU %s (taskset), backends unpinned", h.genCPU, h.proxyCPU)
	}
	chatty := ""
	if h.ran("chatty") {
		chatty = fmt.Sprintf(" (the chatty test: %s windows after %s)", p.chattyDur, p.warm+p.chattyPeriod)
	}
	fmt.Fprintf(&b, "Run: %d round(s) with targets interleaved (order rotated each round), %s windows after %s warm-up%s; %s; everything on loopback. "+
		"Took %s. Cells are medians over rounds; every run is a line in %s.\n\n",
		p.rounds, p.dur, p.warm, chatty, pin, elapsed.Round(time.Second), h.outPath)
	var noisy, total int
	maxBg := 0.0
	for _, r := range h.results {
		total++
		maxBg = max(maxBg, r.BgBusy)
		if r.Noisy {
			noisy++
		}
	}
	var others []float64
	for _, r := range h.results {
		if r.DurS > 0 && r.Test != "slow" {
			others = append(others, r.OtherLoad)
		}
	}
	otherMed := math.NaN()
	if len(others) > 0 {
		slices.Sort(others)
		otherMed = others[len(others)/2]
	}
	fmt.Fprintf(&b, "Other load: before each run the machine's busy share is sampled for 250 ms; above %.0f%% the run waits and retries (bounded). "+
		"%d of %d runs went ahead above it (highest background %.0f%%); waited %s in all. "+
		"During the runs, processes outside the benchmark used a median %s%% of the machine (whole-machine busy minus attributed CPU). "+
		"Whole-machine CPU counts that load too: on a machine kept busy by others it tends to 2 cores ÷ throughput; "+
		"\"attributed\" CPU is the generator, backends, proxy and every kernel thread (kernel workers, ksoftirqd), with softirq "+
		"charged to the task it interrupted, so it holds up under other load.\n\n",
		p.busyMax*100, noisy, total, maxBg*100, h.waited.Round(time.Second), num(otherMed*100, 0))
	for _, tg := range h.targets {
		if tg.Skip != "" {
			fmt.Fprintf(&b, "- **%s skipped**: %s\n", tg.Name, tg.Skip)
		}
	}
	b.WriteString("\nTargets: ")
	var descs []string
	for _, tg := range h.targets {
		descs = append(descs, fmt.Sprintf("**%s** — %s", tg.Name, tg.Desc))
	}
	b.WriteString(strings.Join(descs, "; ") + ".\n\n")

	// TLS targets have results in the idle test only (liveIdle).
	live := func(bulk bool) []*target {
		var out []*target
		for _, tg := range h.targets {
			if tg.Skip == "" && !tg.TLS && (bulk || !tg.BulkOnly) {
				out = append(out, tg)
			}
		}
		return out
	}
	liveIdle := func() []*target {
		var out []*target
		for _, tg := range h.targets {
			if tg.Skip == "" && !tg.BulkOnly {
				out = append(out, tg)
			}
		}
		return out
	}
	var tlsNames []string
	for _, tg := range h.targets {
		if tg.TLS && tg.Skip == "" {
			tlsNames = append(tlsNames, tg.Name)
		}
	}
	if len(tlsNames) > 0 {
		fmt.Fprintf(&b, "TLS-terminating targets (%s) take part in the idle test only: the other tests' generator speaks plain TCP, so they were skipped for them.\n\n",
			strings.Join(tlsNames, ", "))
	}
	med := func(tg, test string, conns int, f func(Result) float64) float64 { return h.median(tg, test, conns, f) }
	nan := math.NaN()
	// Each getter says NaN where the run has nothing to say (no messages,
	// no bytes, no connections); a real zero stays a zero.
	msgs := func(r Result) float64 { return r.MsgsPerS }
	lq := func(f func(Result) float64) func(Result) float64 {
		return func(r Result) float64 {
			if r.Msgs == 0 {
				return nan
			}
			return f(r)
		}
	}
	p50 := lq(func(r Result) float64 { return r.P50us })
	p99 := lq(func(r Result) float64 { return r.P99us })
	p999 := lq(func(r Result) float64 { return r.P999us })
	mbps := func(r Result) float64 { return r.MBps }
	ackMB := func(r Result) float64 { return r.AckMBps }
	perMB := func(f func(Result) float64) func(Result) float64 {
		return func(r Result) float64 {
			if r.Bytes == 0 {
				return nan
			}
			return f(r)
		}
	}
	cpuMB := perMB(func(r Result) float64 { return r.CPUMsPerMB })
	cpuAttrMB := perMB(func(r Result) float64 { return r.CPUAttrMsPerMB })
	hsps := func(r Result) float64 { return r.HsPerS }
	perHs := func(f func(Result) float64) func(Result) float64 {
		return func(r Result) float64 {
			if r.Handshakes == 0 {
				return nan
			}
			return f(r)
		}
	}
	hs50 := perHs(func(r Result) float64 { return r.HsP50ms })
	hs99 := perHs(func(r Result) float64 { return r.HsP99ms })
	cpuHs := perHs(func(r Result) float64 { return r.CPUUsPerHs })
	cpuAttrHs := perHs(func(r Result) float64 { return r.CPUAttrUsPerHs })
	perConn := func(f func(Result) float64) func(Result) float64 {
		return func(r Result) float64 {
			if r.IdleConns == 0 {
				return nan
			}
			return f(r)
		}
	}
	rssConn := perConn(func(r Result) float64 {
		if r.RSSBefore == 0 { // direct: no proxy process
			return nan
		}
		return r.RSSPerConn
	})
	objsConn := perConn(func(r Result) float64 { return r.SlabObjsPerConn })
	unrecConn := perConn(func(r Result) float64 { return r.UnrecPerConn })
	availConn := perConn(func(r Result) float64 { return r.AvailPerConn })
	idleN := func(r Result) float64 { return float64(r.IdleConns) }
	errs := func(tg, test string) string {
		if n := h.errorsOf(tg, test); n > 0 {
			return fmt.Sprintf(" (%d errors)", n)
		}
		return ""
	}

	b.WriteString("### Echo: 64-byte messages, closed loop (µs)\n\n")
	t.head("target", "1 conn msg/s", "p50", "p99", "p99.9", "100 conns msg/s", "p50", "p99", "p99.9")
	for _, tg := range live(false) {
		n := tg.Name
		t.row(n+errs(n, "echo"), num(med(n, "echo", 1, msgs), 0), lat(med(n, "echo", 1, p50)), lat(med(n, "echo", 1, p99)), lat(med(n, "echo", 1, p999)),
			num(med(n, "echo", 100, msgs), 0), lat(med(n, "echo", 100, p50)), lat(med(n, "echo", 100, p99)), lat(med(n, "echo", 100, p999)))
	}
	b.WriteString("\n### Bulk: 64 KiB messages client → backend, rate counted at the receiver (MB = 10⁶ bytes)\n\n")
	t.head("target", "1 conn MB/s", "8 conns MB/s", "CPU ms/MB = s/GB, 8 conns (whole machine)", "same, attributed", "CPU ms/MB, 1 conn (whole machine)", "acks back, 1 conn MB/s")
	for _, tg := range live(true) {
		n := tg.Name
		t.row(n+errs(n, "bulk"), num(med(n, "bulk", 1, mbps), 0), num(med(n, "bulk", 8, mbps), 0),
			num(med(n, "bulk", 8, cpuMB), 2), num(med(n, "bulk", 8, cpuAttrMB), 2), num(med(n, "bulk", 1, cpuMB), 2), num(med(n, "bulk", 1, ackMB), 0))
	}
	b.WriteString("\nThe rate is what the backends read (their own counter). The backend also acks every MiB back over the same connection; " +
		"the last column is the rate at which those acks arrived, i.e. whether the reverse direction kept moving.\n")
	fmt.Fprintf(&b, "\n### Handshakes: connect, upgrade, close handshake, server FIN (%d concurrent)\n\n", p.hsConc)
	t.head("target", "handshakes/s", "p50 ms", "p99 ms", "CPU µs/handshake (whole machine)", "same, attributed")
	for _, tg := range live(false) {
		n := tg.Name
		t.row(n+errs(n, "hs"), num(med(n, "hs", 0, hsps), 0), num(med(n, "hs", 0, hs50), 2), num(med(n, "hs", 0, hs99), 2),
			num(med(n, "hs", 0, cpuHs), 0), num(med(n, "hs", 0, cpuAttrHs), 0))
	}
	if h.ran("chatty") {
		h.chattyReport(t, live(false))
	}
	fmt.Fprintf(&b, "\n### Idle connections: %d held from a separate process (bytes per connection)\n\n", p.idleConns)
	t.head("target", "connections", "proxy RSS", "kernel: slab objects in use", "above direct", "kernel: SUnreclaim", "kernel: MemAvailable drop")
	dObjs := med("direct", "idle", 0, objsConn)
	for _, tg := range liveIdle() {
		n := tg.Name
		rss := num(med(n, "idle", 0, rssConn), 0)
		if n == "direct" {
			rss = "n/a"
		}
		above := "—"
		if n != "direct" && !math.IsNaN(dObjs) {
			above = num(med(n, "idle", 0, objsConn)-dObjs, 0)
		}
		t.row(n+errs(n, "idle"), num(med(n, "idle", 0, idleN), 0), rss, num(med(n, "idle", 0, objsConn), 0), above,
			num(med(n, "idle", 0, unrecConn), 0), num(med(n, "idle", 0, availConn), 0))
	}
	b.WriteString("\nProxy RSS is VmRSS (nginx: master + workers) with the connections open minus before, measured first, while each proxy is fresh. " +
		"Kernel memory is the whole machine's, so it includes the client's and the backend's sockets (direct shows that part alone); " +
		"\"slab objects in use\" is Σ active objects × object size from /proc/slabinfo (without proc_inode_cache), SUnreclaim and MemAvailable come from /proc/meminfo " +
		"(MemAvailable moves with everything else on a shared machine). Every figure is (with − before) ÷ connections.\n")
	if len(tlsNames) > 0 {
		b.WriteString("TLS targets' clients complete a TLS handshake (TLS 1.3, ECDSA P-256 certificate, no session resumption) before the upgrade, " +
			"then hold the connection idle like the others.\n")
	}
	var slowRows []*target
	for _, tg := range live(true) {
		if slowTargets[tg.Name] {
			slowRows = append(slowRows, tg)
		}
	}
	if len(slowRows) > 0 {
		fmt.Fprintf(&b, "\n### Slow reader: backend reads %.0f MiB/s for %s, the sender pushes up to %d MiB as fast as it is let\n\n",
			float64(p.slowRate)/(1<<20), p.slowDur, p.slowCap>>20)
		t.head("target", "sender got through MiB", "reader read MiB", "acks back by the end MiB", "peak kernel memory MiB (MemAvailable drop)", "peak Slab MiB", "proxy RSS peak MiB", "memory back after close s")
		for _, tg := range slowRows {
			var r *Result
			for i := range h.results {
				if h.results[i].Target == tg.Name && h.results[i].Test == "slow" {
					r = &h.results[i]
				}
			}
			if r == nil || strings.HasPrefix(r.Note, "run failed") {
				note := "no result"
				if r != nil {
					note = r.Note
				}
				t.row(tg.Name, note, "", "", "", "", "", "")
				continue
			}
			rss := num(mib(r.PeakRSSDelta), 1)
			if tg.Name == "direct" {
				rss = "n/a"
			}
			back := num(r.RecoverS, 1)
			if r.NotRecovered {
				back = "> " + num(r.RecoverS, 0) + " (other load?)"
			}
			t.row(tg.Name, num(mib(r.SentBytes), 0), num(mib(r.ReadBytes), 1), num(mib(r.AckedBytes), 1), num(mib(r.PeakAvailDelta), 0), num(mib(r.PeakSlabDelta), 0), rss, back)
		}
	}

	if len(slowRows) > 0 {
		b.WriteString("\n\"Reader read\" is the backend's own count; the backend also acks every MiB it read over the same connection, so fewer acks " +
			"than MiB read means the proxy held the reverse direction. Kernel memory here is MemAvailable's drop at its lowest point (noisy when others allocate); " +
			"sockmap's parked bytes show only there, not in socket accounting.\n")
	}
	b.WriteString("\n### Ratios (medians; ×direct and ×nginx; for p99, CPU and memory lower is better)\n\n")
	t.head("target", "echo-100 msg/s ×direct", "×nginx", "echo-100 p99 ×direct", "×nginx", "bulk-8 MB/s ×direct", "×nginx",
		"bulk-8 CPU/MB ×direct", "×nginx", "handshakes/s ×direct", "×nginx", "idle RSS/conn ×nginx", "idle kernel/conn ×direct")
	for _, tg := range live(true) {
		n := tg.Name
		rr := func(test string, conns int, f func(Result) float64, base string) string {
			return ratio(med(n, test, conns, f), med(base, test, conns, f))
		}
		t.row(n, rr("echo", 100, msgs, "direct"), rr("echo", 100, msgs, "nginx"), rr("echo", 100, p99, "direct"), rr("echo", 100, p99, "nginx"),
			rr("bulk", 8, mbps, "direct"), rr("bulk", 8, mbps, "nginx"), rr("bulk", 8, cpuMB, "direct"), rr("bulk", 8, cpuMB, "nginx"),
			rr("hs", 0, hsps, "direct"), rr("hs", 0, hsps, "nginx"), rr("idle", 0, rssConn, "nginx"), rr("idle", 0, objsConn, "direct"))
	}

	b.WriteString("\n### Targets from the issues, checked against this run\n\n")
	if p.rounds > 1 {
		b.WriteString("Values are medians with the range over rounds in brackets; the result compares medians.\n\n")
	}
	t.head("check", "wsplice", "value", "compared with", "value", "result")
	type side struct {
		name  string
		test  string
		conns int
		f     func(Result) float64
		scale float64 // multiplies the value (nginx ÷ 20)
		label string  // overrides name in the table
		fixed float64 // a constant instead of a measurement (when f is nil)
	}
	value := func(sd side, prec int) (float64, string, int) {
		if sd.f == nil {
			return sd.fixed, "", 0
		}
		sc := sd.scale
		if sc == 0 {
			sc = 1
		}
		lo, hi, n := h.spread(sd.name, sd.test, sd.conns, sd.f)
		rg := ""
		if n > 1 {
			rg = fmt.Sprintf(" (%s–%s)", num(lo*sc, prec), num(hi*sc, prec))
		}
		return med(sd.name, sd.test, sd.conns, sd.f) * sc, rg, n
	}
	check := func(what string, a, o side, pass func(v, ov float64) bool, prec int) {
		v, vr, _ := value(a, prec)
		ov, or, _ := value(o, prec)
		res := "no data"
		if !math.IsNaN(v) && !math.IsNaN(ov) {
			res = "MISSED"
			if pass(v, ov) {
				res = "met"
			}
		}
		ol := o.name
		if o.label != "" {
			ol = o.label
		}
		t.row(what, a.name, num(v, prec)+vr, ol, num(ov, prec)+or, res)
	}
	lower := func(v, ov float64) bool { return v < ov }
	atMost := func(v, ov float64) bool { return v <= ov }
	atLeast := func(v, ov float64) bool { return v >= ov }
	has := func(name string) bool { tg := h.find(name); return tg != nil && tg.Skip == "" }
	for _, ws := range []string{"wsplice-sockmap", "wsplice-splice"} {
		if !has(ws) {
			continue
		}
		if has("nginx") {
			check("idle RSS/conn ≤ 1/20 of nginx's (B)", side{name: ws, test: "idle", f: rssConn},
				side{name: "nginx", test: "idle", f: rssConn, scale: 1.0 / 20, label: "nginx ÷ 20"}, atMost, 0)
		}
		for _, o := range []string{"nginx", "nginx-tuned", "haproxy", "haproxy-splice"} {
			if has(o) {
				check("echo p99 at 100 conns below (µs)", side{name: ws, test: "echo", conns: 100, f: p99},
					side{name: o, test: "echo", conns: 100, f: p99}, lower, 0)
			}
		}
		for _, o := range []string{"haproxy", "haproxy-splice"} {
			if !has(o) {
				continue
			}
			for _, c := range []int{8, 1} {
				check(fmt.Sprintf("whole-machine CPU/MB below, %d conn(s) (ms/MB)", c), side{name: ws, test: "bulk", conns: c, f: cpuMB},
					side{name: o, test: "bulk", conns: c, f: cpuMB}, lower, 2)
				check(fmt.Sprintf("attributed CPU/MB below, %d conn(s) (ms/MB)", c), side{name: ws, test: "bulk", conns: c, f: cpuAttrMB},
					side{name: o, test: "bulk", conns: c, f: cpuAttrMB}, lower, 2)
			}
		}
		if has("nginx") {
			check("handshakes/s ≥ nginx's", side{name: ws, test: "hs", f: hsps}, side{name: "nginx", test: "hs", f: hsps}, atLeast, 0)
		}
	}
	if has("wsplice-tls") && has("nginx-tls") {
		check("agent RSS per idle TLS-terminated conn vs nginx terminating TLS (B, #13)", side{name: "wsplice-tls", test: "idle", f: rssConn},
			side{name: "nginx-tls", test: "idle", f: rssConn}, atMost, 0)
	}
	if has("wsplice-sockmap") {
		check("agent RSS per idle conn ≤ 1 KB (B, #3)", side{name: "wsplice-sockmap", test: "idle", f: rssConn},
			side{name: "1 KB", fixed: 1024}, atMost, 0)
	}
	b.WriteString("\n")
	return b.String()
}

// ran reports whether test has at least one result.
func (h *harness) ran(test string) bool {
	for _, r := range h.results {
		if r.Test == test {
			return true
		}
	}
	return false
}

// chattyReport writes the chatty test's table and its ratios.
func (h *harness) chattyReport(t table, targets []*target) {
	b := t.b
	p := h.plan
	nan := math.NaN()
	med := func(tg string, f func(Result) float64) float64 { return h.median(tg, "chatty", 0, f) }
	// Per-message figures say nothing without messages.
	pm := func(f func(Result) float64) func(Result) float64 {
		return func(r Result) float64 {
			if r.Msgs == 0 {
				return nan
			}
			return f(r)
		}
	}
	msgs := func(r Result) float64 { return r.MsgsPerS }
	conns := func(r Result) float64 { return float64(r.Conns) }
	proxyPct := func(r Result) float64 {
		if r.ProxyPID == 0 {
			return nan
		}
		return r.ProxyCPUPct
	}
	proxyK := pm(func(r Result) float64 {
		if r.ProxyPID == 0 {
			return nan
		}
		return r.ProxyMsPerKMsg
	})
	kthrK := pm(func(r Result) float64 { return r.KthreadMsPerKMsg })
	attrK := pm(func(r Result) float64 { return r.AttrMsPerKMsg })
	machK := pm(func(r Result) float64 { return r.CPUMsPerKMsg })
	busy := func(r Result) float64 { return r.MachineBusy * 100 }
	p50 := pm(func(r Result) float64 { return r.P50us })
	p99 := pm(func(r Result) float64 { return r.P99us })
	errs := func(tg string) string {
		if n := h.errorsOf(tg, "chatty"); n > 0 {
			return fmt.Sprintf(" (%d errors)", n)
		}
		return ""
	}
	n := h.chattyN
	perConn := float64(time.Second) / float64(p.chattyPeriod)
	fmt.Fprintf(b, "\n### Chatty: %d connections, each a 64-byte echo about every %s (%.0f msg/s per connection, jittered), %s window after all are connected and %s warm-up\n\n",
		n, p.chattyPeriod, perConn, p.chattyDur, p.warm+p.chattyPeriod)
	t.head("target", "connections", fmt.Sprintf("msg/s (offered %.0f)", float64(n)*perConn), "proxy CPU % of one CPU", "proxy CPU ms/1000 msgs",
		"kernel threads ms/1000 msgs", "attributed ms/1000 msgs", "attributed above direct", "whole machine ms/1000 msgs", "machine busy %", "p50 µs", "p99 µs")
	dAttr := med("direct", attrK)
	for _, tg := range targets {
		nm := tg.Name
		pp, pk := num(med(nm, proxyPct), 1), num(med(nm, proxyK), 2)
		above := "—"
		if nm == "direct" {
			pp, pk = "n/a", "n/a"
		} else if !math.IsNaN(dAttr) {
			above = num(med(nm, attrK)-dAttr, 2)
		}
		t.row(nm+errs(nm), num(med(nm, conns), 0), num(med(nm, msgs), 0), pp, pk, num(med(nm, kthrK), 2), num(med(nm, attrK), 2), above,
			num(med(nm, machK), 2), num(med(nm, busy), 0), lat(med(nm, p50)), lat(med(nm, p99)))
	}
	b.WriteString("\nOne message is one round trip: a masked 64-byte frame client → backend and its echo back, so a proxy forwards two messages per row count. " +
		"Proxy CPU is user+sys of the proxy's processes (nginx: master + workers) from /proc/PID/stat, over the window; 1 ms per 1000 messages = 1 µs per message. " +
		"It leaves out work the kernel does for the proxy: on the sockmap plane the redirect runs in softirq, charged to whichever process sent the segment " +
		"(here the generator or the backend), and in kernel workers. \"Kernel threads\" is every kernel thread on the machine (other tenants' too); " +
		"\"attributed\" is generator + backends + proxy + kernel threads, and \"above direct\" subtracts direct's, which estimates the whole cost of the proxy, kernel included. " +
		"Whole-machine CPU includes other tenants' load.\n")
	// Rows below 90 % of the offered rate measured a saturated machine (or
	// generator), not the proxy at this load: say so.
	offered := float64(n) * perConn
	var short []string
	for _, tg := range targets {
		if v := med(tg.Name, msgs); !math.IsNaN(v) && v < 0.9*offered {
			short = append(short, fmt.Sprintf("%s %.0f%%", tg.Name, 100*v/offered))
		}
	}
	if len(short) > 0 {
		gen := func(r Result) float64 { return r.GenCPUPct }
		other := func(r Result) float64 { return r.OtherLoad * 100 }
		var gs, ol []float64
		for _, tg := range targets {
			gs, ol = append(gs, med(tg.Name, gen)), append(ol, med(tg.Name, other))
		}
		fmt.Fprintf(b, "\n**Below 90%% of the offered rate:** %s. Those connections waited for their echoes longer than their gap, so they sent less "+
			"and the latencies are mostly queueing. The generator (pinned to one CPU) used %s%% of it (median per target, lowest–highest); "+
			"processes outside the benchmark used %s%% of the machine.\n",
			strings.Join(short, ", "), rangeOf(gs, 0), rangeOf(ol, 0))
	}

	b.WriteString("\n#### Chatty, ratios (medians; ×direct and ×nginx; for CPU and p99 lower is better)\n\n")
	t.head("target", "msg/s ×direct", "×nginx", "proxy CPU/msg ×nginx", "attributed CPU/msg ×direct", "×nginx",
		"whole-machine CPU/msg ×direct", "×nginx", "p99 ×direct", "×nginx")
	for _, tg := range targets {
		nm := tg.Name
		rr := func(f func(Result) float64, base string) string { return ratio(med(nm, f), med(base, f)) }
		t.row(nm, rr(msgs, "direct"), rr(msgs, "nginx"), rr(proxyK, "nginx"), rr(attrK, "direct"), rr(attrK, "nginx"),
			rr(machK, "direct"), rr(machK, "nginx"), rr(p99, "direct"), rr(p99, "nginx"))
	}
}

// rangeOf formats the smallest and largest non-NaN value ("lo–hi").
func rangeOf(v []float64, prec int) string {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, x := range v {
		if !math.IsNaN(x) {
			lo, hi = min(lo, x), max(hi, x)
		}
	}
	if math.IsInf(lo, 1) {
		return "—"
	}
	if num(lo, prec) == num(hi, prec) {
		return num(lo, prec)
	}
	return num(lo, prec) + "–" + num(hi, prec)
}
