package main

import (
	"os"
	"testing"
	"time"
)

func TestChattyConnsFitFileLimit(t *testing.T) {
	p := plan{chattyConns: 4000}
	if got := chattyConns(p, 20000); got != 4000 {
		t.Fatalf("4000 under a 20000 limit: got %d", got)
	}
	// A proxy needs two descriptors per connection.
	if got, want := chattyConns(p, 4096), (4096-fdReserve)/2; got != want {
		t.Fatalf("4000 under a 4096 limit: got %d, want %d", got, want)
	}
	if got := chattyConns(plan{chattyConns: 50000}, 1<<40); got != haproxyMaxconn-fdReserve {
		t.Fatalf("bounded by HAProxy's maxconn: got %d", got)
	}
	if got := chattyConns(p, 0); got != 4000 {
		t.Fatalf("unknown limit: got %d", got)
	}
}

func TestProcessJiffiesTree(t *testing.T) {
	procs := map[int]procStat{
		10: {ppid: 1, cpuJiffies: 5},                 // nginx master
		11: {ppid: 10, cpuJiffies: 7},                // worker
		12: {ppid: 10, cpuJiffies: 9},                // worker
		13: {ppid: 11, cpuJiffies: 1},                // grandchild
		20: {ppid: 1, cpuJiffies: 100},               // someone else
		2:  {ppid: 0, cpuJiffies: 50, kthread: true}, // kthreadd
		30: {ppid: 2, cpuJiffies: 3, kthread: true},  // a kworker
	}
	got := processJiffies(procs, 10)
	var sum uint64
	for _, j := range got {
		sum += j
	}
	if len(got) != 4 || sum != 22 {
		t.Fatalf("proxy tree: %v", got)
	}
	if len(processJiffies(procs, 0)) != 0 {
		t.Fatal("no proxy (direct) must count nothing")
	}
	k := kthreadJiffies(procs)
	if len(k) != 2 || k[2] != 50 || k[30] != 3 {
		t.Fatalf("kernel threads: %v", k)
	}
	a := attributedFrom(procs, []int{10})
	if len(a) != 6 || a[20] != 0 {
		t.Fatalf("attributed: %v", a)
	}
}

// TestGenChatty runs the chatty generator against the echo backend in this
// process: every connection sends at about 1/period and the figures are
// filled in.
func TestGenChatty(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for about a second")
	}
	ln, err := listenTCP("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serveWS(c)
		}
	}()
	const conns, period, dur = 40, 50 * time.Millisecond, 600 * time.Millisecond
	r, err := genChatty(genOpts{addr: ln.Addr().String(), conns: conns, size: 64, dur: dur, warm: period,
		period: period, pids: []int{os.Getpid()}})
	if err != nil {
		t.Fatal(err)
	}
	if r.Errors != 0 {
		t.Fatalf("errors: %d (%s)", r.Errors, r.Note)
	}
	offered := float64(conns) * float64(time.Second/period)
	if r.MsgsPerS < offered*0.6 || r.MsgsPerS > offered*1.3 {
		t.Fatalf("%.0f msg/s, offered %.0f", r.MsgsPerS, offered)
	}
	if r.P50us <= 0 || r.P99us < r.P50us || r.ProxyPID != 0 || r.AttrMsPerKMsg <= 0 && r.CPUAttrS > 0 {
		t.Fatalf("result: %+v", r)
	}
}
