package balance

import (
	"errors"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestNewPoolErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		specs []BackendSpec
		opt   Options
		err   string
	}{
		{"algorithm", specs(2), Options{Algorithm: "ip_hash"}, "algorithm"},
		{"maglev fallback", specs(2), Options{Algorithm: Maglev, Fallback: Maglev}, "fallback"},
		{"unknown fallback", specs(2), Options{Algorithm: Maglev, Fallback: "x"}, "fallback"},
		{"negative factor", specs(2), Options{Algorithm: Maglev, BalanceFactor: -1}, "balance factor"},
		{"table negative", specs(2), Options{Algorithm: Maglev, TableSize: -5}, "negative"},
		{"table not prime", specs(2), Options{Algorithm: Maglev, TableSize: 1000}, "prime"},
		{"table too small", specs(20), Options{Algorithm: Maglev, TableSize: 1009}, "less than 100"},
		{"table too big", specs(2), Options{Algorithm: Maglev, TableSize: 1<<24 + 43}, "prime up to"},
		{"empty address", []BackendSpec{{}}, Options{}, "empty address"},
		{"duplicate", []BackendSpec{{Address: "a:1"}, {Address: "a:1"}}, Options{}, "listed twice"},
		{"negative weight", []BackendSpec{{Address: "a:1", Weight: -1}}, Options{}, "weight"},
		{"negative max conns", []BackendSpec{{Address: "a:1", MaxConns: -1}}, Options{}, "max conns"},
	} {
		_, err := NewPool("p", tc.specs, tc.opt)
		if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%s: err = %v, want one containing %q", tc.name, err, tc.err)
		}
	}
	p := mustPool(t, specs(3), Options{})
	if o := p.Options(); o.Algorithm != RoundRobin || o.Fallback != RoundRobin {
		t.Errorf("defaults: %+v", o)
	}
	if p.TableSize() != 0 {
		t.Errorf("round robin pool has table size %d", p.TableSize())
	}
	// A table size that fits 20 backends refuses an update to 30.
	p = mustPool(t, specs(20), Options{Algorithm: Maglev, TableSize: 2003})
	if err := p.Update(specs(30)); err == nil {
		t.Errorf("update past the table size: no error")
	}
	if len(p.Backends()) != 20 {
		t.Errorf("failed update changed the set")
	}
	// An empty pool is valid and answers ErrNoBackend.
	p = mustPool(t, nil, Options{Algorithm: Maglev})
	if _, err := p.Pick(key(1), nil); !errors.Is(err, ErrNoBackend) {
		t.Errorf("empty pool: %v", err)
	}
}

// TestMaglevDistribution: 10⁶ keys land on each backend within 1% of its
// weighted share.
func TestMaglevDistribution(t *testing.T) {
	const keys = 1_000_000
	for _, tc := range []struct {
		name    string
		weights []int
	}{
		{"equal 10", []int{1, 1, 1, 1, 1, 1, 1, 1, 1, 1}},
		{"weights 1-4", []int{1, 2, 3, 4}},
		{"weights 10,5,5", []int{10, 5, 5}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := specs(len(tc.weights))
			sum := 0
			for i, w := range tc.weights {
				s[i].Weight = w
				sum += w
			}
			p := mustPool(t, s, Options{Algorithm: Maglev})
			count := map[string]int{}
			for i := range keys {
				b, err := p.Pick(key(i), nil)
				if err != nil {
					t.Fatal(err)
				}
				count[b.Address()]++
				b.Release()
			}
			worst := 0.0
			for i, w := range tc.weights {
				ideal := float64(keys) * float64(w) / float64(sum)
				dev := float64(count[addr(i)])/ideal - 1
				worst = max(worst, dev, -dev)
				if dev > 0.01 || dev < -0.01 {
					t.Errorf("%s (weight %d): %d keys, ideal %.0f (%+.2f%%)", addr(i), w, count[addr(i)], ideal, 100*dev)
				}
			}
			t.Logf("worst deviation from the weighted share: %.3f%%", 100*worst)
			checkIdle(t, p)
		})
	}
}

// TestDeterminism: two independent pools (two agents) with the same set
// and options, specs in different orders, send every key to the same
// backend.
func TestDeterminism(t *testing.T) {
	for _, opt := range []Options{
		{Algorithm: Maglev},
		{Algorithm: Maglev, TableSize: 10007},
	} {
		s := specs(37)
		for i := range s {
			s[i].Weight = 1 + i%5
		}
		a := mustPool(t, s, opt)
		shuffled := append([]BackendSpec(nil), s...)
		rand.New(rand.NewPCG(5, 6)).Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		b := mustPool(t, shuffled, opt)
		oa, ob := owners(t, a, 100_000), owners(t, b, 100_000)
		for i := range oa {
			if oa[i] != ob[i] {
				t.Fatalf("%+v: key %d goes to %s on one agent and %s on the other", opt, i, oa[i], ob[i])
			}
		}
	}
}

