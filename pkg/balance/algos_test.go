package balance

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"testing"
)

var allAlgorithms = []Algorithm{RoundRobin, LeastConn, Maglev, RandomTwo, First}

// boundOK reports whether backend b with a active connections respects the
// bounded-load cap for a pool of m connections: a ≤ ⌈(1+ε)·m·w/W⌉, computed
// here independently of boundCap, in exact rational arithmetic for ε given
// as num/den.
func boundOK(a, m, w, wsum, num, den int64) bool {
	// ⌈(den+num)·m·w / (den·W)⌉
	x := (den + num) * m * w
	y := den * wsum
	return a <= (x+y-1)/y
}

// adversarialKeys returns n distinct keys that plain Maglev sends to the
// same backend.
func adversarialKeys(t *testing.T, s []BackendSpec, n int) []Key {
	p := mustPool(t, s, Options{Algorithm: Maglev})
	target := ""
	var out []Key
	for i := 0; len(out) < n; i++ {
		k := key(i)
		o := owner(t, p, k)
		if target == "" {
			target = o
		}
		if o == target {
			out = append(out, k)
		}
	}
	return out
}

// TestBoundedLoad: with ε > 0 no backend ever holds more than
// ⌈(1+ε)·average⌉ connections (weighted), even when every key maps to the
// same backend.
func TestBoundedLoad(t *testing.T) {
	for _, tc := range []struct {
		name     string
		weights  []int
		num, den int64 // ε = num/den
	}{
		{"equal ε=0.25", []int{1, 1, 1, 1, 1, 1, 1, 1}, 1, 4},
		{"equal ε=0.1", []int{1, 1, 1, 1, 1}, 1, 10},
		{"equal ε=1", []int{1, 1, 1}, 1, 1},
		{"weighted ε=0.25", []int{1, 2, 3, 4}, 1, 4},
		{"weighted ε=0.05", []int{5, 1, 1, 3}, 1, 20},
	} {
		for _, keys := range []string{"same key", "colliding keys", "random keys"} {
			t.Run(tc.name+"/"+keys, func(t *testing.T) {
				s := specs(len(tc.weights))
				var wsum int64
				for i, w := range tc.weights {
					s[i].Weight = w
					wsum += int64(w)
				}
				eps := float64(tc.num) / float64(tc.den)
				p := mustPool(t, s, Options{Algorithm: Maglev, BalanceFactor: eps})
				var ks []Key
				switch keys {
				case "same key":
					ks = []Key{HashString("hot")}
				case "colliding keys":
					ks = adversarialKeys(t, s, 200)
				default:
					for i := range 200 {
						ks = append(ks, key(i))
					}
				}
				var held []*Backend
				for i := range 2000 {
					b, err := p.Pick(ks[i%len(ks)], nil)
					if err != nil {
						t.Fatal(err)
					}
					held = append(held, b)
					m := int64(len(held))
					if !boundOK(b.Active(), m, int64(b.Weight()), wsum, tc.num, tc.den) {
						t.Fatalf("pick %d: %s (weight %d) holds %d of %d connections, bound ⌈%.2f·%d·%d/%d⌉",
							i, b.Address(), b.Weight(), b.Active(), m, 1+eps, m, b.Weight(), wsum)
					}
					// Release some, adversarially from the least-loaded
					// backends, so the average drops under the hot one.
					if i%7 == 6 {
						j := 0
						for k := range held {
							if held[k].Active() < held[j].Active() {
								j = k
							}
						}
						held[j].Release()
						held = append(held[:j], held[j+1:]...)
					}
				}
				for _, b := range held {
					b.Release()
				}
				checkIdle(t, p)
			})
		}
	}
}

