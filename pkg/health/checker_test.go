package health

import (
	"errors"
	"fmt"
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
			a, b := newBackend(t), newBackend(t)
			pc := poolCfg(tc.typ, a.addr, b.addr)
			p := newPool(t, pc)
			c, ev := startChecker(t, p, pc, Options{})
			waitActive(t, c, tInterval+tTimeout+slack)
			// A first check can time out under -race on a busy machine;
			// what counts starts once both were seen up.
			steady := len(ev.snapshot())

			t0 := time.Now()
			tc.brk.breakIt(a)
			down, next := ev.wait(t, steady, a.addr, ChangeDown, fallBound()+slack)
			took := down.Time.Sub(t0)
			t.Logf("down after %s (bound %s): %s", took, fallBound(), down.Reason)
			if took > fallBound()+slack {
				t.Errorf("down after %s, want within fall × interval + timeout = %s", took, fallBound())
			}
			// fall − 1 further checks must fail after the first failing one.
			if min := time.Duration(float64(tFall-1) * float64(tInterval) * (1 - tJitter)); took < min-5*time.Millisecond {
				t.Errorf("down after %s: faster than %d checks allow (%s)", took, tFall, min)
			}
			if got := picks(t, p, 500); got[a.addr] != 0 || got[b.addr] != 500 {
				t.Errorf("picks while %s is down: %v", a.addr, got)
			}

			t1 := time.Now()
			tc.brk.fixIt(a)
			up, _ := ev.wait(t, next, a.addr, ChangeUp, riseBound()+slack)
			took = up.Time.Sub(t1)
			t.Logf("up after %s (bound %s): %s", took, riseBound(), up.Reason)
			if took > riseBound()+slack {
				t.Errorf("up after %s, want within rise × interval + timeout = %s", took, riseBound())
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
			if k.StateChanges != uint64(steady)+2 || k.Checks == 0 || k.CheckFailures < tFall {
				t.Errorf("counters %+v", k)
			}
			for _, e := range ev.snapshot()[steady:] {
				if e.Address == b.addr {
					t.Errorf("healthy backend had an event: %+v", e)
				}
			}
		})
	}
}

// TestFirstCheckDecides: a backend that is dead when checks start goes
// down on its first failed check, not after fall of them, while a live one
// is never touched.
func TestFirstCheckDecides(t *testing.T) {
	a, b := newBackend(t), newBackend(t)
	a.kill()
	pc := poolCfg("tcp", a.addr, b.addr)
	p := newPool(t, pc)
	t0 := time.Now()
	_, ev := startChecker(t, p, pc, Options{})
	down, _ := ev.wait(t, 0, a.addr, ChangeDown, tInterval+tTimeout+slack)
	if took := down.Time.Sub(t0); took > tInterval+tTimeout+slack/2 {
		t.Errorf("dead backend went down after %s, want within one interval", took)
	}
	if got := picks(t, p, 50); got[a.addr] != 0 {
		t.Errorf("picks: %v", got)
	}
}

// TestHealthyDemoBackend: the websocket check passes against the demo's
// echo server (a real WebSocket library on the other side, which greets
// every client before reading).
func TestHealthyDemoBackend(t *testing.T) {
	e := startDemoEcho(t)
	pr := &prober{typ: CheckWebSocket, timeout: time.Second, path: "/chat/", expect: 1 << 2}
	for range 3 {
		if err := pr.probe(t.Context(), e); err != nil {
			t.Fatalf("websocket check of demo echo: %v", err)
		}
	}
}

