package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// plan sizes a run. Every count and duration is bounded.
type plan struct {
	name       string
	rounds     int
	dur, warm  time.Duration
	hsConc     int
	idleConns  int
	idleRounds int
	slowDur    time.Duration
	slowCap    int64
	slowRate   int64
	busyMax    float64
	settle     time.Duration // idle test: pause before and after measuring
	recoverMax time.Duration // slow test: longest wait for memory to come back
	retries    int           // busy retries per run
	waitBudget time.Duration // total time the whole run may wait for quiet
	// chatty: many connections, each sending a small message every
	// chattyPeriod (jittered) and waiting for its echo, measured for
	// chattyDur after all are connected and one period of warm-up.
	chattyConns  int
	chattyDur    time.Duration
	chattyPeriod time.Duration
}

func defaultPlan(quick bool) plan {
	if quick {
		return plan{name: "quick", rounds: 1, dur: time.Second, warm: 200 * time.Millisecond, hsConc: 16,
			idleConns: 1000, idleRounds: 1, slowDur: 2 * time.Second, slowCap: 256 << 20, slowRate: 1 << 20,
			settle: 500 * time.Millisecond, recoverMax: 3 * time.Second, retries: 2, waitBudget: 10 * time.Second,
			chattyConns: 1000, chattyDur: 6 * time.Second, chattyPeriod: 200 * time.Millisecond}
	}
	return plan{name: "full", rounds: 3, dur: 2 * time.Second, warm: 300 * time.Millisecond, hsConc: 16,
		idleConns: 8000, idleRounds: 1, slowDur: 4 * time.Second, slowCap: 1 << 30, slowRate: 1 << 20,
		settle: time.Second, recoverMax: 5 * time.Second, retries: 4, waitBudget: 60 * time.Second,
		chattyConns: 4000, chattyDur: 15 * time.Second, chattyPeriod: 200 * time.Millisecond}
}

// spec is one interleaved test.
type spec struct {
	name  string
	test  string
	conns int
	size  int
	bulk  bool // bulk-only targets take part
}

var specs = []spec{
	{"echo1", "echo", 1, 64, false},
	{"echo100", "echo", 100, 64, false},
	{"bulk1", "bulk", 1, 64 << 10, true},
	{"bulk8", "bulk", 8, 64 << 10, true},
	{"hs", "hs", 0, 0, false},          // conns = plan.hsConc
	{"chatty", "chatty", 0, 64, false}, // conns = chattyConns(plan, file limit)
}

// fdReserve is what a process keeps for everything but the chatty test's
// sockets (listeners, stats, pipes, the runtime's own).
const fdReserve = 256

// chattyConns is plan.chattyConns capped so that every process of the run
// stays under the open-file hard limit: the generator and the backend hold
// one socket per connection, a proxy two (client and backend side).
// HAProxy's maxconn (haproxyConfig) bounds it too.
func chattyConns(p plan, hardLimit uint64) int {
	n := min(p.chattyConns, haproxyMaxconn-fdReserve)
	if hardLimit > 0 && hardLimit < 1<<31 {
		n = min(n, (int(hardLimit)-fdReserve)/2)
	}
	return max(n, 1)
}

// nofileHard is the open-file hard limit (0 when unknown). Go raises the
// soft limit to it in every process it starts, so the re-executed
// generator and backend get it as well.
func nofileHard() uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0
	}
	return rl.Max
}

// slowTargets take part in the slow-reader test (issue #15: demotion vs
// pure sockmap vs splice, with direct as the reference).
var slowTargets = map[string]bool{"direct": true, "wsplice-sockmap": true, "wsplice-sockmap-pure": true, "wsplice-splice": true}

type harness struct {
	plan     plan
	pin      bool
	outPath  string
	mdPath   string
	wsplice  string
	only     map[string]bool
	tests    map[string]bool
	genCPU   string
	proxyCPU string
	backPID  int
	stats    string
	out      *os.File
	results  []Result
	waited   time.Duration
	mach     machine
	targets  []*target
	started  time.Time
	chattyN  int // connections of the chatty test (plan, capped by the file limit)
}

