package health

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wsplice/wsplice/pkg/config"
)

// TestFailoverAndRecovery breaks one of two real backends in each way a
// backend breaks, for each check that can see it, and checks that it goes
// down within the fall time (and not before fall checks could have run),
// gets no picks while down, and comes back within the rise time.
func TestFailoverAndRecovery(t *testing.T) {
	type breakage struct {
		name           string
		breakIt, fixIt func(*testBackend)
	}
	kill := breakage{"killed", (*testBackend).kill, (*testBackend).restart}
	slow := breakage{"slow", func(b *testBackend) { b.set(modeSlow) }, func(b *testBackend) { b.set(modeOK) }}
	e500 := breakage{"status 500", func(b *testBackend) { b.set(mode500) }, func(b *testBackend) { b.set(modeOK) }}
	for _, tc := range []struct {
		typ string
		brk breakage
	}{
		{"tcp", kill},
		{"http", kill}, {"http", slow}, {"http", e500},
		{"websocket", kill}, {"websocket", slow}, {"websocket", e500},
	} {
		t.Run(tc.typ+"/"+tc.brk.name, func(t *testing.T) {
			lg := watchLag(t)
			a, b := newBackend(t), newBackend(t)
			pc := poolCfg(tc.typ, a.addr, b.addr)
			p := newPool(t, pc)
			c, ev := startChecker(t, p, pc, Options{})
			waitActive(t, c, patience)
			// A first check can time out when the machine is loaded;
			// what counts starts once both were seen up.
			steady := len(ev.snapshot())

			lg.reset()
			t0 := time.Now()
			tc.brk.breakIt(a)
			down, next := ev.wait(t, steady, a.addr, ChangeDown, patience)
			took := down.Time.Sub(t0)
			allow := lg.allow(fallBound(), tFall+1)
			t.Logf("down after %s (bound %s, allowed %s with the machine's lag): %s", took, fallBound(), allow, down.Reason)
			if took > allow {
				t.Errorf("down after %s, want within fall × interval × (1+jitter) + timeout = %s (+ lag: %s)", took, fallBound(), allow)
			}
			// fall − 1 further checks must fail after the first failing one.
			if min := time.Duration(float64(tFall-1) * float64(tInterval) * (1 - tJitter)); took < min-5*time.Millisecond {
				t.Errorf("down after %s: faster than %d checks allow (%s)", took, tFall, min)
			}
			if got := picks(t, p, 500); got[a.addr] != 0 || got[b.addr] != 500 {
				t.Errorf("picks while %s is down: %v", a.addr, got)
			}

			lg.reset()
			t1 := time.Now()
			tc.brk.fixIt(a)
			up, _ := ev.wait(t, next, a.addr, ChangeUp, patience)
			took = up.Time.Sub(t1)
			allow = lg.allow(riseBound(), tRise+1)
			t.Logf("up after %s (bound %s, allowed %s): %s", took, riseBound(), allow, up.Reason)
			if took > allow {
				t.Errorf("up after %s, want within rise × interval × (1+jitter) + timeout = %s (+ lag: %s)", took, riseBound(), allow)
			}
			if got := picks(t, p, 100); got[a.addr] != 50 || got[b.addr] != 50 {
				t.Errorf("picks after recovery: %v, want 50/50", got)
			}
			if b := backendOf(p, a.addr); !b.Healthy() {
				t.Error("backend not healthy after up event")
			}
			if h := c.History(a.addr); len(h) < 2 || h[len(h)-2] != down || h[len(h)-1] != up {
				t.Errorf("history does not end with the down and up events: %v", h)
			}
			k := c.Counters()
			if k.StateChanges < uint64(steady)+2 || k.Checks == 0 || k.CheckFailures < tFall {
				t.Errorf("counters %+v", k)
			}
		})
	}
}