// moves compares two key→backend maps: the fraction of keys that moved,
// and the fraction that moved from one backend present in both to another.
func moves(before, after []string, gone map[string]bool) (moved, between float64) {
	var m, bt int
	for i := range before {
		if before[i] != after[i] {
			m++
			if !gone[before[i]] {
				bt++
			}
		}
	}
	return float64(m) / float64(len(before)), float64(bt) / float64(len(before))
}

// TestDisruptionUnavailable: when one of N backends becomes unhealthy, is
// drained or is marked down, only its keys move (≈ 1/N), no key moves
// between two surviving backends, and they all come back when it returns.
func TestDisruptionUnavailable(t *testing.T) {
	const keys = 100_000
	for _, n := range []int{2, 5, 10, 50} {
		for _, how := range []string{"unhealthy", "draining", "down"} {
			p := mustPool(t, specs(n), Options{Algorithm: Maglev})
			before := owners(t, p, keys)
			victim := byAddr(p)[addr(n/2)]
			set := func(on bool) {
				switch how {
				case "unhealthy":
					victim.SetHealthy(!on)
				case "draining":
					victim.SetDraining(on)
				case "down":
					s := specs(n)
					s[n/2].Down = on
					if err := p.Update(s); err != nil {
						t.Fatal(err)
					}
				}
			}
			set(true)
			after := owners(t, p, keys)
			moved, between := moves(before, after, map[string]bool{victim.Address(): true})
			if between != 0 {
				t.Errorf("n=%d %s: %.4f%% of keys moved between survivors, want 0", n, how, 100*between)
			}
			// The victim owns exactly 1/N of the slots; allow five standard
			// deviations of key sampling noise.
			ideal := 1 / float64(n)
			if tol := 5 * math.Sqrt(ideal*(1-ideal)/keys); math.Abs(moved-ideal) > tol {
				t.Errorf("n=%d %s: %.3f%% of keys moved, ideal %.3f%%", n, how, 100*moved, 100*ideal)
			}
			// The victim's keys spread over the survivors by their shares:
			// each of its M/N slots probes to a uniformly random slot, so a
			// survivor's part is binomial; allow five standard deviations
			// of slot and key noise.
			spread := map[string]int{}
			for i := range before {
				if before[i] == victim.Address() {
					spread[after[i]]++
				}
			}
			if n > 2 {
				per := float64(keys) / float64(n) / float64(n-1)
				slots := float64(p.TableSize()) / float64(n) / float64(n-1)
				tol := 5 * math.Sqrt(1/slots+1/per)
				for a, c := range spread {
					if d := float64(c)/per - 1; d < -tol || d > tol {
						t.Errorf("n=%d %s: %s took %d of the victim's keys, ideal %.0f ± %.0f%%", n, how, a, c, per, 100*tol)
					}
				}
			}
			set(false)
			if back := owners(t, p, keys); true {
				if m, _ := moves(before, back, nil); m != 0 {
					t.Errorf("n=%d %s: %.4f%% of keys did not return", n, how, 100*m)
				}
			}
			checkIdle(t, p)
		}
	}
}

// TestDisruptionUpdate: removing a backend from the set rebuilds the Maglev
// table. Its keys move (1/N) and, as Maglev trades a little disruption for
// exact balance, a small fraction of other keys too; adding it back
// restores the original table exactly.
func TestDisruptionUpdate(t *testing.T) {
	const keys = 100_000
	for _, tc := range []struct {
		n, m       int
		maxBetween float64
	}{
		{3, 0, 0.001}, {10, 0, 0.005}, {100, 0, 0.01}, {10, 655373, 0.002}, {100, 655373, 0.003},
	} {
		opt := Options{Algorithm: Maglev, TableSize: tc.m}
		p := mustPool(t, specs(tc.n), opt)
		before := owners(t, p, keys)
		s := specs(tc.n)
		victim := s[tc.n/2].Address
		s = append(s[:tc.n/2], s[tc.n/2+1:]...)
		if err := p.Update(s); err != nil {
			t.Fatal(err)
		}
		after := owners(t, p, keys)
		moved, between := moves(before, after, map[string]bool{victim: true})
		ideal := 1 / float64(tc.n)
		t.Logf("n=%d M=%d: removing one backend moved %.3f%% of keys (ideal %.3f%%), %.3f%% between survivors",
			tc.n, p.TableSize(), 100*moved, 100*ideal, 100*between)
		if moved < ideal*0.95 || between > tc.maxBetween {
			t.Errorf("n=%d: moved %.3f%%, between survivors %.3f%% (bound %.3f%%)", tc.n, 100*moved, 100*between, 100*tc.maxBetween)
		}
		if err := p.Update(specs(tc.n)); err != nil {
			t.Fatal(err)
		}
		if m, _ := moves(before, owners(t, p, keys), nil); m != 0 {
			t.Errorf("n=%d: re-adding the backend left %.4f%% of keys elsewhere", tc.n, 100*m)
		}
		// A fresh pool with the smaller set agrees with the updated one:
		// the table is a function of the set, not of its history.
		fresh := mustPool(t, s, opt)
		if m, _ := moves(after, owners(t, fresh, keys), nil); m != 0 {
			t.Errorf("n=%d: a fresh agent disagrees on %.4f%% of keys", tc.n, 100*m)
		}
	}
}