// TestBoundedLoadSticky: under the cap, a key keeps its Maglev backend;
// with ε = 0 every connection of a key goes to one backend.
func TestBoundedLoadSticky(t *testing.T) {
	s := specs(5)
	strict := mustPool(t, s, Options{Algorithm: Maglev})
	bounded := mustPool(t, s, Options{Algorithm: Maglev, BalanceFactor: 0.5})
	k := HashString("hot")
	want := owner(t, strict, k)
	var held []*Backend
	for range 100 {
		b, err := strict.Pick(k, nil)
		if err != nil || b.Address() != want {
			t.Fatalf("strict Maglev moved the key: %v %v", b, err)
		}
		held = append(held, b)
	}
	// On an otherwise busy pool the first connection of the key is under
	// the cap and goes to its Maglev backend.
	for _, b := range bounded.Backends() {
		for range 10 {
			b.Acquire()
		}
	}
	if b, _ := bounded.Pick(k, nil); b.Address() != want {
		t.Errorf("bounded pool under the cap sent the key to %s, Maglev says %s", b.Address(), want)
	}
	for _, b := range held {
		b.Release()
	}
}

// TestBoundedLoadConcurrent: the cap holds with picks from many goroutines
// (run with -race). Connections only grow, so the cap at the end bounds
// every backend.
func TestBoundedLoadConcurrent(t *testing.T) {
	s := specs(6)
	var wsum int64
	for i := range s {
		s[i].Weight = 1 + i%3
		wsum += int64(s[i].Weight)
	}
	p := mustPool(t, s, Options{Algorithm: Maglev, BalanceFactor: 0.2})
	const workers, per = 8, 500
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				k := HashString("hot")
				if i%2 == 0 {
					k = key(w*per + i)
				}
				if _, err := p.Pick(k, nil); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	m := int64(workers * per)
	for _, b := range p.Backends() {
		if !boundOK(b.Active(), m, int64(b.Weight()), wsum, 1, 5) {
			t.Errorf("%s (weight %d) holds %d of %d", b.Address(), b.Weight(), b.Active(), m)
		}
		for b.Active() > 0 {
			b.Release()
		}
	}
	checkIdle(t, p)
}

// TestBoundedLoadSkipRelaxes: when every backend under the cap is skipped,
// Pick still finds one (the bound yields to a retry) rather than failing.
func TestBoundedLoadSkipRelaxes(t *testing.T) {
	p := mustPool(t, specs(2), Options{Algorithm: Maglev, BalanceFactor: 0.1})
	b := byAddr(p)
	for range 10 {
		b[addr(0)].Acquire()
	}
	got, err := p.Pick(key(1), func(x *Backend) bool { return x == b[addr(1)] })
	if err != nil || got != b[addr(0)] {
		t.Fatalf("Pick with the only backend under the cap skipped: %v, %v", got, err)
	}
	got.Release()
	for range 10 {
		b[addr(0)].Release()
	}
	checkIdle(t, p)
}

// TestBackup: backups take connections only when no primary can, with the
// pool's algorithm, and primaries take over again when one returns.
func TestBackup(t *testing.T) {
	for _, algo := range allAlgorithms {
		t.Run(string(algo), func(t *testing.T) {
			s := specs(5)
			s[3].Backup, s[4].Backup = true, true
			p := mustPool(t, s, Options{Algorithm: algo})
			b := byAddr(p)
			pickAll := func(n int) map[string]int {
				got := map[string]int{}
				for i := range n {
					x, err := p.Pick(key(i), nil)
					if err != nil {
						t.Fatal(err)
					}
					got[x.Address()]++
					x.Release()
				}
				return got
			}
			for a := range pickAll(300) {
				if b[a].Backup() {
					t.Fatalf("backup %s took a connection while primaries are healthy", a)
				}
			}
			b[addr(0)].SetHealthy(false)
			b[addr(1)].SetDraining(true)
			if err := p.Update(func() []BackendSpec { s := append([]BackendSpec(nil), s...); s[2].Down = true; return s }()); err != nil {
				t.Fatal(err)
			}
			got := pickAll(300)
			if got[addr(3)]+got[addr(4)] != 300 {
				t.Fatalf("no primary available: picks went to %v", got)
			}
			if algo != First && (got[addr(3)] == 0 || got[addr(4)] == 0) {
				t.Errorf("%s used only one backup: %v", algo, got)
			}
			b[addr(1)].SetDraining(false)
			if got := pickAll(100); got[addr(1)] != 100 {
				t.Errorf("a primary came back but picks went to %v", got)
			}
			// All primaries skipped (tried already): the backups are next.
			x, err := p.Pick(key(1), func(x *Backend) bool { return !x.Backup() })
			if err != nil || !x.Backup() {
				t.Errorf("all primaries skipped: %v, %v", x, err)
			} else {
				x.Release()
			}
			// Backups unavailable too: no backend.
			b[addr(1)].SetHealthy(false)
			b[addr(3)].SetHealthy(false)
			b[addr(4)].SetDraining(true)
			if _, err := p.Pick(key(1), nil); !errors.Is(err, ErrNoBackend) {
				t.Errorf("nothing available: %v", err)
			}
			checkIdle(t, p)
		})
	}
}

