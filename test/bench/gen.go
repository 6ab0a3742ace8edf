package main

// The load generator. The harness re-executes itself with -role gen (pinned
// to its own core) for each measurement; the generator warms up, measures
// for a fixed window and prints one JSON result. CPU is read at the edges
// of the window only, from /proc/stat (whole machine) and from the
// processes that take part (attributed).

import (
	"bufio"
	crand "crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// genOpts are the generator's flags.
type genOpts struct {
	test    string
	addr    string
	conns   int
	size    int
	dur     time.Duration
	warm    time.Duration
	pids    []int
	rate    int64         // slow reader bytes/s
	cap     int64         // slow test: most bytes the sender tries to push
	proxy   int           // slow test: proxy PID for RSS
	stats   string        // backends' stats address
	recover time.Duration // slow test: longest wait for memory to come back
	period  time.Duration // chatty test: mean time between one connection's messages
}

// statsClient reads the backends' receive counters.
type statsClient struct {
	c  net.Conn
	br *bufio.Reader
}

func dialStats(addr string) (*statsClient, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("backend stats: %w", err)
	}
	return &statsClient{c: c, br: bufio.NewReader(c)}, nil
}

// read returns the bytes the sinks tagged tag have read so far.
func (s *statsClient) read(tag string) (uint64, error) {
	_ = s.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(s.c, "%s\n", tag); err != nil {
		return 0, err
	}
	line, err := s.br.ReadString('\n')
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(line), 10, 64)
}

func newTag() string {
	var b [8]byte
	_, _ = crand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// phases of a measurement.
const (
	phaseWarm int32 = iota
	phaseMeasure
	phaseStop
)

// window measures CPU across the measurement window. With split set it
// also keeps the proxy's own CPU (proxy and its descendants) and the
// kernel threads' apart, from the same /proc snapshots.
type window struct {
	pids   []int
	proxy  int
	split  bool
	t0, t1 time.Time
	c0, c1 cpuStat
	a0, a1 map[int]uint64
	p0, p1 map[int]uint64
	k0, k1 map[int]uint64
	g0, g1 map[int]uint64 // the generator itself
}

func (w *window) sample() (a, p, k, g map[int]uint64) {
	procs := allProcs()
	a = attributedFrom(procs, w.pids)
	if w.split {
		p, k, g = processJiffies(procs, w.proxy), kthreadJiffies(procs), processJiffies(procs, os.Getpid())
	}
	return a, p, k, g
}

func (w *window) start() {
	w.a0, w.p0, w.k0, w.g0 = w.sample()
	w.c0 = readCPU()
	w.t0 = time.Now()
}

func (w *window) stop() {
	w.t1 = time.Now()
	w.c1 = readCPU()
	w.a1, w.p1, w.k1, w.g1 = w.sample()
}

func (w *window) fill(r *Result) {
	r.DurS = w.t1.Sub(w.t0).Seconds()
	r.CPUBusyS = busySeconds(w.c0, w.c1)
	// No irq/softirq term: with tick accounting and no IRQ time accounting
	// (this kernel), softirq ticks are already in the interrupted task's
	// stime, so adding /proc/stat's softirq would count them twice.
	r.CPUAttrS = float64(jiffiesBetween(w.a0, w.a1)) / clkTck
	r.MachineBusy = busyFraction(w.c0, w.c1)
	if t := float64(w.c1.total()-w.c0.total()) / clkTck; t > 0 {
		r.OtherLoad = max(0, r.CPUBusyS-r.CPUAttrS) / t
	}
	if w.split {
		if w.proxy > 0 {
			r.ProxyPID = w.proxy
			r.ProxyCPUS = float64(jiffiesBetween(w.p0, w.p1)) / clkTck
			if r.DurS > 0 {
				r.ProxyCPUPct = r.ProxyCPUS / r.DurS * 100
			}
		}
		r.KthreadCPUS = float64(jiffiesBetween(w.k0, w.k1)) / clkTck
		if r.DurS > 0 {
			r.GenCPUPct = float64(jiffiesBetween(w.g0, w.g1)) / clkTck / r.DurS * 100
		}
	}
}

func runGen(o genOpts) error {
	o.pids = append(o.pids, os.Getpid())
	var r Result
	var err error
	switch o.test {
	case "echo":
		r, err = genEcho(o)
	case "bulk":
		r, err = genBulk(o)
	case "hs":
		r, err = genHandshakes(o)
	case "slow":
		r, err = genSlow(o)
	case "chatty":
		r, err = genChatty(o)
	default:
		return fmt.Errorf("unknown test %q", o.test)
	}
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(r)
}

// dialAll opens n upgraded connections on path, 32 at a time.
func dialAll(addr, path string, n int) ([]net.Conn, []*bufio.Reader, error) {
	conns, brs, failed, firstErr := dialEach(addr, path, n)
	if failed > 0 {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		return nil, nil, firstErr
	}
	return conns, brs, nil
}

// dialEach tries to open n upgraded connections on path, 32 at a time; the
// ones that failed are nil, counted in failed, the first error kept.
func dialEach(addr, path string, n int) (conns []net.Conn, brs []*bufio.Reader, failed int, firstErr error) {
	conns = make([]net.Conn, n)
	brs = make([]*bufio.Reader, n)
	var wg sync.WaitGroup
	var mu sync.Mutex
	sem := make(chan struct{}, 32)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			c, br, _, err := wsDial(addr, path, 10*time.Second)
			if err != nil {
				mu.Lock()
				failed++
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
				return
			}
			conns[i], brs[i] = c, br
		}(i)
	}
	wg.Wait()
	return conns, brs, failed, firstErr
}

