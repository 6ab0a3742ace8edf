package main

// What the benchmark reads from /proc: whole-machine CPU (/proc/stat, so
// kernel work such as softirq and kernel workers is counted), the CPU of
// the processes that take part (a cross-check that other load on a shared
// machine does not inflate), memory (/proc/meminfo: sockmap's parked bytes
// are charged to no socket, so only Slab and MemAvailable show them) and
// process RSS.

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// clkTck is USER_HZ, the unit of /proc/stat and /proc/PID/stat times.
const clkTck = 100

// cpuStat is the aggregate "cpu" line of /proc/stat, in jiffies.
type cpuStat struct {
	user, nice, system, idle, iowait, irq, softirq, steal uint64
}

func readCPU() cpuStat {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuStat{}
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	v := make([]uint64, 9)
	for i := 1; i < len(f) && i < 9; i++ {
		v[i], _ = strconv.ParseUint(f[i], 10, 64)
	}
	return cpuStat{v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]}
}

// busy is the CPU time spent working (not idle, iowait or stolen).
func (c cpuStat) busy() uint64 { return c.user + c.nice + c.system + c.irq + c.softirq }
func (c cpuStat) total() uint64 {
	return c.busy() + c.idle + c.iowait + c.steal
}

// busySeconds between a and b.
func busySeconds(a, b cpuStat) float64 { return float64(b.busy()-a.busy()) / clkTck }

// busyFraction is the share of the whole machine busy between a and b.
func busyFraction(a, b cpuStat) float64 {
	t := b.total() - a.total()
	if t == 0 {
		return 0
	}
	return float64(b.busy()-a.busy()) / float64(t)
}

// procStat is one /proc/PID/stat: parent and CPU time (all threads, live
// and exited).
type procStat struct {
	ppid       int
	cpuJiffies uint64
	kthread    bool
}

func readProcStat(pid int) (procStat, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, false
	}
	// The command name is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, false
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is state (field 3); ppid field 4; utime 14; stime 15; flags 9.
	if len(f) < 13 {
		return procStat{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	flags, _ := strconv.ParseUint(f[6], 10, 64)
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	const pfKthread = 0x00200000
	return procStat{ppid: ppid, cpuJiffies: ut + st, kthread: flags&pfKthread != 0}, true
}

// allProcs reads every process's stat.
func allProcs() map[int]procStat {
	m := map[int]procStat{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ps, ok := readProcStat(pid); ok {
			m[pid] = ps
		}
	}
	return m
}

// attributedJiffies is the CPU time of the given processes and their
// descendants plus every kernel thread (kernel workers send sockmap's
// redirected segments; ksoftirqd takes over softirq under load), by PID, so
// a window can subtract per process (a process that exits meanwhile must
// not make the sum go backwards).
func attributedJiffies(roots []int) map[int]uint64 {
	return attributedFrom(allProcs(), roots)
}

// attributedFrom is attributedJiffies over one snapshot of /proc.
func attributedFrom(procs map[int]procStat, roots []int) map[int]uint64 {
	in := treeOf(procs, roots)
	out := map[int]uint64{}
	for pid, ps := range procs {
		if in[pid] || ps.kthread {
			out[pid] = ps.cpuJiffies
		}
	}
	return out
}

// treeOf is the set of roots and their descendants in procs.
func treeOf(procs map[int]procStat, roots []int) map[int]bool {
	in := map[int]bool{}
	for _, r := range roots {
		if r > 0 {
			in[r] = true
		}
	}
	// Descendants: repeat until no new ones (the tree is shallow).
	for changed := true; changed; {
		changed = false
		for pid, ps := range procs {
			if !in[pid] && in[ps.ppid] {
				in[pid] = true
				changed = true
			}
		}
	}
	return in
}

// processJiffies is the CPU time (user+sys) of root and its descendants
// (nginx's master and workers), by PID; empty for root 0 (no proxy).
func processJiffies(procs map[int]procStat, root int) map[int]uint64 {
	out := map[int]uint64{}
	if root <= 0 {
		return out
	}
	for pid := range treeOf(procs, []int{root}) {
		if ps, ok := procs[pid]; ok && !ps.kthread {
			out[pid] = ps.cpuJiffies
		}
	}
	return out
}

// kthreadJiffies is the CPU time of every kernel thread, by PID.
func kthreadJiffies(procs map[int]procStat) map[int]uint64 {
	out := map[int]uint64{}
	for pid, ps := range procs {
		if ps.kthread {
			out[pid] = ps.cpuJiffies
		}
	}
	return out
}

// jiffiesBetween is the CPU time used between two attributedJiffies
// samples: processes that started meanwhile count whole, ones that ended
// are lost (their last ticks are not visible), a reused PID counts from 0.
func jiffiesBetween(a, b map[int]uint64) uint64 {
	var sum uint64
	for pid, j1 := range b {
		j0 := a[pid]
		if j1 >= j0 {
			sum += j1 - j0
		} else {
			sum += j1
		}
	}
	return sum
}

// memInfo is the part of /proc/meminfo the benchmark uses, in bytes, and
// the bytes of slab objects in use (/proc/slabinfo: active objects × object
// size; unlike Slab it does not keep counting pages the caches hold on to).
type memInfo struct {
	Available, Slab, SUnreclaim, SlabObjs int64
}

// slabObjects sums active_objs × objsize over /proc/slabinfo (root only; 0
// when unreadable), leaving out proc_inode_cache: whatever on the machine
// walks /proc/PID/fd (monitoring, other tests) adds one /proc inode per
// socket there, which is not memory the connection needs.
func slabObjects() int64 {
	b, err := os.ReadFile("/proc/slabinfo")
	if err != nil {
		return 0
	}
	var sum int64
	for _, l := range strings.Split(string(b), "\n") {
		if l == "" || l[0] == '#' || strings.HasPrefix(l, "slabinfo") {
			continue
		}
		f := strings.Fields(l)
		if len(f) < 4 || f[0] == "proc_inode_cache" {
			continue
		}
		active, _ := strconv.ParseInt(f[1], 10, 64)
		size, _ := strconv.ParseInt(f[3], 10, 64)
		sum += active * size
	}
	return sum
}

func readMem() memInfo {
	m := memInfo{SlabObjs: slabObjects()}
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return m
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		v *= 1024
		switch f[0] {
		case "MemAvailable:":
			m.Available = v
		case "Slab:":
			m.Slab = v
		case "SUnreclaim:":
			m.SUnreclaim = v
		}
	}
	return m
}

