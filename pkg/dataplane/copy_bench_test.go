package dataplane

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wsplice/wsplice/pkg/tlsterm"
	"github.com/wsplice/wsplice/pkg/tlsterm/tlstest"
)

// BenchmarkCopyIdleTLSMemory measures what an idle TLS-terminated
// connection costs the agent: the server's crypto/tls state, both TCP
// sockets' Go objects and the copy plane's two parked directions. The TLS
// clients and the echo backend run in a child process (this test binary
// again), so the agent's heap holds only the agent's side. Each connection
// echoes one message of the sub-benchmark's size, then stays idle:
// crypto/tls keeps its record buffer at the size of the largest record it
// read, so after-16KiB shows what a connection that once carried a full
// record keeps.
//
//	total-bytes/conn  Go heap + stacks per connection, everything above
//	plane-bytes/conn  the copy plane's share (after the handshakes)
//
// Kernel socket memory is not included (see /proc/net/sockstat).
func BenchmarkCopyIdleTLSMemory(b *testing.B) {
	if os.Getenv("WSPLICE_COPYBENCH_CHILD") != "" {
		copyBenchChild()
		return
	}
	n := 1000
	if v, err := strconv.Atoi(os.Getenv("WSPLICE_COPYBENCH_CONNS")); err == nil && v > 0 {
		n = v
	}
	for _, size := range []int{64, 16 << 10} {
		name := fmt.Sprintf("after-%dB", size)
		if size >= 1024 {
			name = fmt.Sprintf("after-%dKiB", size>>10)
		}
		b.Run(name, func(b *testing.B) {
			var total, plane, gs float64
			for range b.N {
				t, p, g := copyBenchOnce(b, n, size)
				total, plane, gs = total+t, plane+p, gs+g
			}
			b.ReportMetric(total/float64(b.N), "total-bytes/conn")
			b.ReportMetric(plane/float64(b.N), "plane-bytes/conn")
			b.ReportMetric(gs/float64(b.N), "goroutines/conn")
		})
	}
}

func copyBenchUsage() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse + ms.StackInuse
}

func copyBenchOnce(b *testing.B, n, size int) (total, plane, gs float64) {
	b.StopTimer()
	ca := tlstest.NewCA(b, "bench")
	leaf := ca.Issue("srv", "bench.example")
	store, err := tlsterm.New(tlsterm.Options{Certificates: []tlsterm.CertFiles{{Cert: leaf.CertFile, Key: leaf.KeyFile}}})
	if err != nil {
		b.Fatal(err)
	}
	ln := cpListen(b)
	p := NewCopy(CopyOptions{})
	defer p.Close()

	type accepted struct {
		tc  *tls.Conn
		err error
	}
	acc := make(chan accepted, n)
	go func() {
		for range n {
			c, err := ln.AcceptTCP()
			if err != nil {
				acc <- accepted{err: err}
				return
			}
			tc, err := store.Handshake(c, 10*time.Second)
			acc <- accepted{tc, err}
		}
	}()
	base := copyBenchUsage()
	gs0 := runtime.NumGoroutine()

	cmd := exec.Command(os.Args[0], "-test.run=^$", "-test.bench=^BenchmarkCopyIdleTLSMemory$", "-test.benchtime=1x")
	cmd.Env = append(os.Environ(), "WSPLICE_COPYBENCH_CHILD=1", "WSPLICE_COPYBENCH_ADDR="+ln.Addr().String(),
		fmt.Sprintf("WSPLICE_COPYBENCH_N=%d", n), fmt.Sprintf("WSPLICE_COPYBENCH_SIZE=%d", size))
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { stdin.Close(); cmd.Wait() }()
	lines := bufio.NewScanner(stdout)
	expect := func(prefix string) string {
		for lines.Scan() {
			if rest, ok := strings.CutPrefix(lines.Text(), prefix); ok {
				return strings.TrimSpace(rest)
			}
		}
		b.Fatalf("child ended before %q: %v", prefix, lines.Err())
		return ""
	}
	backend := expect("BACKEND ")

	conns := make([]*tls.Conn, 0, n)
	bes := make([]*net.TCPConn, 0, n)
	for range n {
		a := <-acc
		if a.err != nil {
			b.Fatal(a.err)
		}
		be, err := net.Dial("tcp", backend)
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, a.tc)
		bes = append(bes, be.(*net.TCPConn))
	}
	expect("HANDSHAKEN")
	before := copyBenchUsage()
	gs1 := runtime.NumGoroutine()
	for i := range conns {
		if err := p.StartStreams(&CopyConn{ID: uint64(i + 1), Client: conns[i], Backend: bes[i], Done: func(Result) {}}); err != nil {
			b.Fatal(err)
		}
	}
	b.StartTimer()
	io.WriteString(stdin, "GO\n")
	expect("READY")
	b.StopTimer()
	time.Sleep(100 * time.Millisecond)
	after := copyBenchUsage()
	gs2 := runtime.NumGoroutine()
	total = (float64(after) - float64(base)) / float64(n)
	plane = (float64(after) - float64(before)) / float64(n)
	gs = float64(gs2-gs0) / float64(n)
	b.Logf("%d conns: total %.0f B/conn (plane %.0f), goroutines %d→%d→%d", n, total, plane, gs0, gs1, gs2)
	return total, plane, gs
}

// copyBenchChild is the other process: an echo backend, and n TLS clients
// that each echo one message through the agent and then stay idle until
// stdin closes.
func copyBenchChild() {
	n, _ := strconv.Atoi(os.Getenv("WSPLICE_COPYBENCH_N"))
	size, _ := strconv.Atoi(os.Getenv("WSPLICE_COPYBENCH_SIZE"))
	addr := os.Getenv("WSPLICE_COPYBENCH_ADDR")
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "copybench child:", err)
		os.Exit(1)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	fmt.Printf("BACKEND %s\n", ln.Addr())
	cfg := &tls.Config{InsecureSkipVerify: true, ServerName: "bench.example", NextProtos: []string{"http/1.1"}}
	conns := make([]*tls.Conn, n)
	for i := range conns {
		c, err := tls.Dial("tcp", addr, cfg)
		if err != nil {
			fail(err)
		}
		conns[i] = c
	}
	fmt.Println("HANDSHAKEN")
	in := bufio.NewReader(os.Stdin)
	if _, err := in.ReadString('\n'); err != nil {
		fail(err)
	}
	msg := make([]byte, size)
	got := make([]byte, size)
	for _, c := range conns {
		if _, err := c.Write(msg); err != nil {
			fail(err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			fail(err)
		}
	}
	fmt.Println("READY")
	io.Copy(io.Discard, in)
	os.Exit(0)
}