// TestFirstCheckDecides: a backend that is dead when checks start goes
// down on its first failed check, not after fall of them.
func TestFirstCheckDecides(t *testing.T) {
	lg := watchLag(t)
	a, b := newBackend(t), newBackend(t)
	a.kill()
	pc := poolCfg("tcp", a.addr, b.addr)
	p := newPool(t, pc)
	t0 := time.Now()
	_, ev := startChecker(t, p, pc, Options{})
	down, _ := ev.wait(t, 0, a.addr, ChangeDown, patience)
	if took, allow := down.Time.Sub(t0), lg.allow(tInterval+tTimeout, 2); took > allow {
		t.Errorf("dead backend went down after %s, want within one interval + timeout (%s with lag)", took, allow)
	}
	if got := picks(t, p, 50); got[a.addr] != 0 {
		t.Errorf("picks: %v", got)
	}
}

// TestWebSocketRealServer: the websocket check passes against a real
// WebSocket library that greets every client before reading, and the
// server reads a close frame (1001 going away), not an abnormal end.
func TestWebSocketRealServer(t *testing.T) {
	be := newBackend(t)
	pr := &prober{typ: CheckWebSocket, timeout: time.Second, path: "/chat/", expect: 1 << 2}
	for range 3 {
		if err := pr.probe(t.Context(), be.addr); err != nil {
			t.Fatalf("websocket check: %v", err)
		}
	}
	deadline := time.Now().Add(patience)
	for be.hits.Load() != 3 || be.closes.Load() != 1001 {
		if time.Now().After(deadline) {
			t.Fatalf("backend saw %d upgrades, last close code %d; want 3 and 1001", be.hits.Load(), be.closes.Load())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestPassiveMaxFails: max_fails failures within fail_timeout take a
// backend out for fail_timeout, even while active checks pass; a success
// between failures, or failures spread wider than fail_timeout, do not.
func TestPassiveMaxFails(t *testing.T) {
	lg := watchLag(t)
	a, b := newBackend(t), newBackend(t)
	pc := poolCfg("tcp", a.addr, b.addr)
	pc.Health.MaxFails = 3
	const failTO = 150 * time.Millisecond
	pc.Health.FailTimeout = config.Duration(failTO)
	p := newPool(t, pc)
	c, ev := startChecker(t, p, pc, Options{})
	waitActive(t, c, patience)
	ba := backendOf(p, a.addr)
	boom := errors.New("connection refused")

	// Two failures, a success, two failures: never three in a row.
	c.ReportConnectFailure(ba, boom)
	c.ReportConnectFailure(ba, boom)
	c.ReportSuccess(ba)
	c.ReportConnectFailure(ba, boom)
	c.ReportConnectFailure(ba, boom)
	if !ba.Healthy() {
		t.Fatal("down although a success came between failures")
	}
	// The window expires: the next failure starts a new one.
	time.Sleep(failTO + 20*time.Millisecond)
	c.ReportConnectFailure(ba, boom)
	if !ba.Healthy() {
		t.Fatal("down although the failures were more than fail_timeout apart")
	}
	c.ReportConnectFailure(ba, boom)
	lg.reset()
	t0 := time.Now()
	c.ReportConnectFailure(ba, boom)
	if ba.Healthy() {
		t.Fatal("still up after max_fails failures within fail_timeout")
	}
	passive := func(e Event) bool { return e.Address == a.addr && strings.HasPrefix(e.Reason, "passive") }
	down, next := ev.waitFor(t, 0, "passive down", func(e Event) bool { return passive(e) && e.Change == ChangeDown }, patience)
	t.Logf("%s", down.Reason)
	if got := picks(t, p, 200); got[a.addr] != 0 {
		t.Errorf("picks while passively down: %v", got)
	}
	// Active checks keep passing; the hold lasts fail_timeout anyway.
	up, _ := ev.waitFor(t, next, "passive up", func(e Event) bool { return passive(e) && e.Change == ChangeUp }, patience)
	held := up.Time.Sub(t0)
	if held < failTO || held > lg.allow(failTO, 1) {
		t.Errorf("held down for %s, want fail_timeout %s (at most %s with lag)", held, failTO, lg.allow(failTO, 1))
	}
	k := c.Counters()
	if k.PassiveFailures != 7 || k.PassiveMarkDowns != 1 {
		t.Errorf("counters %+v, want 7 passive failures and 1 mark-down", k)
	}
}

// TestPassiveOnly: with no active check, passive failures alone take a
// backend out and time brings it back (nginx without the check module).
func TestPassiveOnly(t *testing.T) {
	pc := poolCfg("none", "127.0.0.1:1", "127.0.0.1:2")
	pc.Health.MaxFails = 1
	pc.Health.FailTimeout = config.Duration(60 * time.Millisecond)
	p := newPool(t, pc)
	c, ev := startChecker(t, p, pc, Options{})
	b1 := backendOf(p, "127.0.0.1:1")
	c.ReportResult(b1, errors.New("refused"))
	_, next := ev.wait(t, 0, b1.Address(), ChangeDown, patience)
	ev.wait(t, next, b1.Address(), ChangeUp, patience)
	if c.Counters().Checks != 0 {
		t.Error("active checks ran with type none")
	}
	if s := c.Status()[0]; s.Active != StateOff {
		t.Errorf("active state %q, want off", s.Active)
	}
}

// TestSlowStart: a recovered backend's weight ramps from about 10% to
// full over slow_start, and its share of picks follows.
func TestSlowStart(t *testing.T) {
	lg := watchLag(t)
	a, b := newBackend(t), newBackend(t)
	pc := poolCfg("tcp", a.addr, b.addr)
	const ss = 300 * time.Millisecond
	pc.Health.SlowStart = config.Duration(ss)
	p := newPool(t, pc)
	c, ev := startChecker(t, p, pc, Options{})
	waitActive(t, c, patience)
	ba := backendOf(p, a.addr)
	full := SlowStartScale
	if ba.Weight() != full || backendOf(p, b.addr).Weight() != full {
		t.Fatalf("weights %d, %d: want both scaled to %d", ba.Weight(), backendOf(p, b.addr).Weight(), full)
	}
	if got := picks(t, p, 100); got[a.addr] != 50 {
		t.Errorf("shares before: %v, want 50/50 (scaling must not change shares)", got)
	}

	steady := len(ev.snapshot())
	a.kill()
	_, next := ev.wait(t, steady, a.addr, ChangeDown, patience)
	a.restart()
	up, _ := ev.wait(t, next, a.addr, ChangeUp, patience)
	lg.reset()
	first := ba.Weight()
	early := picks(t, p, 110)
	wEarly := ba.Weight()
	var samples []int
	var fullAt time.Time
	for deadline := time.Now().Add(patience); time.Now().Before(deadline); time.Sleep(3 * time.Millisecond) {
		w := ba.Weight()
		samples = append(samples, w)
		if w == full {
			fullAt = time.Now()
			break
		}
	}
	t.Logf("weight at up: %d; early picks %v; samples %v", first, early, samples)
	if first > 2 {
		t.Errorf("weight right after recovery = %d, want about 10%% of %d", first, full)
	}
	// Round robin gives a the share its weight says, whatever it was
	// while the picks ran.
	if max := 110 * wEarly / (wEarly + full); early[a.addr] > max+2 {
		t.Errorf("recovered backend took %d of 110 early picks; its weight (≤ %d of %d) allows %d", early[a.addr], wEarly, full, max)
	}
	mid := false
	for i, w := range samples {
		if i > 0 && w < samples[i-1] {
			t.Fatalf("weight went down during the ramp: %v", samples)
		}
		mid = mid || (w > first && w < full)
	}
	switch took := fullAt.Sub(up.Time); {
	case fullAt.IsZero():
		t.Fatalf("weight never reached %d: %v", full, samples)
	case !mid:
		t.Errorf("no weight between %d and %d seen: a jump, not a ramp: %v", first, full, samples)
	case took < ss*9/10:
		t.Errorf("full weight after %s, before slow_start %s", took, ss)
	case took > lg.allow(ss, 2):
		t.Errorf("full weight after %s, want about slow_start %s (at most %s with lag)", took, ss, lg.allow(ss, 2))
	}
	if got := picks(t, p, 100); got[a.addr] != 50 {
		t.Errorf("shares after the ramp: %v, want 50/50", got)
	}
	deadline := time.Now().Add(patience)
	for s := c.Status()[0]; !s.SlowStartUntil.IsZero() || s.Weight != full || s.FullWeight != full; s = c.Status()[0] {
		if time.Now().After(deadline) {
			t.Fatalf("status after the ramp: %+v", s)
		}
		time.Sleep(3 * time.Millisecond)
	}
}

// TestStopFinishesRamp: a Checker stopped (not replaced) mid-ramp gives
// the backend its full weight rather than leaving it at a fraction.
func TestStopFinishesRamp(t *testing.T) {
	a := newBackend(t)
	a.kill()
	pc := poolCfg("tcp", a.addr, "127.0.0.1:1")
	pc.Health.SlowStart = config.Duration(time.Minute)
	p := newPool(t, pc)
	c, ev := startChecker(t, p, pc, Options{})
	_, next := ev.wait(t, 0, a.addr, ChangeDown, patience)
	a.restart()
	ev.wait(t, next, a.addr, ChangeUp, patience)
	ba := backendOf(p, a.addr)
	if w := ba.Weight(); w >= SlowStartScale {
		t.Fatalf("weight %d: no ramp started", w)
	}
	c.Stop()
	if w := ba.Weight(); w != SlowStartScale {
		t.Errorf("weight after Stop = %d, want full %d", w, SlowStartScale)
	}
}

// TestReloadNoFlap replaces a running Checker, with and without
// Options.Previous, while one backend is down and one is ramping: no
// backend changes state, history and counters carry over, the ramp goes
// on, and the new Checker brings the down one back.
func TestReloadNoFlap(t *testing.T) {
	for _, handover := range []bool{true, false} {
		t.Run(fmt.Sprintf("previous=%v", handover), func(t *testing.T) {
			a, b, r := newBackend(t), newBackend(t), newBackend(t)
			pc := poolCfg("http", a.addr, b.addr, r.addr)
			pc.Health.SlowStart = config.Duration(time.Minute)
			p := newPool(t, pc)
			old, oev := startChecker(t, p, pc, Options{})
			waitActive(t, old, patience)
			steady := len(oev.snapshot())
			a.kill()
			r.set(mode500)
			oev.wait(t, steady, a.addr, ChangeDown, patience)
			_, next := oev.wait(t, steady, r.addr, ChangeDown, patience)
			r.set(modeOK)
			oev.wait(t, next, r.addr, ChangeUp, patience)
			rampW := backendOf(p, r.addr).Weight()
			before := old.Counters()

			// The reload: the new Checker starts over the same pool.
			opt := Options{}
			npc := pc
			if handover {
				opt.Previous = old
			} else {
				old.Stop()
				// Without Previous the first check of every backend
				// decides, as at start: give it a timeout that a stall of
				// two shared cores does not reach so easily.
				npc.Health.Interval = config.Duration(80 * time.Millisecond)
				npc.Health.Timeout = config.Duration(60 * time.Millisecond)
			}
			nc, nev := startChecker(t, p, npc, opt)
			time.Sleep(4 * npc.Health.Interval.D())
			if evs := nev.snapshot(); len(evs) != 0 {
				t.Errorf("events after reload (flap): %v", evs)
			}
			if backendOf(p, a.addr).Healthy() || !backendOf(p, b.addr).Healthy() || !backendOf(p, r.addr).Healthy() {
				t.Errorf("states changed across reload: %+v", nc.Status())
			}
			if handover {
				if h := nc.History(a.addr); len(h) == 0 || h[len(h)-1].Change != ChangeDown {
					t.Errorf("history not carried over: %v", h)
				}
				if k := nc.Counters(); k.Checks <= before.Checks || k.StateChanges != before.StateChanges {
					t.Errorf("counters not carried over: before %+v, after %+v", before, k)
				}
				if w := backendOf(p, r.addr).Weight(); w < rampW || w >= SlowStartScale {
					t.Errorf("ramp weight %d after reload, was %d: the ramp did not go on", w, rampW)
				}
			}
			a.restart()
			nev.wait(t, 0, a.addr, ChangeUp, patience)
		})
	}
}

// TestJitter: every interval stays within ±jitter, first checks spread
// over the first interval, and real checks keep to the bounds.
func TestJitter(t *testing.T) {
	const d = 100 * time.Millisecond
	lo, hi := time.Duration(float64(d)*(1-0.2)), time.Duration(float64(d)*(1+0.2))
	for _, u := range []float64{0, 0.25, 0.5, 0.999999} {
		if got := jitter(d, 0.2, u); got < lo || got > hi {
			t.Errorf("jitter(u=%g) = %s, outside [%s, %s]", u, got, lo, hi)
		}
	}
	if got := jitter(d, 0, 0.9); got != d {
		t.Errorf("no jitter gave %s", got)
	}
	for _, u := range []float64{0, 0.5, 0.999999} {
		if got := firstDelay(d, u); got < 0 || got >= d {
			t.Errorf("firstDelay(u=%g) = %s, outside [0, %s)", u, got, d)
		}
	}

	// A real checker: every check starts at least (1−j) × interval after
	// the previous one started (timers never fire early), at most
	// (1+j) × interval plus the machine's lag, and the gaps differ.
	lg := watchLag(t)
	const iv, j = 20 * time.Millisecond, 0.25
	be := newBackend(t)
	pc := poolCfg("http", be.addr)
	pc.Health.Interval = config.Duration(iv)
	pc.Health.Timeout = config.Duration(10 * time.Millisecond)
	p := newPool(t, pc)
	c, err := NewChecker(p, pc, Options{Jitter: j, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var starts []time.Time
	c.onCheck = func(_ string, start time.Time, _ error) {
		mu.Lock()
		starts = append(starts, start)
		mu.Unlock()
	}
	c.Start(t.Context())
	for deadline := time.Now().Add(patience); ; time.Sleep(5 * time.Millisecond) {
		mu.Lock()
		n := len(starts)
		mu.Unlock()
		if n >= 26 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d checks in %s", n, patience)
		}
	}
	c.Stop()
	var gaps []time.Duration
	distinct := map[time.Duration]bool{}
	for i := 1; i < len(starts); i++ {
		g := starts[i].Sub(starts[i-1])
		gaps = append(gaps, g)
		distinct[g.Round(time.Millisecond)] = true
		if min := time.Duration(float64(iv) * (1 - j)); g < min {
			t.Errorf("gap %d = %s, below (1−jitter) × interval = %s", i, g, min)
		}
		if max := lg.allow(time.Duration(float64(iv)*(1+j)), 1); g > max {
			t.Errorf("gap %d = %s, above (1+jitter) × interval + lag = %s", i, g, max)
		}
	}
	t.Logf("gaps: %v", gaps)
	if len(distinct) < 3 {
		t.Errorf("gaps look unjittered: %v", gaps)
	}
}

// TestOperatorWeight: an operator's weight is scaled like the configured
// ones on a slow-start pool, is what a ramp climbs to, and survives a
// handover.
func TestOperatorWeight(t *testing.T) {
	a, b := newBackend(t), newBackend(t)
	pc := poolCfg("tcp", a.addr, b.addr)
	pc.Health.SlowStart = config.Duration(200 * time.Millisecond)
	p := newPool(t, pc)
	c, ev := startChecker(t, p, pc, Options{})
	waitActive(t, c, patience)
	if err := c.SetWeight(a.addr, 3); err != nil {
		t.Fatal(err)
	}
	if err := c.SetWeight("127.0.0.1:1", 3); err == nil {
		t.Error("weight set on a backend the pool does not have")
	}
	if err := c.SetWeight(a.addr, 1001); err == nil {
		t.Error("weight out of range accepted")
	}
	ba := backendOf(p, a.addr)
	if w := ba.Weight(); w != 3*SlowStartScale {
		t.Fatalf("weight %d, want 3 × %d", w, SlowStartScale)
	}
	if got := picks(t, p, 400); got[a.addr] != 300 {
		t.Errorf("picks %v, want 3:1", got)
	}

	steady := len(ev.snapshot())
	a.kill()
	_, next := ev.wait(t, steady, a.addr, ChangeDown, patience)
	a.restart()
	ev.wait(t, next, a.addr, ChangeUp, patience)
	for deadline := time.Now().Add(patience); ba.Weight() != 3*SlowStartScale; time.Sleep(3 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("ramp ended at %d, want the operator's %d", ba.Weight(), 3*SlowStartScale)
		}
	}

	nc, _ := startChecker(t, p, pc, Options{Previous: c})
	if s := nc.Status()[0]; s.FullWeight != 3*SlowStartScale || s.Weight != 3*SlowStartScale {
		t.Errorf("after handover: weight %d of %d, want the operator's %d", s.Weight, s.FullWeight, 3*SlowStartScale)
	}
}