// TestUpdateKeepsBackends: Update keeps the *Backend (active count,
// health, drain) of addresses that stay, so existing connections stay
// counted where they are.
func TestUpdateKeepsBackends(t *testing.T) {
	p := mustPool(t, specs(3), Options{Algorithm: LeastConn})
	old := byAddr(p)
	b0 := old[addr(0)]
	b0.Acquire()
	b0.Acquire()
	old[addr(1)].SetDraining(true)
	old[addr(2)].SetHealthy(false)

	s := append(specs(3)[1:], BackendSpec{Address: "new:1", Weight: 2, MaxConns: 5})
	s[0].Backup = true
	if err := p.Update(s); err != nil {
		t.Fatal(err)
	}
	now := byAddr(p)
	if now[addr(1)] != old[addr(1)] || now[addr(2)] != old[addr(2)] {
		t.Fatalf("surviving backends were replaced")
	}
	if !now[addr(1)].Draining() || now[addr(2)].Healthy() || !now[addr(1)].Backup() {
		t.Errorf("state not carried over: draining=%v healthy=%v backup=%v",
			now[addr(1)].Draining(), now[addr(2)].Healthy(), now[addr(1)].Backup())
	}
	if nb := now["new:1"]; nb.Weight() != 2 || nb.MaxConns() != 5 || !nb.Healthy() {
		t.Errorf("new backend: weight %d max %d healthy %v", nb.Weight(), nb.MaxConns(), nb.Healthy())
	}
	if _, ok := now[addr(0)]; ok {
		t.Fatalf("removed backend still listed")
	}
	// The removed backend's connections are still counted until released.
	if b0.Active() != 2 || p.total.Load() != 2 {
		t.Errorf("removed backend: active %d, pool total %d", b0.Active(), p.total.Load())
	}
	// Its state changes no longer touch the pool.
	b0.SetHealthy(false)
	b0.SetWeight(9)
	b0.Release()
	b0.Release()
	got := []string{}
	for _, b := range p.Backends() {
		got = append(got, b.Address())
	}
	if strings.Join(got, " ") != addr(1)+" "+addr(2)+" new:1" {
		t.Errorf("Backends() = %v, want spec order", got)
	}
	checkIdle(t, p)
}

// TestSetWeight: a live weight change rebuilds the tables; Update resets it
// only when the spec's weight changed (a reload keeps a slow start).
func TestSetWeight(t *testing.T) {
	p := mustPool(t, specs(2), Options{Algorithm: Maglev})
	b := byAddr(p)
	b[addr(0)].SetWeight(3)
	count := map[string]int{}
	for i := range 100_000 {
		count[owner(t, p, key(i))]++
	}
	if r := float64(count[addr(0)]) / 100_000; r < 0.74 || r > 0.76 {
		t.Errorf("weight 3:1 gave %s a share of %.3f", addr(0), r)
	}
	// Same specs again: the live weight stays (slow start in progress).
	if err := p.Update(specs(2)); err != nil {
		t.Fatal(err)
	}
	if w := b[addr(0)].Weight(); w != 3 {
		t.Errorf("reload with the same spec weight reset the live weight to %d", w)
	}
	s := specs(2)
	s[0].Weight = 5
	if err := p.Update(s); err != nil {
		t.Fatal(err)
	}
	if w := b[addr(0)].Weight(); w != 5 {
		t.Errorf("spec weight changed to 5, live weight %d", w)
	}
	// Weight 0 takes a backend out of new selections.
	b[addr(0)].SetWeight(0)
	for i := range 1000 {
		if o := owner(t, p, key(i)); o != addr(1) {
			t.Fatalf("key %d went to %s with weight 0", i, o)
		}
	}
	b[addr(1)].SetWeight(-5)
	if _, err := p.Pick(key(1), nil); !errors.Is(err, ErrNoBackend) {
		t.Errorf("all weights 0: %v", err)
	}
	checkIdle(t, p)
}