// TestExclusion: unhealthy, draining, down, weight-0 and skipped backends
// get no new connections from any algorithm, and connections they hold
// stay counted.
func TestExclusion(t *testing.T) {
	for _, algo := range allAlgorithms {
		for _, how := range []string{"unhealthy", "draining", "down", "weight0", "skip"} {
			t.Run(string(algo)+"/"+how, func(t *testing.T) {
				s := specs(4)
				if how == "down" {
					s[0].Down, s[2].Down = true, true
				}
				p := mustPool(t, s, Options{Algorithm: algo})
				b := byAddr(p)
				out := []*Backend{b[addr(0)], b[addr(2)]}
				out[0].Acquire()
				var skip func(*Backend) bool
				for _, x := range out {
					switch how {
					case "unhealthy":
						x.SetHealthy(false)
					case "draining":
						x.SetDraining(true)
					case "weight0":
						x.SetWeight(0)
					case "skip":
						skip = func(y *Backend) bool { return y == out[0] || y == out[1] }
					}
				}
				for i := range 500 {
					x, err := p.Pick(key(i), skip)
					if err != nil {
						t.Fatal(err)
					}
					if x == out[0] || x == out[1] {
						t.Fatalf("pick %d went to excluded %s", i, x.Address())
					}
					x.Release()
				}
				if out[0].Active() != 1 {
					t.Errorf("excluded backend's connection count changed to %d", out[0].Active())
				}
				out[0].Release()
				checkIdle(t, p)
			})
		}
	}
}

// TestMaxConns: no algorithm puts more than MaxConns on a backend; when all
// are full Pick returns ErrNoBackend.
func TestMaxConns(t *testing.T) {
	for _, algo := range allAlgorithms {
		t.Run(string(algo), func(t *testing.T) {
			s := specs(3)
			for i := range s {
				s[i].MaxConns = 2 + i
			}
			p := mustPool(t, s, Options{Algorithm: algo})
			var held []*Backend
			for i := range 9 {
				x, err := p.Pick(key(i%2), nil)
				if err != nil {
					t.Fatalf("pick %d: %v", i, err)
				}
				held = append(held, x)
				if x.Active() > int64(x.MaxConns()) {
					t.Fatalf("%s holds %d, max %d", x.Address(), x.Active(), x.MaxConns())
				}
			}
			if _, err := p.Pick(key(0), nil); !errors.Is(err, ErrNoBackend) {
				t.Errorf("all full: %v", err)
			}
			for _, x := range held {
				x.Release()
			}
			checkIdle(t, p)
		})
	}
}

