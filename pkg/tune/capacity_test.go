package tune

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func fakeProc(t *testing.T, memAvailableKB string) string {
	t.Helper()
	dir := t.TempDir()
	mi := "MemTotal:       24683620 kB\nMemFree:        1000 kB\nMemAvailable:   " + memAvailableKB + " kB\n"
	if err := os.WriteFile(filepath.Join(dir, "meminfo"), []byte(mi), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestCapacity(t *testing.T) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	fdConns := ConnsForNoFile(rl.Cur)

	c := &Checker{
		Root: fakeTree(t, map[string]string{
			"net.ipv4.ip_local_port_range":     "32768\t60999",
			"net.netfilter.nf_conntrack_max":   "262144",
			"net.netfilter.nf_conntrack_count": "1000",
			"fs.epoll.max_user_watches":        "5491489",
			"fs.file-nr":                       "2048\t0\t2466167",
		}),
		ProcRoot: fakeProc(t, "1048576"), // 1 GiB → 65536 connections at 16 KiB
	}
	capa := c.Capacity(CapacityInput{WantConns: 1_000_000, Backends: 2})
	got := map[string]int{}
	for _, l := range capa.Limits {
		got[l.Name] = l.MaxConns
		if l.Detail == "" {
			t.Errorf("%s has no detail", l.Name)
		}
	}
	want := map[string]int{
		"fds":       fdConns,
		"memory":    65536,
		"ports":     28232 * 2,
		"conntrack": (262144 - 1000) / 2,
		"epoll":     5491489 / 2,
		"file-max":  (2466167 - 2048) / 2,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("limit %s = %d, want %d", k, got[k], v)
		}
	}
	if capa.PortsPerBackend != 28232 {
		t.Errorf("PortsPerBackend %d", capa.PortsPerBackend)
	}
	smallest, name := 1_000_000, "config"
	for k, v := range want {
		if v < smallest {
			smallest, name = v, k
		}
	}
	if capa.MaxConns != smallest || capa.LimitedBy != name {
		t.Errorf("MaxConns %d limited by %s, want %d by %s", capa.MaxConns, capa.LimitedBy, smallest, name)
	}
	if s := capa.String(); !strings.Contains(s, "limited by "+name) {
		t.Errorf("String() = %s", s)
	}

	// Unknown backends: the port limit is reported per backend only.
	capa = c.Capacity(CapacityInput{WantConns: 100})
	for _, l := range capa.Limits {
		if l.Name == "ports" {
			t.Error("ports limit without a backend count")
		}
	}
	if capa.MaxConns != min(100, fdConns) || capa.PortsPerBackend != 28232 {
		t.Errorf("MaxConns %d (%s), ports per backend %d", capa.MaxConns, capa.LimitedBy, capa.PortsPerBackend)
	}
}

func TestStartupFakeTree(t *testing.T) {
	for _, mode := range []Mode{ModeOff, ModeCheck, ModeApply} {
		t.Run(string(mode), func(t *testing.T) {
			c := newTestChecker(t, hostLike())
			c.ProcRoot = fakeProc(t, "24399984")
			rep, err := Startup(StartupOptions{Mode: mode, WantConns: 5000, Backends: 3, Checker: c})
			if err != nil {
				t.Fatal(err)
			}
			somax := readKey(t, c.Root, "net.core.somaxconn")
			switch mode {
			case ModeOff:
				if rep.Results != nil || rep.Applied != nil || somax != "4096" {
					t.Errorf("off did something: %+v, somaxconn %s", rep, somax)
				}
			case ModeCheck:
				if !NeedsChange(rep.Results) || rep.Applied != nil || somax != "4096" {
					t.Errorf("check: needs change %v, applied %v, somaxconn %s", NeedsChange(rep.Results), rep.Applied, somax)
				}
			case ModeApply:
				if rep.Applied == nil || somax != "65535" || rep.Backlog != 65535 {
					t.Errorf("apply: applied %v, somaxconn %s, backlog %d", rep.Applied, somax, rep.Backlog)
				}
				if verdicts(rep.Results)["net.core.somaxconn"] != VerdictOK {
					t.Error("results are not re-checked after apply")
				}
			}
			if rep.NoFile.Need != NoFileNeed(5000) || rep.MaxConns != rep.NoFile.MaxConns {
				t.Errorf("nofile %+v, MaxConns %d", rep.NoFile, rep.MaxConns)
			}
			var b bytes.Buffer
			rep.Log(slog.New(slog.NewTextHandler(&b, nil)))
			if !strings.Contains(b.String(), "msg=capacity") {
				t.Errorf("log lacks the capacity line:\n%s", b.String())
			}
			if mode == ModeCheck && !strings.Contains(b.String(), "sysctl below recommendation") {
				t.Errorf("check mode does not warn:\n%s", b.String())
			}
		})
	}
	if _, err := ParseMode("sometimes"); err == nil {
		t.Error("ParseMode accepted a bad mode")
	}
	if m, err := ParseMode(""); err != nil || m != ModeCheck {
		t.Errorf("ParseMode(\"\") = %q, %v; check is the default", m, err)
	}
}
