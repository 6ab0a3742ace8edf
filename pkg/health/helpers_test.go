package health

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/config"
)

// Test timing: intervals of tens of milliseconds keep tests short on two
// shared cores; slack absorbs scheduling under -race.
const (
	tInterval = 30 * time.Millisecond
	tTimeout  = 20 * time.Millisecond
	tRise     = 2
	tFall     = 3
	tJitter   = 0.1
	// slack is the fixed part of a timing allowance; see lag for the
	// part that follows the machine's load.
	slack = 50 * time.Millisecond
	// patience bounds how long a test waits for an event at all: it only
	// catches hangs. Whether the event came in time is judged separately
	// against the measured time.
	patience = 10 * time.Second
)

// lag measures how late timers fire while a test runs. The machine is
// shared (load averages of 12 on two cores, and timers 1 s late, were
// seen while these tests ran), so a timing bound is judged as
// documented bound + hops × worst lateness seen + slack: a check that is
// slow because the checker is wrong fails it; one that is slow because
// the process got no CPU does not.
type lag struct {
	worst atomic.Int64
	done  chan struct{}
}

func watchLag(t testing.TB) *lag {
	l := &lag{done: make(chan struct{})}
	go func() {
		const tick = 2 * time.Millisecond
		tm := time.NewTimer(tick)
		defer tm.Stop()
		for {
			t0 := time.Now()
			tm.Reset(tick)
			select {
			case <-l.done:
				return
			case <-tm.C:
			}
			late := int64(time.Since(t0) - tick)
			for {
				w := l.worst.Load()
				if late <= w || l.worst.CompareAndSwap(w, late) {
					break
				}
			}
		}
	}()
	t.Cleanup(func() { close(l.done) })
	return l
}

// reset starts a new measuring window.
func (l *lag) reset() { l.worst.Store(0) }

// allow is the allowance for something documented to take at most bound
// and that waits on hops timers or I/O steps in a row.
func (l *lag) allow(bound time.Duration, hops int) time.Duration {
	return bound + time.Duration(hops)*time.Duration(l.worst.Load()) + slack
}

// fallBound is the documented worst case from a failure to the verdict:
// fall checks, each at most (1+jitter) × interval apart, the last one
// timing out.
func fallBound() time.Duration { return bound(tFall) }

func riseBound() time.Duration { return bound(tRise) }

func bound(n int) time.Duration {
	j := tJitter
	return time.Duration(float64(n)*float64(tInterval)*(1+j)) + tTimeout
}

// backendMode is how a testBackend answers.
type backendMode int32

const (
	modeOK   backendMode = iota
	modeSlow             // accept and read, never answer
	mode500              // answer every request with 500
)

// testBackend is an HTTP and WebSocket server on a fixed loopback address
// that a test can kill, restart, slow down or break. Its WebSocket side is
// a real library (coder/websocket, as pkg/demo's echo server uses) rather
// than pkg/demo itself, so these tests do not build the whole agent.
type testBackend struct {
	t    testing.TB
	addr string
	mode atomic.Int32
	hits atomic.Int64
	// closes is the close code of the last WebSocket session as the
	// server read it (-1: it ended without a close frame).
	closes atomic.Int64
	done   chan struct{} // releases slow handlers at cleanup

	mu   sync.Mutex
	srv  *http.Server
	seen []time.Time // arrival of each request
}

func newBackend(t testing.TB) *testBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &testBackend{t: t, addr: ln.Addr().String(), done: make(chan struct{})}
	b.serve(ln)
	t.Cleanup(func() {
		close(b.done)
		b.kill()
	})
	return b
}

func (b *testBackend) serve(ln net.Listener) {
	srv := &http.Server{Handler: http.HandlerFunc(b.handle), ReadHeaderTimeout: time.Second}
	b.mu.Lock()
	b.srv = srv
	b.mu.Unlock()
	go srv.Serve(ln)
}

func (b *testBackend) handle(w http.ResponseWriter, r *http.Request) {
	b.hits.Add(1)
	b.mu.Lock()
	b.seen = append(b.seen, time.Now())
	b.mu.Unlock()
	switch backendMode(b.mode.Load()) {
	case modeSlow:
		select {
		case <-r.Context().Done():
		case <-b.done:
		case <-time.After(5 * time.Second):
		}
		return
	case mode500:
		http.Error(w, "broken", http.StatusInternalServerError)
		return
	}
	if r.Header.Get("Upgrade") == "" {
		io.WriteString(w, "ok\n")
		return
	}
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		return
	}
	defer c.CloseNow()
	// Greet first, as pkg/demo's echo server does: a check must cope with
	// frames arriving before its close frame is answered.
	if err := c.Write(r.Context(), websocket.MessageText, []byte("hello from "+b.addr)); err != nil {
		return
	}
	for {
		if _, _, err := c.Read(r.Context()); err != nil {
			b.closes.Store(int64(websocket.CloseStatus(err)))
			return
		}
	}
}

