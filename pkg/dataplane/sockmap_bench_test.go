package dataplane

import (
	"io"
	"net"
	"os"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// Side-by-side benchmarks of the data planes, each in its own network
// namespace on loopback:
//
//	direct    the client talks to the backend, no proxy (the ceiling)
//	sockmap   the kernel path with demotion off (what sockmap itself does)
//	adaptive  the sockmap plane with its defaults (bulk flows demote)
//	splice    the splice plane
//
// Run: go test -run '^$' -bench BenchmarkPlanes -benchtime 2s ./pkg/dataplane
// (as root). The idle-memory benchmark does one op of 2,000 connections.

type pbPlane struct {
	name string
	new  func(tb testing.TB) Plane // nil: direct
}

var pbPlanes = []pbPlane{
	{"direct", nil},
	{"sockmap", func(tb testing.TB) Plane { return ptNewSockmap(tb, SockmapOptions{ParkedHighWater: -1}) }},
	{"adaptive", func(tb testing.TB) Plane { return ptNewSockmap(tb, SockmapOptions{}) }},
	{"splice", func(tb testing.TB) Plane { return NewSplice(SpliceOptions{}) }},
}

// pbRig gives a benchmark connections through one plane (or direct).
type pbRig struct {
	e *ptEnv
}

func (r *pbRig) conn(tb testing.TB) (client, backend *net.TCPConn) {
	if r.e.plane == nil {
		c := ptDial(tb, r.e.lnBackend.Addr())
		b, err := r.e.lnBackend.AcceptTCP()
		if err != nil {
			tb.Fatal(err)
		}
		return c, b
	}
	p := r.e.pair(nil)
	return p.client, p.backend
}

func pbRun(b *testing.B, fn func(b *testing.B, r *pbRig)) {
	for _, pl := range pbPlanes {
		b.Run(pl.name, func(b *testing.B) {
			ptInNS(b, func() {
				var p Plane
				if pl.new != nil {
					p = pl.new(b)
				}
				e := &ptEnv{tb: b, plane: p, lnClient: ptListen(b), lnBackend: ptListen(b)}
				defer func() {
					if p != nil {
						p.Close()
					}
					e.lnClient.Close()
					e.lnBackend.Close()
				}()
				fn(b, &pbRig{e: e})
			})
		})
	}
}

// BenchmarkPlanesThroughput: one and eight streams client to backend, 1 MiB
// per op per stream.
func BenchmarkPlanesThroughput(b *testing.B) {
	for _, streams := range []int{1, 8} {
		b.Run(map[int]string{1: "streams=1", 8: "streams=8"}[streams], func(b *testing.B) {
			pbRun(b, func(b *testing.B, r *pbRig) {
				type cb struct{ c, b *net.TCPConn }
				conns := make([]cb, streams)
				for i := range conns {
					conns[i].c, conns[i].b = r.conn(b)
				}
				const chunk = 1 << 20
				buf := make([]byte, chunk)
				b.SetBytes(int64(chunk * streams))
				b.ResetTimer()
				start := time.Now()
				var wg sync.WaitGroup
				for _, x := range conns {
					wg.Add(2)
					go func() {
						defer wg.Done()
						n, _ := io.Copy(io.Discard, x.b)
						if n != int64(b.N)*chunk {
							b.Errorf("read %d bytes, want %d", n, int64(b.N)*chunk)
						}
					}()
					go func() {
						defer wg.Done()
						for range b.N {
							if _, err := x.c.Write(buf); err != nil {
								b.Error(err)
								return
							}
						}
						x.c.CloseWrite()
					}()
				}
				wg.Wait()
				el := time.Since(start)
				b.StopTimer()
				b.ReportMetric(float64(b.N)*chunk*float64(streams)*8/el.Seconds()/1e9, "Gbit/s")
				for _, x := range conns {
					x.c.Close()
					x.b.Close()
				}
			})
		})
	}
}

// BenchmarkPlanesRTT: 64-byte ping-pong through an echoing backend; one op
// is one round trip. Reports p50 and p99 in microseconds.
func BenchmarkPlanesRTT(b *testing.B) {
	pbRun(b, func(b *testing.B, r *pbRig) {
		c, be := r.conn(b)
		defer c.Close()
		go ptEcho(be)
		msg, got := make([]byte, 64), make([]byte, 64)
		for range 100 { // warm up
			c.Write(msg)
			io.ReadFull(c, got)
		}
		rtts := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for range b.N {
			t0 := time.Now()
			if _, err := c.Write(msg); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, got); err != nil {
				b.Fatal(err)
			}
			rtts = append(rtts, time.Since(t0))
		}
		b.StopTimer()
		slices.Sort(rtts)
		b.ReportMetric(float64(rtts[len(rtts)/2].Nanoseconds())/1e3, "p50-µs")
		b.ReportMetric(float64(rtts[len(rtts)*99/100].Nanoseconds())/1e3, "p99-µs")
	})
}