// echoOnce sends one masked message carrying seq and checks the echo.
func echoOnce(c net.Conn, br *bufio.Reader, out, payload, in []byte, seq uint64) error {
	binary.LittleEndian.PutUint64(payload, seq)
	h := len(out) - len(payload)
	key := out[h-4 : h]
	copy(out[h:], payload)
	maskBytes(out[h:], key)
	if _, err := c.Write(out); err != nil {
		return err
	}
	f, err := readFrameHeader(br)
	if err != nil {
		return err
	}
	if f.n != len(payload) || f.op != opBinary {
		return fmt.Errorf("echo: got op %d length %d, want %d", f.op, f.n, len(payload))
	}
	if _, err := io.ReadFull(br, in[:f.n]); err != nil {
		return err
	}
	if binary.LittleEndian.Uint64(in) != seq {
		return fmt.Errorf("echo: message %d came back as %d", seq, binary.LittleEndian.Uint64(in))
	}
	return nil
}

// genEcho runs closed-loop round trips of o.size bytes on o.conns connections.
func genEcho(o genOpts) (Result, error) {
	r := Result{Test: "echo", Conns: o.conns, Size: o.size}
	conns, brs, err := dialAll(o.addr, "/echo", o.conns)
	if err != nil {
		return r, err
	}
	var phase atomic.Int32
	var errs atomic.Int64
	lat := make([][]int64, o.conns)
	var wg sync.WaitGroup
	for i := range conns {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c, br := conns[i], brs[i]
			payload := make([]byte, max(o.size, 8))
			out := clientFrame(opBinary, payload) // header and key reused; payload re-masked per message
			in := make([]byte, len(payload))
			l := make([]int64, 0, 1<<16)
			for seq := uint64(1); ; seq++ {
				p := phase.Load()
				if p == phaseStop {
					break
				}
				t := time.Now()
				if err := echoOnce(c, br, out, payload, in, seq); err != nil {
					if phase.Load() != phaseStop {
						errs.Add(1)
					}
					break
				}
				if p == phaseMeasure && phase.Load() == phaseMeasure {
					l = append(l, int64(time.Since(t)))
				}
			}
			lat[i] = l
		}(i)
	}
	time.Sleep(o.warm)
	w := window{pids: o.pids}
	w.start()
	phase.Store(phaseMeasure)
	time.Sleep(o.dur)
	phase.Store(phaseStop)
	w.stop()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		for _, c := range conns {
			c.Close()
		}
		<-done
	}
	resetAll(conns)
	all := flatten(lat)
	w.fill(&r)
	r.Errors = int(errs.Load())
	r.Msgs = int64(len(all))
	r.MsgsPerS = float64(r.Msgs) / r.DurS
	if len(all) > 0 {
		slices.Sort(all)
		q := func(p float64) float64 { return float64(all[min(int(p*float64(len(all))), len(all)-1)]) / 1e3 }
		r.P50us, r.P99us, r.P999us = q(0.50), q(0.99), q(0.999)
	}
	return r, nil
}