// kill closes the listener and every connection: connects are refused.
func (b *testBackend) kill() {
	b.mu.Lock()
	srv := b.srv
	b.srv = nil
	b.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// restart listens on the same address again.
func (b *testBackend) restart() {
	b.t.Helper()
	var ln net.Listener
	var err error
	for range 50 {
		if ln, err = net.Listen("tcp", b.addr); err == nil {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err != nil {
		b.t.Fatalf("restart %s: %v", b.addr, err)
	}
	b.serve(ln)
}

func (b *testBackend) set(m backendMode) { b.mode.Store(int32(m)) }

func (b *testBackend) arrivals() []time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]time.Time(nil), b.seen...)
}

// poolCfg is a pool config with the test timings.
func poolCfg(typ string, addrs ...string) config.Pool {
	pc := config.Pool{
		Name: "p",
		Health: config.Health{
			Type: typ, Interval: config.Duration(tInterval), Timeout: config.Duration(tTimeout),
			Rise: tRise, Fall: tFall, Path: "/", FailTimeout: config.Duration(10 * time.Second),
		},
	}
	for _, a := range addrs {
		pc.Backends = append(pc.Backends, config.Backend{Address: a, Weight: 1})
	}
	return pc
}

// newPool builds a round-robin pool over the config's addresses, as the
// proxy would.
func newPool(t testing.TB, pc config.Pool) *balance.Pool {
	t.Helper()
	var specs []balance.BackendSpec
	for _, b := range pc.Backends {
		specs = append(specs, balance.BackendSpec{Address: b.Address, Weight: b.Weight})
	}
	p, err := balance.NewPool(pc.Name, specs, balance.Options{Algorithm: balance.RoundRobin})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// events collects a Checker's events for a test to wait on.
type events struct {
	mu      sync.Mutex
	all     []Event
	c       chan struct{}
	checker *Checker // for diagnostics when a wait fails
}

func newEvents() *events { return &events{c: make(chan struct{}, 1)} }

func (e *events) add(ev Event) {
	e.mu.Lock()
	e.all = append(e.all, ev)
	e.mu.Unlock()
	select {
	case e.c <- struct{}{}:
	default:
	}
}

func (e *events) snapshot() []Event {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]Event(nil), e.all...)
}

// wait returns the first event for addr with change ch after index from,
// and the index after it, failing the test if none comes within d.
func (e *events) wait(t testing.TB, from int, addr string, ch Change, d time.Duration) (Event, int) {
	t.Helper()
	return e.waitFor(t, from, fmt.Sprintf("%s event for %s", ch, addr), func(ev Event) bool {
		return ev.Address == addr && ev.Change == ch
	}, d)
}

