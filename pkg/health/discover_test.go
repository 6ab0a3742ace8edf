package health

import (
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/config"
)

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct {
		addr string
		kind targetKind
		bad  bool
	}{
		{"10.0.0.1:8080", targetStatic, false},
		{"[2001:db8::1]:8080", targetStatic, false},
		{"chat.example.com:8080", targetHost, false},
		{"chat.example.com.:8080", targetHost, false},
		{"_ws._tcp.chat.default.svc.cluster.local", targetSRV, false},
		{"_ws._tcp.chat.test.", targetSRV, false},
		{"_ws.chat.test", 0, true},                     // one underscore label, no port
		{"_ws._tcp.chat.test:8080", targetHost, false}, // a port makes it a host name
		{"chat.example.com", 0, true},
		{"chat.example.com:0", 0, true},
		{"chat.example.com:http", 0, true},
		{":8080", 0, true},
	} {
		tg, err := parseTarget(config.Backend{Address: tc.addr})
		if (err != nil) != tc.bad {
			t.Errorf("%q: err %v, want bad=%v", tc.addr, err, tc.bad)
			continue
		}
		if err == nil && tg.kind != tc.kind {
			t.Errorf("%q: kind %d, want %d", tc.addr, tg.kind, tc.kind)
		}
	}
}

// addrs returns the pool's backend addresses, sorted.
func addrs(p *balance.Pool) []string {
	var out []string
	for _, b := range p.Backends() {
		out = append(out, b.Address())
	}
	slices.Sort(out)
	return out
}