// genChatty is the many-quiet-connections case: o.conns connections each
// send one o.size-byte masked message, wait for its echo and sleep, so that
// each sends one message per o.period on average (the gaps are jittered by
// ±20 % and each connection's first message comes at a random point of the
// first period, so they do not fire together). Sends follow their schedule,
// not the echo: a connection whose echo took longer than its gap sends the
// next message at once, without catching up on the ones it missed. After
// every connection is up (and o.warm) it measures for o.dur: the round
// trips that started and ended in the window, and CPU of the whole machine,
// of the run's processes and kernel threads (attributed), of the proxy
// alone (o.proxy and its descendants) and of every kernel thread.
func genChatty(o genOpts) (Result, error) {
	r := Result{Test: "chatty", Conns: o.conns, Size: o.size, PeriodMs: float64(o.period) / 1e6}
	if o.period <= 0 {
		return r, fmt.Errorf("chatty: period %s", o.period)
	}
	t0 := time.Now()
	conns, brs, failed, firstErr := dialEach(o.addr, "/echo", o.conns)
	r.ConnectS = time.Since(t0).Seconds()
	if failed == o.conns {
		return r, firstErr
	}
	if failed > 0 {
		r.Note = fmt.Sprintf("%d of %d connections failed to open (first: %v)", failed, o.conns, firstErr)
	}
	var phase atomic.Int32
	var errs atomic.Int64
	var lastErr atomic.Value
	stop := make(chan struct{})
	lat := make([][]int64, o.conns)
	perConn := int(o.dur/o.period)*5/4 + 4
	start := time.Now()
	var wg sync.WaitGroup
	for i := range conns {
		if conns[i] == nil {
			continue
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c, br := conns[i], brs[i]
			payload := make([]byte, max(o.size, 8))
			out := clientFrame(opBinary, payload) // header and key reused; payload re-masked per message
			in := make([]byte, len(payload))
			l := make([]int64, 0, perConn)
			defer func() { lat[i] = l }()
			next := start.Add(time.Duration(mrand.Int64N(int64(o.period))))
			tm := time.NewTimer(time.Until(next))
			defer tm.Stop()
			for seq := uint64(1); ; seq++ {
				select {
				case <-stop:
					return
				case <-tm.C:
				}
				p := phase.Load()
				t := time.Now()
				if err := echoOnce(c, br, out, payload, in, seq); err != nil {
					if phase.Load() != phaseStop {
						errs.Add(1)
						lastErr.Store(err.Error())
					}
					return
				}
				now := time.Now()
				if p == phaseMeasure && phase.Load() == phaseMeasure {
					l = append(l, int64(now.Sub(t)))
				}
				gap := time.Duration(float64(o.period) * (0.8 + 0.4*mrand.Float64()))
				if next = next.Add(gap); next.Before(now) {
					next = now
				}
				tm.Reset(next.Sub(now))
			}
		}(i)
	}
	time.Sleep(o.warm)
	w := window{pids: o.pids, proxy: o.proxy, split: true}
	w.start()
	phase.Store(phaseMeasure)
	time.Sleep(o.dur)
	phase.Store(phaseStop)
	w.stop()
	close(stop)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second): // an echo the proxy never delivered
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		<-done
	}
	resetAll(conns)
	all := flatten(lat)
	w.fill(&r)
	r.Errors += failed + int(errs.Load())
	if s, ok := lastErr.Load().(string); ok {
		r.Note = strings.TrimPrefix(r.Note+"; last error: "+s, "; ")
	}
	r.Msgs = int64(len(all))
	r.MsgsPerS = float64(r.Msgs) / r.DurS
	if len(all) > 0 {
		slices.Sort(all)
		q := func(p float64) float64 { return float64(all[min(int(p*float64(len(all))), len(all)-1)]) / 1e3 }
		r.P50us, r.P99us, r.P999us = q(0.50), q(0.99), q(0.999)
		k := float64(r.Msgs) / 1000
		r.ProxyMsPerKMsg = r.ProxyCPUS * 1e3 / k
		r.KthreadMsPerKMsg = r.KthreadCPUS * 1e3 / k
		r.AttrMsPerKMsg = r.CPUAttrS * 1e3 / k
		r.CPUMsPerKMsg = r.CPUBusyS * 1e3 / k
	}
	return r, nil
}