// rssBytes is VmRSS of pid plus its descendants (nginx's workers).
func rssBytes(pid int) int64 {
	if pid <= 0 {
		return 0
	}
	pids := []int{pid}
	procs := allProcs()
	for p, ps := range procs {
		if ps.ppid == pid {
			pids = append(pids, p)
		}
	}
	var sum int64
	for _, p := range pids {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(p) + "/status")
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "VmRSS:") {
				f := strings.Fields(l)
				if len(f) >= 2 {
					v, _ := strconv.ParseInt(f[1], 10, 64)
					sum += v * 1024
				}
			}
		}
	}
	return sum
}

// machine describes where the benchmark ran.
type machine struct {
	Date    string `json:"date"`
	Nproc   int    `json:"nproc"`
	Kernel  string `json:"kernel"`
	CPU     string `json:"cpu"`
	MemGB   string `json:"mem"`
	NofileH string `json:"nofile_hard"`
	Go      string `json:"go"`
	Commit  string `json:"commit"`
	Nginx   string `json:"nginx"`
	HAProxy string `json:"haproxy"`
}

func describeMachine() machine {
	m := machine{Date: time.Now().UTC().Format("2006-01-02 15:04 MST"), Nproc: runtime.NumCPU(), Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if out, err := exec.Command("nproc").Output(); err == nil {
		m.Nproc, _ = strconv.Atoi(strings.TrimSpace(string(out)))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				_, v, _ := strings.Cut(l, ":")
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
		if len(f) >= 2 {
			kb, _ := strconv.ParseFloat(f[1], 64)
			m.MemGB = fmt.Sprintf("%.1f GiB", kb/(1<<20))
		}
	}
	if out, err := exec.Command("sh", "-c", "ulimit -Hn").Output(); err == nil {
		m.NofileH = strings.TrimSpace(string(out))
	}
	if out, err := exec.Command("git", "describe", "--always", "--dirty").Output(); err == nil {
		m.Commit = strings.TrimSpace(string(out))
	}
	if out, err := exec.Command(nginxBin, "-v").CombinedOutput(); err == nil {
		m.Nginx = strings.TrimSpace(strings.TrimPrefix(string(out), "nginx version: "))
	}
	if out, err := exec.Command(haproxyBin, "-v").Output(); err == nil {
		f := strings.Fields(strings.SplitN(string(out), "\n", 2)[0])
		if len(f) >= 3 {
			m.HAProxy = f[2]
		}
	}
	return m
}

// haveBinary reports whether path is an executable file.
func haveBinary(path string) bool {
	st, err := os.Stat(path)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}

// selfExe is the harness binary, re-executed for the generator, the
// idle-connection holder and the backends.
func selfExe() string {
	p, err := os.Executable()
	if err != nil {
		return os.Args[0]
	}
	p, _ = filepath.EvalSymlinks(p)
	return p
}