func (h *harness) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%5.1fs] %s\n", time.Since(h.started).Seconds(), fmt.Sprintf(format, args...))
}

func (h *harness) run(ctx context.Context) error {
	h.started = time.Now()
	h.mach = describeMachine()
	if h.pin && runtime.NumCPU() >= 2 {
		if _, err := exec.LookPath("taskset"); err == nil {
			h.genCPU, h.proxyCPU = "0", "1"
		}
	}
	f, err := os.Create(h.outPath)
	if err != nil {
		return err
	}
	defer f.Close()
	h.out = f
	meta := map[string]any{"kind": "meta", "machine": h.mach, "plan": h.plan.name, "rounds": h.plan.rounds,
		"dur_s": h.plan.dur.Seconds(), "idle_conns": h.plan.idleConns, "gen_cpu": h.genCPU, "proxy_cpu": h.proxyCPU,
		"busy_max": h.plan.busyMax, "chatty_conns": chattyConns(h.plan, nofileHard()), "chatty_dur_s": h.plan.chattyDur.Seconds(),
		"chatty_period_ms": h.plan.chattyPeriod.Milliseconds()}
	_ = json.NewEncoder(f).Encode(meta)
	h.logf("bench (%s): %d CPUs, kernel %s, %s; generator on CPU %q, proxies on CPU %q", h.plan.name,
		h.mach.Nproc, h.mach.Kernel, h.mach.CPU, h.genCPU, h.proxyCPU)

	dir, err := os.MkdirTemp("", "wsplice-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	s := &setup{dir: dir, proxyCPU: h.proxyCPU}
	switch {
	case h.wsplice != "":
		s.wsplice = h.wsplice
	case prebuilt() != "":
		s.wsplice = prebuilt()
		h.logf("agent: %s (newer than its sources)", s.wsplice)
	default:
		t0 := time.Now()
		if s.wsplice, err = buildWsplice(dir); err != nil {
			h.logf("wsplice targets skipped: %v", err)
		} else {
			h.logf("agent: built in %s", time.Since(t0).Round(100*time.Millisecond))
		}
	}
	bcmd, backends, stats, stopBackends, err := startBackends(2)
	if err != nil {
		return err
	}
	defer stopBackends()
	h.backPID = bcmd.Process.Pid
	h.stats = stats
	s.backends = backends
	h.logf("echo backends on %s (pid %d)", strings.Join(backends, ", "), h.backPID)

	for _, t := range newTargets() {
		if h.only != nil && !h.only[t.Name] {
			continue
		}
		h.targets = append(h.targets, t)
		if err := s.start(t); err != nil {
			t.Skip = "did not start: " + err.Error()
		}
		switch {
		case t.Skip != "":
			h.logf("target %s skipped: %s", t.Name, t.Skip)
		default:
			h.logf("target %s on %s (pid %d)", t.Name, t.Addr, t.PID())
		}
	}
	defer func() {
		for _, t := range h.targets {
			t.stop()
		}
	}()
	if t := h.find("nginx"); t != nil && t.PID() > 0 {
		h.logf("nginx workers: %d", len(childrenOf(t.PID())))
	}
	h.chattyN = chattyConns(h.plan, nofileHard())
	if h.want("chatty") && h.chattyN < h.plan.chattyConns {
		h.logf("chatty: %d connections instead of %d (open-file hard limit %d: a proxy needs two per connection)",
			h.chattyN, h.plan.chattyConns, nofileHard())
	}

	// Idle connections first, while every proxy is fresh: after the bulk
	// tests a Go agent's heap, nginx's and HAProxy's buffer pools have grown
	// and shrink later, which hides (or turns negative) the RSS a
	// connection costs.
	for round := 1; round <= h.plan.idleRounds && h.want("idle"); round++ {
		for _, t := range h.rotated(round) {
			if t.Skip != "" || t.BulkOnly {
				continue
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			h.idle(round, t)
		}
	}
	// TLS-terminating targets are measured in the idle test only: the
	// generator speaks plain TCP.
	for _, sp := range specs {
		if !h.want(sp.name) {
			continue
		}
		for _, t := range h.targets {
			if t.TLS && t.Skip == "" {
				h.logf("target %s: test %s skipped (TLS targets take part in the idle test only)", t.Name, sp.name)
			}
		}
	}
	for round := 1; round <= h.plan.rounds; round++ {
		for _, sp := range specs {
			if !h.want(sp.name) {
				continue
			}
			order := h.rotated(round)
			for _, t := range order {
				if t.Skip != "" || t.TLS || (t.BulkOnly && !sp.bulk) {
					continue
				}
				if ctx.Err() != nil {
					return ctx.Err()
				}
				h.interleaved(round, sp, t)
			}
		}
	}
	for _, t := range h.targets {
		if t.Skip != "" || t.TLS || !slowTargets[t.Name] || !h.want("slow") {
			continue
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		h.slow(t)
	}
	for _, t := range h.targets {
		if t.PID() > 0 && t.cmd.ProcessState != nil {
			h.logf("target %s exited during the run: %s", t.Name, tail(t.log.String(), 400))
		}
	}
	elapsed := time.Since(h.started)
	report := h.report(elapsed)
	fmt.Print(report)
	if h.mdPath != "" {
		if err := os.WriteFile(h.mdPath, []byte(report), 0o644); err != nil {
			return err
		}
	}
	h.logf("done in %s; %d measurements in %s", elapsed.Round(time.Second), len(h.results), h.outPath)
	return nil
}

// want reports whether test name was selected (-tests).
func (h *harness) want(name string) bool { return h.tests == nil || h.tests[name] }

func (h *harness) find(name string) *target {
	for _, t := range h.targets {
		if t.Name == name {
			return t
		}
	}
	return nil
}

// rotated is the target order for a round: shifted by one each round so
// no target always runs first (or right after the same neighbour).
func (h *harness) rotated(round int) []*target {
	n := len(h.targets)
	out := make([]*target, 0, n)
	for i := range n {
		out = append(out, h.targets[(i+round-1)%n])
	}
	return out
}

// quiet samples the machine's busy share with nothing of ours running and
// waits while other load is above the threshold (bounded per run and for
// the whole benchmark).
func (h *harness) quiet() (bg float64, waited time.Duration, noisy bool) {
	t0 := time.Now()
	for i := 0; ; i++ {
		a := readCPU()
		time.Sleep(250 * time.Millisecond)
		bg = busyFraction(a, readCPU())
		if bg <= h.plan.busyMax {
			break
		}
		if i >= h.plan.retries || h.waited+time.Since(t0) >= h.plan.waitBudget {
			noisy = true
			break
		}
		time.Sleep(time.Second)
	}
	waited = time.Since(t0)
	h.waited += waited
	return bg, waited, noisy
}

func (h *harness) record(r Result) {
	r.Kind = "result"
	h.results = append(h.results, r)
	_ = json.NewEncoder(h.out).Encode(r)
}

func (h *harness) pids(t *target) string {
	ps := []string{strconv.Itoa(h.backPID)}
	if t.PID() > 0 {
		ps = append(ps, strconv.Itoa(t.PID()))
	}
	return strings.Join(ps, ",")
}

// gen runs the generator subprocess pinned to the generator core.
func (h *harness) gen(timeout time.Duration, args ...string) (Result, error) {
	argv := pinned(h.genCPU, append([]string{selfExe(), "-role", "gen"}, args...)...)
	ctx, cancel := context.WithTimeout(bgCtx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var r Result
	if err != nil {
		return r, fmt.Errorf("%v: %s", err, tail(stderr.String(), 300))
	}
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		return r, fmt.Errorf("generator output %q: %v", tail(stdout.String(), 200), err)
	}
	return r, nil
}

func (h *harness) interleaved(round int, sp spec, t *target) {
	bg, waited, noisy := h.quiet()
	conns, dur, warm, timeout := sp.conns, h.plan.dur, h.plan.warm, h.plan.dur+60*time.Second
	switch sp.test {
	case "hs":
		conns = h.plan.hsConc
	case "chatty":
		// Warm-up: one period for the jittered starts to spread, plus the
		// plan's warm-up. The timeout leaves time to connect and close
		// thousands of connections through a slow handshake path.
		conns, dur, warm = h.chattyN, h.plan.chattyDur, h.plan.warm+h.plan.chattyPeriod
		timeout = dur + warm + 180*time.Second
	}
	args := []string{"-test", sp.test, "-addr", t.Addr, "-conns", strconv.Itoa(conns), "-size", strconv.Itoa(sp.size),
		"-dur", dur.String(), "-warm", warm.String(), "-pids", h.pids(t), "-stats", h.stats}
	if sp.test == "chatty" {
		args = append(args, "-period", h.plan.chattyPeriod.String(), "-proxy", strconv.Itoa(t.PID()))
	}
	r, err := h.gen(timeout, args...)
	if err != nil {
		r = Result{Test: sp.test, Conns: conns, Size: sp.size, Errors: 1, Note: "run failed: " + err.Error()}
	}
	r.Round, r.Target, r.BgBusy, r.WaitedS, r.Noisy = round, t.Name, bg, waited.Seconds(), noisy
	h.record(r)
	switch sp.test {
	case "echo":
		h.logf("r%d %-20s echo  %3d conns: %8.0f msg/s p50 %6.1fµs p99 %7.1fµs p999 %7.1fµs  errors %d bg %.0f%% %s",
			round, t.Name, conns, r.MsgsPerS, r.P50us, r.P99us, r.P999us, r.Errors, bg*100, r.Note)
	case "bulk":
		h.logf("r%d %-20s bulk  %3d conns: %8.0f MB/s (acks %6.0f MB/s) cpu %.2f ms/MB (attributed %.2f)  errors %d bg %.0f%% %s",
			round, t.Name, conns, r.MBps, r.AckMBps, r.CPUMsPerMB, r.CPUAttrMsPerMB, r.Errors, bg*100, r.Note)
	case "hs":
		h.logf("r%d %-20s hs    %3d conc:  %8.0f hs/s p50 %.2fms p99 %.2fms cpu %.0f µs/hs  errors %d bg %.0f%% %s",
			round, t.Name, conns, r.HsPerS, r.HsP50ms, r.HsP99ms, r.CPUUsPerHs, r.Errors, bg*100, r.Note)
	case "chatty":
		h.logf("r%d %-20s chatty %4d conns: %7.0f msg/s, proxy %.1f%% of a CPU = %.2f ms/1000 msgs, kernel threads %.2f, attributed %.2f, machine %.2f ms/1000 msgs (busy %.0f%%); p50 %.0fµs p99 %.0fµs; connected in %.1fs; generator %.0f%% of its CPU, others %.0f%% of the machine  errors %d bg %.0f%% %s",
			round, t.Name, conns, r.MsgsPerS, r.ProxyCPUPct, r.ProxyMsPerKMsg, r.KthreadMsPerKMsg, r.AttrMsPerKMsg, r.CPUMsPerKMsg,
			r.MachineBusy*100, r.P50us, r.P99us, r.ConnectS, r.GenCPUPct, r.OtherLoad*100, r.Errors, bg*100, r.Note)
	}
}

// memMedian is the per-field median of five /proc/meminfo samples 100 ms
// apart (other load on a shared machine moves these by megabytes).
func memMedian() memInfo {
	var av, sl, su, so []int64
	for i := range 5 {
		if i > 0 {
			time.Sleep(100 * time.Millisecond)
		}
		m := readMem()
		av, sl, su, so = append(av, m.Available), append(sl, m.Slab), append(su, m.SUnreclaim), append(so, m.SlabObjs)
	}
	mid := func(v []int64) int64 { slices.Sort(v); return v[len(v)/2] }
	return memInfo{Available: mid(av), Slab: mid(sl), SUnreclaim: mid(su), SlabObjs: mid(so)}
}

// idle opens plan.idleConns connections through t from a separate process
// and measures the proxy's RSS and the kernel's memory before and after.
func (h *harness) idle(round int, t *target) {
	bg, waited, noisy := h.quiet()
	r := Result{Round: round, Target: t.Name, Test: "idle", Conns: h.plan.idleConns, BgBusy: bg, WaitedS: waited.Seconds(), Noisy: noisy}
	defer func() { h.record(r) }()
	time.Sleep(300 * time.Millisecond)
	pid := t.PID()
	r.RSSBefore = rssBytes(pid)
	m0 := memMedian()

	argv := pinned(h.genCPU, selfExe(), "-role", "idle", "-addr", t.Addr, "-conns", strconv.Itoa(h.plan.idleConns))
	if t.TLS {
		argv = append(argv, "-tls")
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		r.Errors, r.Note = 1, err.Error()
		return
	}
	defer func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		time.Sleep(h.plan.settle) // let the proxy see the closes before the next run
	}()
	lineC := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		lineC <- l
		_, _ = io.Copy(io.Discard, stdout)
	}()
	var line string
	select {
	case line = <-lineC:
	case <-time.After(180 * time.Second):
		r.Errors, r.Note = 1, "idle clients did not get ready in 180 s"
		return
	}
	var ok, failed int
	var lastErr string
	if _, err := fmt.Sscanf(line, "ready %d %d %q", &ok, &failed, &lastErr); err != nil {
		r.Errors, r.Note = 1, "idle clients said "+strings.TrimSpace(line)
		return
	}
	r.IdleConns, r.Errors = ok, failed
	if lastErr != "" {
		r.Note = "last error: " + lastErr
	}
	time.Sleep(h.plan.settle) // let the proxy settle (GC, deferred frees)
	r.RSSAfter = rssBytes(pid)
	m1 := memMedian()
	if ok > 0 {
		if pid > 0 {
			r.RSSPerConn = float64(r.RSSAfter-r.RSSBefore) / float64(ok)
		}
		r.SlabPerConn = float64(m1.Slab-m0.Slab) / float64(ok)
		r.UnrecPerConn = float64(m1.SUnreclaim-m0.SUnreclaim) / float64(ok)
		r.SlabObjsPerConn = float64(m1.SlabObjs-m0.SlabObjs) / float64(ok)
		r.AvailPerConn = float64(m0.Available-m1.Available) / float64(ok)
	}
	h.logf("r%d %-20s idle %5d conns (%d failed): proxy RSS %.0f B/conn; kernel: slab objects %.0f, SUnreclaim %.0f, Slab %.0f, MemAvailable %.0f B/conn; bg %.0f%% %s",
		round, t.Name, ok, failed, r.RSSPerConn, r.SlabObjsPerConn, r.UnrecPerConn, r.SlabPerConn, r.AvailPerConn, bg*100, r.Note)
}

// slow runs the slow-reader test on t.
func (h *harness) slow(t *target) {
	bg, waited, noisy := h.quiet()
	args := []string{"-test", "slow", "-addr", t.Addr, "-size", strconv.Itoa(64 << 10), "-dur", h.plan.slowDur.String(),
		"-rate", strconv.FormatInt(h.plan.slowRate, 10), "-cap", strconv.FormatInt(h.plan.slowCap, 10),
		"-proxy", strconv.Itoa(t.PID()), "-pids", h.pids(t), "-stats", h.stats, "-recover", h.plan.recoverMax.String()}
	r, err := h.gen(h.plan.slowDur+60*time.Second, args...)
	if err != nil {
		r = Result{Test: "slow", Conns: 1, Errors: 1, Note: "run failed: " + err.Error()}
	}
	r.Round, r.Target, r.BgBusy, r.WaitedS, r.Noisy = 1, t.Name, bg, waited.Seconds(), noisy
	h.record(r)
	h.logf("   %-20s slow reader: sent %.0f MiB, read %.1f MiB (acked %.1f MiB), peak kernel +%.0f MiB (Slab +%.0f MiB), proxy RSS +%.1f MiB, memory back in %.1fs %s",
		t.Name, mib(r.SentBytes), mib(r.ReadBytes), mib(r.AckedBytes), mib(r.PeakAvailDelta), mib(r.PeakSlabDelta), mib(r.PeakRSSDelta), r.RecoverS, r.Note)
	time.Sleep(500 * time.Millisecond)
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// childrenOf lists the direct children of pid.
func childrenOf(pid int) []int {
	var out []int
	for p, ps := range allProcs() {
		if ps.ppid == pid {
			out = append(out, p)
		}
	}
	return out
}