// TestPassiveMaxFails: max_fails failures within fail_timeout take a
// backend out for fail_timeout, even while active checks pass; a success
// between failures, or failures spread wider than fail_timeout, do not.
func TestPassiveMaxFails(t *testing.T) {
	a, b := newBackend(t), newBackend(t)
	pc := poolCfg("tcp", a.addr, b.addr)
	pc.Health.MaxFails = 3
	const failTO = 150 * time.Millisecond
	pc.Health.FailTimeout = config.Duration(failTO)
	p := newPool(t, pc)
	c, ev := startChecker(t, p, pc, Options{})
	waitActive(t, c, tInterval+tTimeout+slack)
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
	t0 := time.Now()
	c.ReportConnectFailure(ba, boom)
	if ba.Healthy() {
		t.Fatal("still up after max_fails failures within fail_timeout")
	}
	down, next := ev.wait(t, 0, a.addr, ChangeDown, slack)
	t.Logf("%s", down.Reason)
	if got := picks(t, p, 200); got[a.addr] != 0 {
		t.Errorf("picks while passively down: %v", got)
	}
	// Active checks keep passing; the hold lasts fail_timeout anyway.
	up, _ := ev.wait(t, next, a.addr, ChangeUp, failTO+slack)
	if held := up.Time.Sub(t0); held < failTO-5*time.Millisecond || held > failTO+slack {
		t.Errorf("held down for %s, want fail_timeout %s", held, failTO)
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
	_, next := ev.wait(t, 0, b1.Address(), ChangeDown, slack)
	ev.wait(t, next, b1.Address(), ChangeUp, 60*time.Millisecond+slack)
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
	a, b := newBackend(t), newBackend(t)
	pc := poolCfg("tcp", a.addr, b.addr)
	const ss = 300 * time.Millisecond
	pc.Health.SlowStart = config.Duration(ss)
	p := newPool(t, pc)
	c, ev := startChecker(t, p, pc, Options{})
	waitActive(t, c, tInterval+tTimeout+slack)
	ba := backendOf(p, a.addr)
	full := SlowStartScale
	if ba.Weight() != full || backendOf(p, b.addr).Weight() != full {
		t.Fatalf("weights %d, %d: want both scaled to %d", ba.Weight(), backendOf(p, b.addr).Weight(), full)
	}
	if got := picks(t, p, 100); got[a.addr] != 50 {
		t.Errorf("shares before: %v, want 50/50 (scaling must not change shares)", got)
	}

	a.kill()
	_, next := ev.wait(t, 0, a.addr, ChangeDown, fallBound()+slack)
	a.restart()
	up, _ := ev.wait(t, next, a.addr, ChangeUp, riseBound()+slack)
	first := ba.Weight()
	early := picks(t, p, 110)
	var samples []int
	for time.Since(up.Time) < ss+slack {
		samples = append(samples, ba.Weight())
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("weight at up: %d; early picks %v; samples %v", first, early, samples)
	if first > 3 {
		t.Errorf("weight right after recovery = %d, want about 10%% of %d", first, full)
	}
	if early[a.addr] > 30 {
		t.Errorf("recovered backend took %d of 110 early picks; want a small share", early[a.addr])
	}
	for i := 1; i < len(samples); i++ {
		if samples[i] < samples[i-1] {
			t.Fatalf("weight went down during the ramp: %v", samples)
		}
	}
	if len(samples) < 10 || samples[len(samples)/3] >= full || samples[len(samples)-1] != full {
		t.Errorf("no ramp to full weight over slow_start: %v", samples)
	}
	if got := picks(t, p, 100); got[a.addr] != 50 {
		t.Errorf("shares after the ramp: %v, want 50/50", got)
	}
	if s := c.Status()[0]; !s.SlowStartUntil.IsZero() || s.Weight != full || s.FullWeight != full {
		t.Errorf("status after the ramp: %+v", s)
	}
}

// TestStopFinishesRamp: a Checker stopped (not replaced) mid-ramp gives
// the backend its full weight rather than leaving it at a fraction.
func TestStopFinishesRamp(t *testing.T) {
	a := newBackend(t)
	a.kill()
	pc := poolCfg("tcp", a.addr, "127.0.0.1:1")
	pc.Health.SlowStart = config.Duration(10 * time.Second)
	p := newPool(t, pc)
	c, ev := startChecker(t, p, pc, Options{})
	_, next := ev.wait(t, 0, a.addr, ChangeDown, tInterval+tTimeout+slack)
	a.restart()
	ev.wait(t, next, a.addr, ChangeUp, riseBound()+slack)
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
			pc.Health.SlowStart = config.Duration(2 * time.Second)
			p := newPool(t, pc)
			old, oev := startChecker(t, p, pc, Options{})
			waitActive(t, old, tInterval+tTimeout+slack)
			a.kill()
			r.set(mode500)
			oev.wait(t, 0, a.addr, ChangeDown, fallBound()+slack)
			_, next := oev.wait(t, 0, r.addr, ChangeDown, fallBound()+slack)
			r.set(modeOK)
			oev.wait(t, next, r.addr, ChangeUp, riseBound()+slack)
			rampW := backendOf(p, r.addr).Weight()
			before := old.Counters()

			// The reload: the proxy updates the pool with the same specs,
			// then the new Checker starts.
			opt := Options{}
			if handover {
				opt.Previous = old
			} else {
				old.Stop()
			}
			nc, nev := startChecker(t, p, pc, opt)
			time.Sleep(5 * tInterval)
			if evs := nev.snapshot(); len(evs) != 0 {
				t.Errorf("events after reload (flap): %v", evs)
			}
			if backendOf(p, a.addr).Healthy() || !backendOf(p, b.addr).Healthy() || !backendOf(p, r.addr).Healthy() {
				t.Errorf("states changed across reload: %+v", nc.Status())
			}
			if handover {
				if h := nc.History(a.addr); len(h) != 1 || h[0].Change != ChangeDown {
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
			nev.wait(t, 0, a.addr, ChangeUp, riseBound()+slack)
		})
	}
}

// TestJitter: every interval stays within ±jitter, first checks are spread
// over the first interval, and real check arrivals keep to the bounds.
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

	// Real arrivals at a backend: gaps within the bounds (plus scheduling
	// on the late side), and not all equal.
	const iv, j = 20 * time.Millisecond, 0.25
	be := newBackend(t)
	pc := poolCfg("http", be.addr)
	pc.Health.Interval = config.Duration(iv)
	pc.Health.Timeout = config.Duration(10 * time.Millisecond)
	p := newPool(t, pc)
	c, _ := startChecker(t, p, pc, Options{Jitter: j})
	for be.hits.Load() < 25 {
		time.Sleep(5 * time.Millisecond)
	}
	c.Stop()
	at := be.arrivals()
	// Scheduling on two shared cores under -race delays some checks, so
	// most gaps, not all, must be within the bounds (those of jitter
	// itself are exact, above).
	var gaps []time.Duration
	distinct := map[time.Duration]bool{}
	inside := 0
	for i := 1; i < len(at); i++ {
		g := at[i].Sub(at[i-1])
		gaps = append(gaps, g)
		distinct[g.Round(time.Millisecond)] = true
		if g >= time.Duration(float64(iv)*(1-j))-3*time.Millisecond && g <= time.Duration(float64(iv)*(1+j))+5*time.Millisecond {
			inside++
		}
	}
	t.Logf("gaps: %v", gaps)
	if inside < len(gaps)*4/5 {
		t.Errorf("%d of %d gaps within %s ± %.0f%%: %v", inside, len(gaps), iv, j*100, gaps)
	}
	if len(distinct) < 3 {
		t.Errorf("gaps look unjittered: %v", gaps)
	}

	// First checks of many backends spread over the first interval.
	var addrs []string
	for i := range 40 {
		addrs = append(addrs, fmt.Sprintf("127.0.0.%d:1", 2+i))
	}
	pc = poolCfg("tcp", addrs...)
	pc.Health.Interval = config.Duration(200 * time.Millisecond)
	p = newPool(t, pc)
	t0 := time.Now()
	_, ev := startChecker(t, p, pc, Options{})
	var firsts []time.Duration
	for _, a := range addrs {
		e, _ := ev.wait(t, 0, a, ChangeDown, 200*time.Millisecond+slack)
		firsts = append(firsts, e.Time.Sub(t0))
	}
	lo1, hi1 := firsts[0], firsts[0]
	for _, f := range firsts {
		lo1, hi1 = min(lo1, f), max(hi1, f)
	}
	t.Logf("first checks between %s and %s", lo1, hi1)
	if hi1-lo1 < 100*time.Millisecond {
		t.Errorf("first checks of 40 backends within %s of each other: not spread over the 200ms interval", hi1-lo1)
	}
}