// genBulk streams o.size-byte messages client→backend on o.conns
// connections. The rate is what the backends read (their counter, read on
// the stats port), not what the sender wrote: sockmap accepts bytes it has
// only parked. The backends also ack every MiB over the connection; the
// acks' rate shows whether the reverse direction keeps up.
func genBulk(o genOpts) (Result, error) {
	r := Result{Test: "bulk", Conns: o.conns, Size: o.size}
	st, err := dialStats(o.stats)
	if err != nil {
		return r, err
	}
	defer st.c.Close()
	tag := newTag()
	conns, brs, err := dialAll(o.addr, "/sink?tag="+tag, o.conns)
	if err != nil {
		return r, err
	}
	var phase atomic.Int32
	var errs atomic.Int64
	acked := make([]atomic.Uint64, o.conns)
	var wg sync.WaitGroup
	frame := clientFrame(opBinary, make([]byte, o.size))
	for i := range conns {
		wg.Add(2)
		go func(i int) { // writer
			defer wg.Done()
			for phase.Load() != phaseStop {
				if _, err := conns[i].Write(frame); err != nil {
					if phase.Load() != phaseStop {
						errs.Add(1)
					}
					return
				}
			}
		}(i)
		go func(i int) { // ack reader
			defer wg.Done()
			var b [8]byte
			for {
				f, err := readFrameHeader(brs[i])
				if err != nil || f.n != 8 {
					if phase.Load() != phaseStop {
						errs.Add(1)
					}
					return
				}
				if _, err := io.ReadFull(brs[i], b[:]); err != nil {
					return
				}
				acked[i].Store(binary.BigEndian.Uint64(b[:]))
			}
		}(i)
	}
	sum := func() uint64 {
		var s uint64
		for i := range acked {
			s += acked[i].Load()
		}
		return s
	}
	time.Sleep(o.warm)
	w := window{pids: o.pids}
	w.start()
	a0 := sum()
	b0, err0 := st.read(tag)
	phase.Store(phaseMeasure)
	time.Sleep(o.dur)
	b1, err1 := st.read(tag)
	a1 := sum()
	w.stop()
	phase.Store(phaseStop)
	resetAll(conns)
	wg.Wait()
	if err := errors.Join(err0, err1); err != nil {
		return r, err
	}
	w.fill(&r)
	r.Errors = int(errs.Load())
	r.Bytes = int64(b1 - b0)
	r.MBps = float64(r.Bytes) / 1e6 / r.DurS
	r.AckedBytes = int64(a1 - a0)
	r.AckMBps = float64(r.AckedBytes) / 1e6 / r.DurS
	if r.Bytes > 0 {
		r.CPUMsPerMB = r.CPUBusyS * 1e3 / (float64(r.Bytes) / 1e6)
		r.CPUAttrMsPerMB = r.CPUAttrS * 1e3 / (float64(r.Bytes) / 1e6)
	}
	return r, nil
}

