package balance

import (
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// cpuTime reports, as cpu-ns/op, the CPU time the process used from now
// until the returned function runs, per iteration. On a machine shared with
// other work, wall-clock ns/op includes time spent waiting for a core; the
// CPU time does not (run with -cpu 1 so that it is the benchmark's own).
func cpuTime(b *testing.B) func() {
	start := processCPU()
	return func() {
		b.ReportMetric(float64(processCPU()-start)/float64(b.N), "cpu-ns/op")
	}
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

var sizes = []int{10, 100, 1000}

// BenchmarkPick measures one Pick and its Release on an idle pool, per
// algorithm and pool size. Keys vary so Maglev's table lookups miss the
// cache as they would in production.
func BenchmarkPick(b *testing.B) {
	for _, algo := range allAlgorithms {
		for _, n := range sizes {
			b.Run(fmt.Sprintf("%s/%d", algo, n), func(b *testing.B) {
				p := mustPool(b, specs(n), Options{Algorithm: algo})
				keys := make([]Key, 4096)
				for i := range keys {
					keys[i] = key(i)
				}
				b.ReportAllocs()
				b.ResetTimer()
				defer cpuTime(b)()
				for i := range b.N {
					x, err := p.Pick(keys[i&4095], nil)
					if err != nil {
						b.Fatal(err)
					}
					x.Release()
				}
			})
		}
	}
}

// BenchmarkPickMaglevBounded is Maglev with ε = 0.25 on a loaded pool
// (every backend at the average, so the cap is live).
func BenchmarkPickMaglevBounded(b *testing.B) {
	for _, n := range sizes {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			p := mustPool(b, specs(n), Options{Algorithm: Maglev, BalanceFactor: 0.25})
			for _, x := range p.Backends() {
				for range 100 {
					x.Acquire()
				}
			}
			keys := make([]Key, 4096)
			for i := range keys {
				keys[i] = key(i)
			}
			b.ReportAllocs()
			b.ResetTimer()
			defer cpuTime(b)()
			for i := range b.N {
				x, err := p.Pick(keys[i&4095], nil)
				if err != nil {
					b.Fatal(err)
				}
				x.Release()
			}
		})
	}
}

// BenchmarkPickMaglevDegraded: a tenth of the backends unhealthy, so some
// keys need a second probe.
func BenchmarkPickMaglevDegraded(b *testing.B) {
	for _, n := range sizes {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			p := mustPool(b, specs(n), Options{Algorithm: Maglev})
			for i, x := range p.Backends() {
				if i%10 == 0 {
					x.SetHealthy(false)
				}
			}
			keys := make([]Key, 4096)
			for i := range keys {
				keys[i] = key(i)
			}
			b.ReportAllocs()
			b.ResetTimer()
			defer cpuTime(b)()
			for i := range b.N {
				x, err := p.Pick(keys[i&4095], nil)
				if err != nil {
					b.Fatal(err)
				}
				x.Release()
			}
		})
	}
}

// BenchmarkPickParallel is Maglev picked from all cores at once (the
// contended case: shared pool counter, shared backend counters).
func BenchmarkPickParallel(b *testing.B) {
	p := mustPool(b, specs(100), Options{Algorithm: Maglev})
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			x, err := p.Pick(key(i&4095), nil)
			if err != nil {
				b.Fatal(err)
			}
			x.Release()
			i++
		}
	})
}

// BenchmarkRebuild measures swapping in a new backend set (one backend
// replaced) for a Maglev pool with its default table size: 65537 slots for
// 10 and 100 backends, 131101 for 1000.
func BenchmarkRebuild(b *testing.B) {
	for _, n := range sizes {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			s := specs(n)
			p := mustPool(b, s, Options{Algorithm: Maglev})
			s2 := append([]BackendSpec(nil), s...)
			s2[0].Address = "other:1"
			b.ReportAllocs()
			b.ResetTimer()
			defer cpuTime(b)()
			for i := range b.N {
				set := s
				if i%2 == 0 {
					set = s2
				}
				if err := p.Update(set); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(p.TableSize()), "slots")
		})
	}
}

// BenchmarkRebuildWeighted is BenchmarkRebuild with weights 1 to 1000
// (the slowest case for weighted turns).
func BenchmarkRebuildWeighted(b *testing.B) {
	for _, n := range sizes {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			s := specs(n)
			for i := range s {
				s[i].Weight = 1 + (i*397)%1000
			}
			p := mustPool(b, s, Options{Algorithm: Maglev})
			s2 := append([]BackendSpec(nil), s...)
			s2[0].Address = "other:1"
			b.ReportAllocs()
			b.ResetTimer()
			defer cpuTime(b)()
			for i := range b.N {
				set := s
				if i%2 == 0 {
					set = s2
				}
				if err := p.Update(set); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkHash(b *testing.B) {
	b.Run("string-36", func(b *testing.B) {
		s := "8c0b6f7e-2d1a-4f4e-9a0b-1c2d3e4f5a6b"
		b.SetBytes(int64(len(s)))
		defer cpuTime(b)()
		for range b.N {
			_ = HashString(s)
		}
	})
	b.Run("addr-v4", func(b *testing.B) {
		a := netip.MustParseAddr("192.0.2.33")
		defer cpuTime(b)()
		for range b.N {
			_ = HashAddr(a, 24, 64)
		}
	})
	b.Run("addr-v6", func(b *testing.B) {
		a := netip.MustParseAddr("2001:db8::33")
		defer cpuTime(b)()
		for range b.N {
			_ = HashAddr(a, 24, 64)
		}
	})
}
