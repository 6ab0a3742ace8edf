package health

import (
	"errors"
	"testing"
	"time"

	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/config"
)

// TestSet walks the agent's sequence: Specs for the proxy's pools, Apply,
// passive reports routed by pool name, a reload that keeps state, a bad
// reload that changes nothing, and a pool that goes away.
func TestSet(t *testing.T) {
	dns := startDNS(t)
	dns.setIPs("svc.test.", "127.0.0.2")
	a := newBackend(t)
	chat := poolCfg("tcp", a.addr, "svc.test.:8080")
	chat.Name = "chat"
	chat.Health.SlowStart = config.Duration(time.Second)
	feed := poolCfg("none", "127.0.0.1:1")
	feed.Name = "feed"
	feed.Health.MaxFails = 1

	s := NewSet(Options{Resolver: NewResolver(dns.addr), DNSInterval: 20 * time.Millisecond, Logger: testLogger(t)})
	t.Cleanup(s.Stop)

	// The proxy's compile: specs come from the Set.
	pools := map[string]*balance.Pool{}
	for _, pc := range []config.Pool{chat, feed} {
		specs, err := s.Specs(t.Context(), pc)
		if err != nil {
			t.Fatal(err)
		}
		p, err := balance.NewPool(pc.Name, specs, balance.Options{})
		if err != nil {
			t.Fatal(err)
		}
		pools[pc.Name] = p
	}
	if got := addrs(pools["chat"]); len(got) != 2 || got[1] != "127.0.0.2:8080" {
		t.Fatalf("chat specs %v: the DNS name was not resolved", got)
	}
	if w := pools["chat"].Backends()[0].Weight(); w != SlowStartScale {
		t.Errorf("chat weight %d, want scaled %d", w, SlowStartScale)
	}
	if err := s.Apply(t.Context(), pools, []config.Pool{chat, feed}); err != nil {
		t.Fatal(err)
	}
	if s.Checker("other") != nil {
		t.Fatal("checker for an unknown pool")
	}

	// Passive reports find their pool.
	fb := pools["feed"].Backends()[0]
	s.ReportResult("feed", fb, errors.New("refused"))
	s.ReportResult("nope", fb, errors.New("refused")) // ignored
	if fb.Healthy() {
		t.Fatal("feed backend still up after max_fails = 1 failure")
	}

	// A reload with the same config: same Backend objects, same states,
	// no events, counters continue.
	old := s.Checker("chat")
	before := old.Counters()
	specs, err := s.Specs(t.Context(), chat)
	if err != nil {
		t.Fatal(err)
	}
	if err := pools["chat"].Update(specs); err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(t.Context(), pools, []config.Pool{chat, feed}); err != nil {
		t.Fatal(err)
	}
	if s.Checker("chat") == old {
		t.Fatal("reload kept the old checker")
	}
	if fb.Healthy() {
		t.Error("passive hold-down lost across reload")
	}
	if k := s.Counters()["chat"]; k.Checks < before.Checks {
		t.Errorf("counters went backwards: %+v → %+v", before, k)
	}

	// A reload the checks cannot use changes nothing.
	bad := chat
	bad.Health.Type = "icmp"
	cur := s.Checker("chat")
	if err := s.Apply(t.Context(), pools, []config.Pool{bad, feed}); err == nil {
		t.Fatal("bad reload accepted")
	}
	if s.Checker("chat") != cur {
		t.Error("bad reload replaced a checker")
	}

	// feed goes away.
	fc := s.Checker("feed")
	if err := s.Apply(t.Context(), pools, []config.Pool{chat}); err != nil {
		t.Fatal(err)
	}
	if s.Checker("feed") != nil {
		t.Error("checker of a removed pool still listed")
	}
	s.ReportResult("feed", fb, errors.New("refused"))
	if k := fc.Counters(); k.PassiveFailures != 1 {
		t.Errorf("stopped checker took a report: %+v", k)
	}
	if st := s.Status(); len(st["chat"]) != 2 {
		t.Errorf("status %+v", st)
	}
}