// TestFirst: fills backends in spec order up to MaxConns (HAProxy balance
// first), and a backend without a cap takes everything.
func TestFirst(t *testing.T) {
	s := specs(3)
	s[0].MaxConns, s[1].MaxConns = 2, 3
	p := mustPool(t, s, Options{Algorithm: First})
	var seq []string
	var held []*Backend
	for range 8 {
		x, err := p.Pick(Key{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, x)
		seq = append(seq, strings.TrimSuffix(strings.TrimPrefix(x.Address(), "10.0.0."), ":8080"))
	}
	if got := strings.Join(seq, ""); got != "00111222" {
		t.Errorf("first: order %s, want 00111222", got)
	}
	held[0].Release()
	x, _ := p.Pick(Key{}, nil)
	if x.Address() != addr(0) {
		t.Errorf("a slot freed on the first backend, pick went to %s", x.Address())
	}
	x.Release()
	for _, x := range held[1:] {
		x.Release()
	}
	checkIdle(t, p)
}

// TestRoundRobin: smooth weighted order; an unavailable backend's turns are
// consumed, not handed to its successor.
func TestRoundRobin(t *testing.T) {
	s := specs(3)
	s[0].Weight = 5
	p := mustPool(t, s, Options{Algorithm: RoundRobin})
	seq := func(n int) string {
		var out []string
		for range n {
			x, err := p.Pick(Key{}, nil)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, strings.TrimSuffix(strings.TrimPrefix(x.Address(), "10.0.0."), ":8080"))
			x.Release()
		}
		return strings.Join(out, "")
	}
	if got := seq(14); got != "00012000001200" {
		t.Errorf("weights 5,1,1: %s", got)
	}
	p = mustPool(t, specs(3), Options{Algorithm: RoundRobin})
	byAddr(p)[addr(1)].SetHealthy(false)
	if got := seq(6); got != "020202" {
		t.Errorf("equal weights, middle one down: %s, want 020202", got)
	}
	// Shares over many picks follow the weights.
	s = specs(4)
	for i := range s {
		s[i].Weight = i + 1
	}
	p = mustPool(t, s, Options{Algorithm: RoundRobin})
	count := map[string]int{}
	for range 10_000 {
		x, _ := p.Pick(Key{}, nil)
		count[x.Address()]++
		x.Release()
	}
	for i := range 4 {
		if c := count[addr(i)]; c != 1000*(i+1) {
			t.Errorf("weight %d: %d of 10000 picks", i+1, c)
		}
	}
}