// handshakeCycle connects, upgrades, exchanges close frames and waits for
// the server's FIN (the server closes first, so the client keeps no
// TIME_WAIT socket). It returns the time to the 101 response.
func handshakeCycle(addr string, closeMsg []byte) (time.Duration, error) {
	c, br, hs, err := wsDial(addr, "/echo", 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(closeMsg); err != nil {
		return 0, err
	}
	f, err := readFrameHeader(br)
	if err != nil {
		return 0, fmt.Errorf("reading close frame: %w", err)
	}
	if f.op != opClose {
		return 0, fmt.Errorf("got opcode %d, want close", f.op)
	}
	if _, err := br.Discard(f.n); err != nil {
		return 0, err
	}
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		return 0, fmt.Errorf("after close: want EOF, got %v", err)
	}
	return hs, nil
}

// genHandshakes runs o.conns workers doing handshake cycles back to back.
func genHandshakes(o genOpts) (Result, error) {
	r := Result{Test: "hs", Conns: o.conns}
	var phase atomic.Int32
	var errs atomic.Int64
	var lastErr atomic.Value
	lat := make([][]int64, o.conns)
	closeMsg := closeFrame(true)
	var wg sync.WaitGroup
	for i := range o.conns {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			l := make([]int64, 0, 1<<14)
			for {
				p := phase.Load()
				if p == phaseStop {
					break
				}
				hs, err := handshakeCycle(o.addr, closeMsg)
				if err != nil {
					if p == phaseMeasure {
						errs.Add(1)
						lastErr.Store(err.Error())
					}
					time.Sleep(10 * time.Millisecond)
					continue
				}
				if p == phaseMeasure && phase.Load() == phaseMeasure {
					l = append(l, int64(hs))
				}
			}
			lat[i] = l
		}(i)
	}
	time.Sleep(o.warm)
	w := window{pids: o.pids}
	w.start()
	phase.Store(phaseMeasure)
	time.Sleep(o.dur)
	phase.Store(phaseStop)
	w.stop()
	wg.Wait()
	all := flatten(lat)
	w.fill(&r)
	r.Errors = int(errs.Load())
	if s, ok := lastErr.Load().(string); ok {
		r.Note = "last error: " + s
	}
	r.Handshakes = int64(len(all))
	r.HsPerS = float64(r.Handshakes) / r.DurS
	if len(all) > 0 {
		slices.Sort(all)
		q := func(p float64) float64 { return float64(all[min(int(p*float64(len(all))), len(all)-1)]) / 1e6 }
		r.HsP50ms, r.HsP99ms = q(0.50), q(0.99)
		r.CPUUsPerHs = r.CPUBusyS * 1e6 / float64(r.Handshakes)
		r.CPUAttrUsPerHs = r.CPUAttrS * 1e6 / float64(r.Handshakes)
	}
	return r, nil
}