// BenchmarkPlanesIdleMemory: what an idle connection costs the agent. One
// op opens 2,000 connections that each move a byte both ways and then sit
// idle. The process holds the application's two sockets of each
// connection too, so the same is measured for direct connections (no
// agent) first and subtracted: agent-B/conn is Go heap + goroutine stacks
// after GC, agent-fds/conn the descriptors, both over direct.
func BenchmarkPlanesIdleMemory(b *testing.B) {
	const n = 2000
	pbRun(b, func(b *testing.B, r *pbRig) {
		for range b.N {
			mem, fds, gs, slab := pbIdle(b, r, n)
			if r.e.plane == nil {
				b.ReportMetric(mem, "B/conn")
				b.ReportMetric(fds, "fds/conn")
				b.ReportMetric(slab, "slab-B/conn")
				continue
			}
			// Direct baseline, measured in the same namespace.
			d := &pbRig{e: &ptEnv{tb: b, lnBackend: r.e.lnBackend}}
			dm, dfds, _, dslab := pbIdle(b, d, n)
			b.ReportMetric(mem-dm, "agent-B/conn")
			b.ReportMetric(fds-dfds, "agent-fds/conn")
			b.ReportMetric(gs, "goroutines/conn")
			// Kernel slab over direct: psocks, sockhash and hash entries,
			// pipes. Other processes move Slab too: indicative only.
			b.ReportMetric(slab-dslab, "kernel-slab-B/conn")
		}
	})
}

func pbIdle(b *testing.B, r *pbRig, n int) (bytesPer, fdsPer, gsPer, slabPer float64) {
	m0, f0, g0 := pbUsage(b)
	s0 := ptMeminfo(b)["Slab"]
	type cb struct{ c, b *net.TCPConn }
	conns := make([]cb, n)
	one := make([]byte, 1)
	for i := range conns {
		c, be := r.conn(b)
		conns[i] = cb{c, be}
		for _, ab := range [][2]*net.TCPConn{{c, be}, {be, c}} {
			if _, err := ab[0].Write(one); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(ab[1], one); err != nil {
				b.Fatal(err)
			}
		}
	}
	time.Sleep(100 * time.Millisecond)
	m1, f1, g1 := pbUsage(b)
	s1 := ptMeminfo(b)["Slab"]
	for _, x := range conns {
		x.c.Close()
		x.b.Close()
	}
	if l, ok := r.e.plane.(interface{ Len() int }); ok {
		for i := 0; i < 200 && l.Len() > 0; i++ {
			time.Sleep(10 * time.Millisecond)
		}
	}
	return (float64(m1) - float64(m0)) / float64(n), float64(f1-f0) / float64(n), float64(g1-g0) / float64(n),
		float64(s1-s0) / float64(n)
}

func pbUsage(tb testing.TB) (mem uint64, fds, goroutines int) {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatal(err)
	}
	return ms.HeapAlloc + ms.StackInuse, len(ents), runtime.NumGoroutine()
}