// waitFor is wait for any event that ok accepts.
func (e *events) waitFor(t testing.TB, from int, what string, ok func(Event) bool, d time.Duration) (Event, int) {
	t.Helper()
	deadline := time.After(d)
	for {
		all := e.snapshot()
		for i := from; i < len(all); i++ {
			if ok(all[i]) {
				return all[i], i + 1
			}
		}
		select {
		case <-e.c:
		case <-deadline:
			var st []BackendStatus
			if e.checker != nil {
				st = e.checker.Status()
			}
			t.Fatalf("no %s within %s; events: %v; status: %+v", what, d, all, st)
		}
	}
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startChecker starts a Checker with the test options and stops it at
// cleanup.
func startChecker(t testing.TB, p *balance.Pool, pc config.Pool, opt Options) (*Checker, *events) {
	t.Helper()
	ev := newEvents()
	opt.OnEvent = ev.add
	if opt.Logger == nil {
		opt.Logger = testLogger(t)
	}
	if opt.Jitter == 0 {
		opt.Jitter = tJitter
	}
	c, err := NewChecker(p, pc, opt)
	if err != nil {
		t.Fatal(err)
	}
	ev.checker = c
	c.Start(t.Context())
	t.Cleanup(c.Stop)
	return c, ev
}

// waitActive waits until every backend has been checked and is up.
func waitActive(t testing.TB, c *Checker, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ok := true
		for _, s := range c.Status() {
			ok = ok && s.Active == StateUp && s.State == StateUp
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("backends not all up within %s: %+v", d, c.Status())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// picks draws n backends and releases them, counting by address.
func picks(t testing.TB, p *balance.Pool, n int) map[string]int {
	t.Helper()
	out := map[string]int{}
	for range n {
		b, err := p.Pick(balance.Key{}, nil)
		if err != nil {
			out[""]++
			continue
		}
		out[b.Address()]++
		b.Release()
	}
	return out
}

func backendOf(p *balance.Pool, addr string) *balance.Backend {
	for _, b := range p.Backends() {
		if b.Address() == addr {
			return b
		}
	}
	return nil
}

// dnsServer is a minimal authoritative DNS server on a loopback UDP port:
// A, AAAA and SRV answers from maps a test changes, NXDOMAIN for unknown
// names, SERVFAIL on demand. It parses only what Go's resolver sends (one
// question, uncompressed) and writes answers with a pointer to the
// question's name. Written here rather than taken from a DNS library to
// keep a test-only dependency out of the shared go.mod; the parsing side,
// which is what matters, is Go's own resolver.
type dnsServer struct {
	addr    string
	pc      net.PacketConn
	fail    atomic.Bool
	queries atomic.Int64

	mu  sync.Mutex
	ips map[string][]netip.Addr // lower-case FQDN
	srv map[string][]net.SRV
}

func startDNS(t testing.TB) *dnsServer {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &dnsServer{addr: pc.LocalAddr().String(), pc: pc, ips: map[string][]netip.Addr{}, srv: map[string][]net.SRV{}}
	go s.serve()
	t.Cleanup(func() { pc.Close() })
	return s
}

func (s *dnsServer) setIPs(name string, ips ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var l []netip.Addr
	for _, ip := range ips {
		l = append(l, netip.MustParseAddr(ip))
	}
	s.ips[strings.ToLower(name)] = l
}

func (s *dnsServer) setSRV(name string, recs ...net.SRV) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.srv[strings.ToLower(name)] = recs
}

func (s *dnsServer) serve() {
	buf := make([]byte, 1500)
	for {
		n, from, err := s.pc.ReadFrom(buf)
		if err != nil {
			return
		}
		if resp, err := s.answer(buf[:n]); err == nil {
			s.pc.WriteTo(resp, from)
		}
	}
}

const (
	dnsA    = 1
	dnsAAAA = 28
	dnsSRV  = 33
)

func (s *dnsServer) answer(q []byte) ([]byte, error) {
	s.queries.Add(1)
	if len(q) < 12 || binary.BigEndian.Uint16(q[4:]) != 1 {
		return nil, errors.New("want one question")
	}
	name, end, err := readName(q, 12)
	if err != nil || end+4 > len(q) {
		return nil, errors.New("bad question")
	}
	qtype := binary.BigEndian.Uint16(q[end:])
	question := q[12 : end+4]

	s.mu.Lock()
	ips, hasIPs := s.ips[name]
	srvs, hasSRV := s.srv[name]
	s.mu.Unlock()
	rcode := 0
	var answers [][]byte
	switch {
	case s.fail.Load():
		rcode = 2 // SERVFAIL
	case !hasIPs && !hasSRV:
		rcode = 3 // NXDOMAIN
	case qtype == dnsA || qtype == dnsAAAA:
		for _, ip := range ips {
			if ip.Is4() == (qtype == dnsA) {
				answers = append(answers, rr(qtype, ip.AsSlice()))
			}
		}
	case qtype == dnsSRV:
		for _, r := range srvs {
			d := binary.BigEndian.AppendUint16(nil, r.Priority)
			d = binary.BigEndian.AppendUint16(d, r.Weight)
			d = binary.BigEndian.AppendUint16(d, r.Port)
			answers = append(answers, rr(dnsSRV, appendName(d, r.Target)))
		}
	}
	// QR, AA, RD copied, RA, rcode.
	flags := uint16(0x8000|0x0400|0x0080) | binary.BigEndian.Uint16(q[2:])&0x0100 | uint16(rcode)
	out := append([]byte(nil), q[0:2]...)
	out = binary.BigEndian.AppendUint16(out, flags)
	out = binary.BigEndian.AppendUint16(out, 1)
	out = binary.BigEndian.AppendUint16(out, uint16(len(answers)))
	out = append(out, 0, 0, 0, 0)
	out = append(out, question...)
	for _, a := range answers {
		out = append(out, a...)
	}
	return out, nil
}

// rr is a resource record for the question's name (pointer to offset 12),
// class IN, TTL 5.
func rr(typ uint16, data []byte) []byte {
	b := []byte{0xc0, 12}
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint16(b, 1)
	b = binary.BigEndian.AppendUint32(b, 5)
	b = binary.BigEndian.AppendUint16(b, uint16(len(data)))
	return append(b, data...)
}

func readName(b []byte, off int) (string, int, error) {
	var labels []string
	for {
		if off >= len(b) {
			return "", 0, errors.New("short name")
		}
		l := int(b[off])
		off++
		if l == 0 {
			break
		}
		if l > 63 || off+l > len(b) {
			return "", 0, errors.New("bad label")
		}
		labels = append(labels, strings.ToLower(string(b[off:off+l])))
		off += l
	}
	return strings.Join(labels, ".") + ".", off, nil
}

func appendName(b []byte, name string) []byte {
	for l := range strings.SplitSeq(strings.TrimSuffix(name, "."), ".") {
		b = append(b, byte(len(l)))
		b = append(b, l...)
	}
	return append(b, 0)
}