// genSlow pushes up to o.cap bytes as fast as the path accepts them to a
// backend that reads o.rate bytes/s for o.dur, and samples kernel memory
// and the proxy's RSS meanwhile: with TCP flow control the sender blocks
// after a few MB; without it (sockmap with no demotion) the bytes park in
// the kernel.
func genSlow(o genOpts) (Result, error) {
	r := Result{Test: "slow", Conns: 1, Size: o.size}
	m0 := readMem()
	rss0 := rssBytes(o.proxy)
	st, err := dialStats(o.stats)
	if err != nil {
		return r, err
	}
	defer st.c.Close()
	tag := newTag()
	path := fmt.Sprintf("/slow?rate=%d&dur=%s&tag=%s", o.rate, o.dur, tag)
	conns, brs, err := dialAll(o.addr, path, 1)
	if err != nil {
		return r, err
	}
	c, br := conns[0], brs[0]
	var sent, acked atomic.Int64
	frame := clientFrame(opBinary, make([]byte, o.size))
	go func() {
		for sent.Load()+int64(o.size) <= o.cap {
			if _, err := c.Write(frame); err != nil {
				return
			}
			sent.Add(int64(o.size))
		}
	}()
	go func() {
		var b [8]byte
		for {
			f, err := readFrameHeader(br)
			if err != nil || f.n != 8 {
				return
			}
			if _, err := io.ReadFull(br, b[:]); err != nil {
				return
			}
			acked.Store(int64(binary.BigEndian.Uint64(b[:])))
		}
	}()
	w := window{pids: o.pids}
	w.start()
	minAvail, maxSlab, maxRSS := m0.Available, m0.Slab, rss0
	tick := time.NewTicker(100 * time.Millisecond)
	deadline := time.Now().Add(o.dur)
	for time.Now().Before(deadline) {
		<-tick.C
		m := readMem()
		minAvail = min(minAvail, m.Available)
		maxSlab = max(maxSlab, m.Slab)
		maxRSS = max(maxRSS, rssBytes(o.proxy))
	}
	tick.Stop()
	w.stop()
	r.SentBytes, r.AckedBytes = sent.Load(), acked.Load()
	// The backend closes at o.dur; close our side too and time how long
	// the kernel takes to give the memory back.
	_ = c.(*net.TCPConn).SetLinger(0)
	c.Close()
	t := time.Now()
	r.NotRecovered = true
	for time.Since(t) < o.recover {
		if m := readMem(); m0.Available-m.Available < 32<<20 {
			r.NotRecovered = false
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.RecoverS = time.Since(t).Seconds()
	// What the reader really read (the acks may be held by the proxy).
	if n, err := st.read(tag); err == nil {
		r.ReadBytes = int64(n)
	}
	w.fill(&r)
	r.PeakAvailDelta = m0.Available - minAvail
	r.PeakSlabDelta = maxSlab - m0.Slab
	if o.proxy > 0 {
		r.PeakRSSDelta = maxRSS - rss0
	}
	return r, nil
}

// runIdle holds conns upgraded connections (each checked with one echo),
// prints "ready OK FAILED" and waits for stdin to close.
func runIdle(addr string, n int, useTLS bool) error {
	conns := make([]net.Conn, n)
	var failed atomic.Int64
	var lastErr atomic.Value
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			c, br, _, err := wsDialTLS(addr, "/echo", 10*time.Second, useTLS)
			if err == nil {
				payload := make([]byte, 64)
				err = echoOnce(c, br, clientFrame(opBinary, payload), payload, make([]byte, 64), uint64(i+1))
				if err != nil {
					c.Close()
				}
			}
			if err != nil {
				failed.Add(1)
				lastErr.Store(err.Error())
				return
			}
			conns[i] = c
		}(i)
	}
	wg.Wait()
	ok := 0
	for _, c := range conns {
		if c != nil {
			ok++
		}
	}
	le, _ := lastErr.Load().(string)
	fmt.Printf("ready %d %d %q\n", ok, failed.Load(), le)
	_, _ = io.Copy(io.Discard, os.Stdin)
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	return nil
}

// resetAll closes every connection (nil ones are skipped) with an RST, so
// that no socket lingers in TIME_WAIT between tests.
func resetAll(conns []net.Conn) {
	for _, c := range conns {
		if c != nil {
			_ = c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
	}
}

// flatten joins the per-connection latency samples.
func flatten(lat [][]int64) []int64 {
	var all []int64
	for _, l := range lat {
		all = append(all, l...)
	}
	return all
}
