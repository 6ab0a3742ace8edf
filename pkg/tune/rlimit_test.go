package tune

import (
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

type fakeRlimit struct {
	cur, max uint64
	cap      bool
	nr       uint64
	sets     int
}

func (f *fakeRlimit) get() (uint64, uint64, error) { return f.cur, f.max, nil }
func (f *fakeRlimit) set(cur, max uint64) error {
	f.sets++
	// The kernel's rules: soft ≤ hard; raising hard needs CAP_SYS_RESOURCE
	// and stays ≤ fs.nr_open.
	if cur > max || (max > f.max && (!f.cap || max > f.nr)) {
		return unix.EPERM
	}
	f.cur, f.max = cur, max
	return nil
}
func (f *fakeRlimit) capSysResource() bool { return f.cap }
func (f *fakeRlimit) nrOpen() uint64       { return f.nr }

func TestRaiseNoFile(t *testing.T) {
	tests := []struct {
		name      string
		sys       fakeRlimit
		want      int
		soft      uint64
		hard      uint64
		maxConns  int
		capped    bool
		msgHas    []string
		msgHasNot []string
	}{
		{
			name: "enough already", sys: fakeRlimit{cur: 1 << 20, max: 1 << 20, nr: 1 << 20},
			want: 1000, soft: 1 << 20, hard: 1 << 20, maxConns: 1000,
		},
		{
			name: "soft raised to need, never lowered", sys: fakeRlimit{cur: 1024, max: 524288, nr: 1 << 20},
			want: 10000, soft: 21024, hard: 524288, maxConns: 10000,
		},
		{
			name: "hard too low, no capability", sys: fakeRlimit{cur: 20000, max: 20000, nr: 1 << 20},
			want: 50000, soft: 20000, hard: 20000, maxConns: (20000 - Headroom) / 2, capped: true,
			msgHas: []string{"hard limit (RLIMIT_NOFILE) is 20000", "needs 101024 for 50000 connections", "CAP_SYS_RESOURCE is missing",
				"capped to 9488", "LimitNOFILE=101024", "ulimit -Hn 101024", "Kubernetes", "containerd", "fs.nr_open (now 1048576)"},
			msgHasNot: []string{"raise it first"},
		},
		{
			name: "hard raised with the capability", sys: fakeRlimit{cur: 20000, max: 20000, cap: true, nr: 1 << 20},
			want: 50000, soft: 101024, hard: 101024, maxConns: 50000,
		},
		{
			name: "capability, but fs.nr_open stops it", sys: fakeRlimit{cur: 1024, max: 4096, cap: true, nr: 1 << 20},
			want: 1_000_000, soft: 1 << 20, hard: 1 << 20, maxConns: (1<<20 - Headroom) / 2, capped: true,
			msgHas:    []string{"fs.nr_open (1048576) stops", "sysctl -w fs.nr_open=2097152", "LimitNOFILE=2001024"},
			msgHasNot: []string{"CAP_SYS_RESOURCE is missing"},
		},
		{
			name: "hard below headroom", sys: fakeRlimit{cur: 512, max: 512, nr: 1 << 20},
			want: 10, soft: 512, hard: 512, maxConns: 0, capped: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sys := tt.sys
			r, err := raiseNoFile(&sys, tt.want)
			if err != nil {
				t.Fatal(err)
			}
			if r.Soft != tt.soft || r.Hard != tt.hard || sys.cur != tt.soft || sys.max != tt.hard {
				t.Errorf("soft/hard = %d/%d (kernel %d/%d), want %d/%d", r.Soft, r.Hard, sys.cur, sys.max, tt.soft, tt.hard)
			}
			if r.MaxConns != tt.maxConns || r.Capped != tt.capped {
				t.Errorf("MaxConns %d capped %v, want %d %v", r.MaxConns, r.Capped, tt.maxConns, tt.capped)
			}
			if !tt.capped && r.Message != "" {
				t.Errorf("message without a cap: %s", r.Message)
			}
			for _, s := range tt.msgHas {
				if !strings.Contains(r.Message, s) {
					t.Errorf("message lacks %q:\n%s", s, r.Message)
				}
			}
			for _, s := range tt.msgHasNot {
				if strings.Contains(r.Message, s) {
					t.Errorf("message has %q:\n%s", s, r.Message)
				}
			}
		})
	}
}

// TestRaiseNoFileThisHost runs the real thing. On a host whose hard limit
// is below what 50,000 connections need and without CAP_SYS_RESOURCE (this
// project's CI host: hard limit 20000), the agent must cap itself and say how
// to fix it.
func TestRaiseNoFileThisHost(t *testing.T) {
	var before unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &before); err != nil {
		t.Fatal(err)
	}
	const want = 50_000
	r, err := RaiseNoFile(want)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("before %d/%d, after %d/%d, cap_sys_resource %v, nr_open %d, max conns %d", before.Cur, before.Max, r.Soft, r.Hard, r.CapSysResource, r.NrOpen, r.MaxConns)
	var after unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &after); err != nil {
		t.Fatal(err)
	}
	if after.Cur != r.Soft || after.Max != r.Hard {
		t.Errorf("result says %d/%d, kernel says %d/%d", r.Soft, r.Hard, after.Cur, after.Max)
	}
	if after.Cur < min(NoFileNeed(want), before.Max) {
		t.Errorf("soft limit %d not raised toward %d", after.Cur, NoFileNeed(want))
	}
	if before.Max >= NoFileNeed(want) || r.CapSysResource {
		t.Skipf("hard limit %d (CAP_SYS_RESOURCE %v) is high enough or raisable: no cap to check", before.Max, r.CapSysResource)
	}
	if !r.Capped || r.MaxConns != int(before.Max-Headroom)/2 {
		t.Fatalf("capped %v MaxConns %d, want capped to %d", r.Capped, r.MaxConns, (before.Max-Headroom)/2)
	}
	for _, s := range []string{
		"hard limit (RLIMIT_NOFILE) is " + strconv.FormatUint(before.Max, 10),
		"needs 101024 for 50000 connections",
		"CAP_SYS_RESOURCE is missing",
		"capped to " + strconv.Itoa(r.MaxConns),
		"LimitNOFILE=101024",
		"ulimit -Hn 101024",
		"fs.nr_open",
	} {
		if !strings.Contains(r.Message, s) {
			t.Errorf("message lacks %q:\n%s", s, r.Message)
		}
	}
	t.Log(r.Message)
}

func TestNoFileArithmetic(t *testing.T) {
	if NoFileNeed(0) != Headroom || NoFileNeed(-5) != Headroom || NoFileNeed(100) != 1224 {
		t.Error("NoFileNeed")
	}
	if ConnsForNoFile(20000) != 9488 || ConnsForNoFile(Headroom) != 0 || ConnsForNoFile(10) != 0 {
		t.Error("ConnsForNoFile")
	}
	for _, n := range []int{0, 1, 9488, 1_000_000} {
		if ConnsForNoFile(NoFileNeed(n)) != n {
			t.Errorf("round trip %d", n)
		}
	}
}