// TestLeastConn: the backend with the fewest active connections per weight
// wins; ties rotate.
func TestLeastConn(t *testing.T) {
	s := specs(3)
	s[2].Weight = 2
	p := mustPool(t, s, Options{Algorithm: LeastConn})
	var held []*Backend
	count := map[string]int{}
	for range 400 {
		x, err := p.Pick(Key{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, x)
		count[x.Address()]++
	}
	// Active per weight stays level: 100, 100, 200.
	if count[addr(0)] != 100 || count[addr(1)] != 100 || count[addr(2)] != 200 {
		t.Errorf("least_conn with weights 1,1,2 after 400 picks: %v", count)
	}
	for _, x := range held {
		x.Release()
	}
	// Idle pool: ties rotate over all backends.
	p = mustPool(t, specs(4), Options{Algorithm: LeastConn})
	seen := map[string]bool{}
	for range 8 {
		x, _ := p.Pick(Key{}, nil)
		seen[x.Address()] = true
		x.Release()
	}
	if len(seen) != 4 {
		t.Errorf("idle least_conn used only %d of 4 backends", len(seen))
	}
}

// TestRandomTwo: weighted draws, and the less loaded of two wins, so the
// load per weight stays close even under a skewed start.
func TestRandomTwo(t *testing.T) {
	s := specs(4)
	var wsum int
	for i := range s {
		s[i].Weight = i + 1
		wsum += i + 1
	}
	p := mustPool(t, s, Options{Algorithm: RandomTwo})
	b := byAddr(p)
	for range 200 {
		b[addr(0)].Acquire() // a hot spot the algorithm should avoid
	}
	const n = 20_000
	var held []*Backend
	for range n {
		x, err := p.Pick(Key{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, x)
	}
	total := float64(n + 200)
	for i := range 4 {
		share := float64(b[addr(i)].Active()) / total
		ideal := float64(i+1) / float64(wsum)
		if math.Abs(share-ideal) > 0.02 {
			t.Errorf("weight %d: share %.3f, ideal %.3f", i+1, share, ideal)
		}
	}
	for _, x := range held {
		x.Release()
	}
	for range 200 {
		b[addr(0)].Release()
	}
	checkIdle(t, p)
}

// TestMaglevFallback: a missing key uses the fallback algorithm.
func TestMaglevFallback(t *testing.T) {
	s := specs(3)
	s[0].MaxConns = 1
	p := mustPool(t, s, Options{Algorithm: Maglev, Fallback: First})
	x, _ := p.Pick(Key{}, nil)
	y, _ := p.Pick(Key{}, nil)
	if x.Address() != addr(0) || y.Address() != addr(1) {
		t.Errorf("fallback first: %s then %s", x.Address(), y.Address())
	}
	x.Release()
	y.Release()
	p = mustPool(t, specs(3), Options{Algorithm: Maglev})
	seen := map[string]bool{}
	for range 3 {
		x, _ := p.Pick(Key{}, nil)
		seen[x.Address()] = true
		x.Release()
	}
	if len(seen) != 3 {
		t.Errorf("default fallback (round robin) used %d of 3 backends", len(seen))
	}
}

// TestConcurrent picks, releases, updates and flips health at once; run
// with -race. Every pick's count must be released exactly.
func TestConcurrent(t *testing.T) {
	for _, algo := range allAlgorithms {
		t.Run(string(algo), func(t *testing.T) {
			s := specs(8)
			s[7].Backup = true
			s[1].MaxConns = 3
			p := mustPool(t, s, Options{Algorithm: algo, BalanceFactor: 0.25})
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					bs := p.Backends()
					x := bs[i%len(bs)]
					switch i % 4 {
					case 0:
						x.SetHealthy(i%8 != 0)
					case 1:
						x.SetDraining(i%3 == 0)
					case 2:
						x.SetWeight(1 + i%3)
					case 3:
						n := 6 + i%4
						ns := specs(n)
						ns[n-1].Backup = true
						if err := p.Update(ns); err != nil {
							t.Error(err)
							return
						}
					}
				}
			}()
			var pw sync.WaitGroup
			for w := range 4 {
				pw.Add(1)
				go func() {
					defer pw.Done()
					var held []*Backend
					for i := range 3000 {
						tried := (*Backend)(nil)
						x, err := p.Pick(key(w*10000+i%50), func(b *Backend) bool { return b == tried })
						if err == nil {
							if mc := x.MaxConns(); mc > 0 && x.Active() > int64(mc) {
								t.Errorf("%s: %d active, max %d", x.Address(), x.Active(), mc)
							}
							held = append(held, x)
						} else if !errors.Is(err, ErrNoBackend) {
							t.Error(err)
						}
						if len(held) > 20 {
							held[0].Release()
							held = held[1:]
						}
					}
					for _, x := range held {
						x.Release()
					}
				}()
			}
			pw.Wait()
			close(stop)
			wg.Wait()
			if n := p.total.Load(); n != 0 {
				t.Errorf("pool total %d after all releases", n)
			}
		})
	}
}

// TestPickNoAlloc: the hot path does not allocate.
func TestPickNoAlloc(t *testing.T) {
	for _, algo := range allAlgorithms {
		for _, eps := range []float64{0, 0.25} {
			p := mustPool(t, specs(20), Options{Algorithm: algo, BalanceFactor: eps})
			byAddr(p)[addr(3)].SetHealthy(false)
			k := key(1)
			skip := func(b *Backend) bool { return false }
			if n := testing.AllocsPerRun(1000, func() {
				b, err := p.Pick(k, skip)
				if err != nil {
					panic(err)
				}
				b.Release()
			}); n != 0 {
				t.Errorf("%s ε=%g: Pick allocates %.1f times", algo, eps, n)
			}
		}
	}
}

func ExamplePool_Pick() {
	p, err := NewPool("chat", []BackendSpec{
		{Address: "10.0.0.1:8080", Weight: 2},
		{Address: "10.0.0.2:8080"},
		{Address: "10.0.0.9:8080", Backup: true},
	}, Options{Algorithm: Maglev, BalanceFactor: 0.25})
	if err != nil {
		panic(err)
	}
	spec, _ := ParseKeySpec("header:X-User-Id")
	k := spec.Key(&KeyInput{Header: func(string) (string, bool) { return "alice", true }})
	b, err := p.Pick(k, nil)
	if err != nil {
		panic(err) // the proxy answers 503
	}
	defer b.Release() // when the connection ends
	again, _ := p.Pick(k, nil)
	defer again.Release()
	fmt.Println(b == again)
	// Output: true
}
