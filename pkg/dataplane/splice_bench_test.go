package dataplane

import (
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// spBenchModes are the two ways of moving bytes compared side by side: this
// plane, and io.Copy between the same *net.TCPConn (which splices too, but
// keeps a pipe per direction for the connection's life).
var spBenchModes = []string{"splice", "iocopy"}

// spIOCopy forwards c both ways with io.Copy, passing each EOF on with
// CloseWrite; the direction that ends last closes both sockets. Two
// goroutines per connection, as for the splice plane.
func spIOCopy(c *Conn) {
	var left atomic.Int32
	left.Store(2)
	copyOne := func(dst, src *net.TCPConn) {
		io.Copy(dst, src)
		dst.CloseWrite()
		if left.Add(-1) == 0 {
			c.Client.Close()
			c.Backend.Close()
		}
	}
	go copyOne(c.Backend, c.Client)
	go copyOne(c.Client, c.Backend)
}

// spBenchPair builds one connection forwarded by mode.
func spBenchPair(b *testing.B, r *spRig, mode string) (client, backend *net.TCPConn) {
	c, pc, pb, be := r.spSockets()
	if mode != "iocopy" {
		r.spStart(c, pc, pb, be, 0)
	} else {
		spIOCopy(&Conn{Client: pc, Backend: pb})
	}
	b.Cleanup(func() { c.Close(); be.Close() })
	return c, be
}

// BenchmarkSpliceThroughput streams 4 MiB per op through one connection,
// one way and both ways at once. splice-1M uses 1 MiB pipes, the size
// io.Copy's splice asks for; the default is 64 KiB.
func BenchmarkSpliceThroughput(b *testing.B) {
	const chunk = 4 << 20
	for _, dir := range []string{"oneway", "bidi"} {
		for _, mode := range []string{"splice", "splice-1M", "iocopy"} {
			b.Run(dir+"/"+mode, func(b *testing.B) {
				opts := SpliceOptions{}
				if mode == "splice-1M" {
					opts.PipeSize = 1 << 20
				}
				r := spNewRig(b, opts)
				c, be := spBenchPair(b, r, mode)
				streams := [][2]*net.TCPConn{{c, be}}
				if dir == "bidi" {
					streams = append(streams, [2]*net.TCPConn{be, c})
				}
				b.SetBytes(int64(chunk * len(streams)))
				cpu0 := spCPU()
				b.ResetTimer()
				var wg sync.WaitGroup
				for _, s := range streams {
					wg.Go(func() {
						buf := make([]byte, 256<<10)
						for range b.N * (chunk / len(buf)) {
							if _, err := s[0].Write(buf); err != nil {
								b.Error(err)
								return
							}
						}
					})
					wg.Go(func() {
						if _, err := io.CopyN(io.Discard, s[1], int64(b.N)*chunk); err != nil {
							b.Error(err)
						}
					})
				}
				wg.Wait()
				// CPU per byte is steadier than MB/s on a shared machine. It
				// includes the test's own writers and readers, the same in
				// every mode.
				mb := float64(b.N*chunk*len(streams)) / 1e6
				b.ReportMetric(float64(spCPU()-cpu0)/mb, "cpu-ns/MB")
			})
		}
	}
}

// spCPU returns the process's user plus system CPU time in nanoseconds.
func spCPU() int64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// BenchmarkSplicePingPong bounces 64 bytes through one connection: the
// round-trip latency the data plane adds (ns/op = one round trip).
func BenchmarkSplicePingPong(b *testing.B) {
	for _, mode := range spBenchModes {
		b.Run(mode, func(b *testing.B) {
			r := spNewRig(b, SpliceOptions{})
			c, be := spBenchPair(b, r, mode)
			go func() {
				buf := make([]byte, 64)
				for {
					if _, err := io.ReadFull(be, buf); err != nil {
						return
					}
					if _, err := be.Write(buf); err != nil {
						return
					}
				}
			}()
			buf := make([]byte, 64)
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// spBenchUsage is the Go heap and stack in use after a GC.
func spBenchUsage() (heap, stack uint64) {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc, ms.StackInuse
}

// BenchmarkSpliceIdleMemory measures what an idle connection costs the
// process: 500 connections that each moved a byte both ways and then sit
// idle. bytes/conn is Go heap plus goroutine stacks (runtime.MemStats after
// GC: HeapAlloc + StackInuse, also reported apart), pipe-fds/conn the pipe descriptors held, goroutines/conn the
// goroutines parked. The sockets themselves (made before the baseline) are
// not counted. Run it with -benchtime=1x: one op is 500 connections.
func BenchmarkSpliceIdleMemory(b *testing.B) {
	const n = 500
	for _, mode := range spBenchModes {
		b.Run(mode, func(b *testing.B) {
			var heapPer, stackPer, pipesPer, gsPer float64
			for range b.N {
				r := spNewRig(b, SpliceOptions{})
				type four struct{ c, pc, pb, be *net.TCPConn }
				socks := make([]four, n)
				for i := range socks {
					c, pc, pb, be := r.spSockets()
					socks[i] = four{c, pc, pb, be}
				}
				heap0, stack0 := spBenchUsage()
				// The GCs above dropped io.Copy's pooled pipes of an earlier
				// run; give their cleanups time to close them.
				time.Sleep(50 * time.Millisecond)
				_, pipes0 := spFDs(b)
				gs0 := runtime.NumGoroutine()

				one := make([]byte, 1)
				for _, s := range socks {
					if mode == "splice" {
						r.spStart(s.c, s.pc, s.pb, s.be, time.Hour)
					} else {
						spIOCopy(&Conn{Client: s.pc, Backend: s.pb})
					}
					for _, ab := range [][2]*net.TCPConn{{s.c, s.be}, {s.be, s.c}} {
						if _, err := ab[0].Write(one); err != nil {
							b.Fatal(err)
						}
						if _, err := io.ReadFull(ab[1], one); err != nil {
							b.Fatal(err)
						}
					}
				}
				time.Sleep(50 * time.Millisecond)
				heap1, stack1 := spBenchUsage()
				_, pipes1 := spFDs(b)
				gs1 := runtime.NumGoroutine()
				heapPer += (float64(heap1) - float64(heap0)) / n
				stackPer += (float64(stack1) - float64(stack0)) / n
				pipesPer += float64(pipes1-pipes0) / n
				gsPer += float64(gs1-gs0) / n

				b.StopTimer()
				for _, s := range socks {
					s.c.Close()
					s.be.Close()
				}
				r.plane.Close()
				b.StartTimer()
			}
			b.ReportMetric((heapPer+stackPer)/float64(b.N), "bytes/conn")
			b.ReportMetric(heapPer/float64(b.N), "heap-bytes/conn")
			b.ReportMetric(stackPer/float64(b.N), "stack-bytes/conn")
			b.ReportMetric(pipesPer/float64(b.N), "pipe-fds/conn")
			b.ReportMetric(gsPer/float64(b.N), "goroutines/conn")
		})
	}
}