// waitAddrs waits until the pool holds exactly want.
func waitAddrs(t *testing.T, p *balance.Pool, d time.Duration, want ...string) {
	t.Helper()
	slices.Sort(want)
	deadline := time.Now().Add(d)
	for !slices.Equal(addrs(p), want) {
		if time.Now().After(deadline) {
			t.Fatalf("pool holds %v, want %v", addrs(p), want)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestDNSDiscovery follows A/AAAA and SRV changes from a DNS server on a
// loopback port, keeps the last good set through SERVFAIL and NXDOMAIN,
// and keeps the Backend objects of addresses that stay.
func TestDNSDiscovery(t *testing.T) {
	dns := startDNS(t)
	dns.setIPs("svc.test.", "127.0.0.2", "127.0.0.3", "::1")
	dns.setSRV("_ws._tcp.chat.test.",
		net.SRV{Target: "pod1.chat.test.", Port: 9001, Priority: 0},
		net.SRV{Target: "pod2.chat.test.", Port: 9002, Priority: 0},
		net.SRV{Target: "spare.chat.test.", Port: 9003, Priority: 10})
	dns.setIPs("pod1.chat.test.", "127.0.1.1")
	dns.setIPs("pod2.chat.test.", "127.0.1.2")
	dns.setIPs("pod3.chat.test.", "127.0.1.3")
	dns.setIPs("spare.chat.test.", "127.0.1.9")

	pc := poolCfg("none", "10.9.9.9:7000", "svc.test.:8080", "_ws._tcp.chat.test.")
	p := newPool(t, pc) // the proxy's pool, with the literal names
	const every = 30 * time.Millisecond
	c, ev := startChecker(t, p, pc, Options{Resolver: NewResolver(dns.addr), DNSInterval: every})

	// Start resolved synchronously.
	want := []string{"10.9.9.9:7000", "127.0.0.2:8080", "127.0.0.3:8080", "[::1]:8080", "127.0.1.1:9001", "127.0.1.2:9002", "127.0.1.9:9003"}
	waitAddrs(t, p, 0, want...)
	if b := backendOf(p, "127.0.1.9:9003"); !b.Backup() {
		t.Error("SRV target of a higher priority value is not a backup")
	}
	if b := backendOf(p, "127.0.1.1:9001"); b.Backup() {
		t.Error("SRV target of the best priority is a backup")
	}
	if s := c.Status(); s[1].Source != "svc.test.:8080" {
		t.Errorf("source of %s = %q", s[1].Address, s[1].Source)
	}
	keep := backendOf(p, "127.0.0.2:8080")
	keepSRV := backendOf(p, "127.0.1.1:9001")

	// A record set changes: .3 leaves, .4 arrives.
	dns.setIPs("svc.test.", "127.0.0.2", "127.0.0.4", "::1")
	want = []string{"10.9.9.9:7000", "127.0.0.2:8080", "127.0.0.4:8080", "[::1]:8080", "127.0.1.1:9001", "127.0.1.2:9002", "127.0.1.9:9003"}
	waitAddrs(t, p, patience, want...)

	// SRV: pod2 goes, pod3 comes, pod1 moves port.
	dns.setSRV("_ws._tcp.chat.test.",
		net.SRV{Target: "pod1.chat.test.", Port: 9101},
		net.SRV{Target: "pod3.chat.test.", Port: 9003})
	want = []string{"10.9.9.9:7000", "127.0.0.2:8080", "127.0.0.4:8080", "[::1]:8080", "127.0.1.1:9101", "127.0.1.3:9003"}
	waitAddrs(t, p, patience, want...)
	if backendOf(p, "127.0.0.2:8080") != keep {
		t.Error("a backend that stayed was replaced: it lost its state")
	}
	_ = keepSRV

	// The server fails: the last good set stays, errors are counted.
	k0 := c.Counters()
	dns.fail.Store(true)
	time.Sleep(5 * every)
	waitAddrs(t, p, 0, want...)
	k1 := c.Counters()
	if k1.ResolveErrors <= k0.ResolveErrors {
		t.Errorf("resolve errors not counted: %+v → %+v", k0, k1)
	}
	dns.fail.Store(false)

	// A name that vanishes (NXDOMAIN) keeps its last good set too.
	dns.mu.Lock()
	delete(dns.ips, "svc.test.")
	dns.mu.Unlock()
	time.Sleep(5 * every)
	waitAddrs(t, p, 0, want...)
	dns.setIPs("svc.test.", "127.0.0.2")
	want = []string{"10.9.9.9:7000", "127.0.0.2:8080", "127.0.1.1:9101", "127.0.1.3:9003"}
	waitAddrs(t, p, patience, want...)
	if backendOf(p, "127.0.0.2:8080") != keep {
		t.Error("a backend that stayed was replaced")
	}

	wantAdded := []string{"127.0.0.4:8080", "127.0.1.1:9101", "127.0.1.3:9003"}
	wantRemoved := []string{"127.0.0.3:8080", "127.0.0.4:8080", "127.0.1.1:9001", "127.0.1.2:9002", "127.0.1.9:9003", "[::1]:8080"}
	var added, removed []string
	// Events are delivered after the pool update the addresses show (outside
	// the checker's lock), so give the last ones a moment to arrive.
	for deadline := time.Now().Add(patience); ; time.Sleep(10 * time.Millisecond) {
		added, removed = nil, nil
		for _, e := range ev.snapshot() {
			switch e.Change {
			case ChangeAdded:
				added = append(added, e.Address)
			case ChangeRemoved:
				removed = append(removed, e.Address)
			}
		}
		if len(added)+len(removed) >= len(wantAdded)+len(wantRemoved) || time.Now().After(deadline) {
			break
		}
	}
	for _, e := range ev.snapshot() {
		if e.Change == ChangeAdded && !strings.HasPrefix(e.Reason, "dns: ") {
			t.Errorf("added event without its name: %+v", e)
		}
	}
	slices.Sort(added)
	slices.Sort(removed)
	if !slices.Equal(added, wantAdded) || !slices.Equal(removed, wantRemoved) {
		t.Errorf("added %v (want %v), removed %v (want %v)", added, wantAdded, removed, wantRemoved)
	}
	k := c.Counters()
	if k.Added != uint64(len(wantAdded)) || k.Removed != uint64(len(wantRemoved)) {
		t.Errorf("counters %+v", k)
	}
	if n := len(c.Recent()); n != len(wantAdded)+len(wantRemoved) {
		t.Errorf("recent log has %d events: %v", n, c.Recent())
	}
}

// TestDNSNeverResolved: a host name that never resolved stays in the pool
// as written (the dialer resolves it), an SRV name contributes nothing, and
// both are picked up once DNS answers.
func TestDNSNeverResolved(t *testing.T) {
	dns := startDNS(t)
	dns.fail.Store(true)
	pc := poolCfg("none", "10.9.9.9:7000", "late.test.:8080", "_ws._tcp.late.test.")
	p := newPool(t, pc)
	c, _ := startChecker(t, p, pc, Options{Resolver: NewResolver(dns.addr), DNSInterval: 20 * time.Millisecond})
	waitAddrs(t, p, 0, "10.9.9.9:7000", "late.test.:8080")
	dns.setIPs("late.test.", "127.0.0.5")
	dns.setIPs("pod.late.test.", "127.0.0.6")
	dns.setSRV("_ws._tcp.late.test.", net.SRV{Target: "pod.late.test.", Port: 9000})
	dns.fail.Store(false)
	waitAddrs(t, p, patience, "10.9.9.9:7000", "127.0.0.5:8080", "127.0.0.6:9000")
	if k := c.Counters(); k.ResolveErrors < 2 || k.UpdateErrors != 0 {
		t.Errorf("counters %+v", k)
	}
}

// TestDNSAddedSlowStart: a backend that DNS adds to a running pool starts
// at a fraction of its weight; those present at start do not.
func TestDNSAddedSlowStart(t *testing.T) {
	dns := startDNS(t)
	dns.setIPs("svc.test.", "127.0.0.2")
	pc := poolCfg("none", "svc.test.:8080")
	pc.Health.SlowStart = config.Duration(time.Minute)
	p := newPool(t, pc)
	startChecker(t, p, pc, Options{Resolver: NewResolver(dns.addr), DNSInterval: 20 * time.Millisecond})
	waitAddrs(t, p, 0, "127.0.0.2:8080")
	if w := backendOf(p, "127.0.0.2:8080").Weight(); w != SlowStartScale {
		t.Errorf("initial backend weight %d, want full %d", w, SlowStartScale)
	}
	dns.setIPs("svc.test.", "127.0.0.2", "127.0.0.3")
	waitAddrs(t, p, patience, "127.0.0.2:8080", "127.0.0.3:8080")
	if w := backendOf(p, "127.0.0.3:8080").Weight(); w >= SlowStartScale/2 {
		t.Errorf("new backend weight %d: no slow start", w)
	}
}
