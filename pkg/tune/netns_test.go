package tune

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/wsplice/wsplice/test/testutil"
	"golang.org/x/sys/unix"
)

// netSettings is the real table without fs.*: global settings that must
// never be written by a test. The global net.* ones stay, because a child
// network namespace sees them read-only or not at all — which is what the
// test checks — and the write guard below fails the test should one ever
// be written.
func netSettings() []Setting {
	var out []Setting
	for _, s := range Settings {
		if strings.HasPrefix(s.Key, "net.") {
			out = append(out, s)
		}
	}
	return out
}

// hostValue reads a sysctl of the host's namespace: from a fresh goroutine,
// which cannot run on the thread InNetNS locked into the test namespace.
func hostValue(t *testing.T, key string) string {
	t.Helper()
	ch := make(chan string)
	go func() {
		b, err := os.ReadFile(Setting{Key: key}.path(DefaultRoot))
		if err != nil {
			ch <- "error: " + err.Error()
			return
		}
		ch <- normalize(string(b))
	}()
	return <-ch
}

// TestNetNSCheckApplyRevert checks, applies and reverts the real net.*
// sysctls inside a network namespace made for the test, and verifies that
// the host's namespace is untouched.
func TestNetNSCheckApplyRevert(t *testing.T) {
	testutil.RequirePrivileged(t)
	perNS := []string{}
	for _, s := range netSettings() {
		if s.PerNetNS && s.Compare != Info {
			perNS = append(perNS, s.Key)
		}
	}
	hostBefore := map[string]string{}
	for _, k := range perNS {
		hostBefore[k] = hostValue(t, k)
	}
	state := filepath.Join(t.TempDir(), "tune-originals.json")

	testutil.InNetNS(t, func() {
		c := &Checker{Settings: netSettings(), StatePath: state}
		c.writeFile = func(p string, b []byte) error {
			key := strings.ReplaceAll(strings.TrimPrefix(p, DefaultRoot+"/"), "/", ".")
			if s, ok := Lookup(key); !ok || !s.PerNetNS {
				t.Errorf("test tried to write global setting %s", key)
				return unix.EPERM
			}
			return writeSysctl(p, b)
		}
		ns := c.nsID()
		if ns == "" || ns == hostNetNS(t) {
			t.Fatalf("not in a new network namespace: %q", ns)
		}

		// A fresh namespace starts from the kernel's defaults.
		before := map[string]Result{}
		for _, r := range c.Check() {
			before[r.Key] = r
			t.Logf("before: %-36s %-8s %-22s %s %s", r.Key, r.Verdict, r.Current, r.Target, r.Detail)
			if !safeInChildNS(r) {
				t.Fatalf("%s is global and %s in a child namespace: apply would write the host's value", r.Key, r.Verdict)
			}
		}
		for _, k := range []string{"net.core.somaxconn", "net.ipv4.tcp_tw_reuse", "net.ipv4.tcp_fin_timeout", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_slow_start_after_idle"} {
			if before[k].Verdict != VerdictLow {
				t.Errorf("%s: verdict %q in a fresh namespace (current %s), want low", k, before[k].Verdict, before[k].Current)
			}
		}
		// Global settings seen from a child namespace: never fatal.
		if v := before["net.core.netdev_max_backlog"].Verdict; v != VerdictMissing {
			t.Errorf("netdev_max_backlog: %q, want missing (global, invisible in a child namespace)", v)
		}
		if r := before["net.netfilter.nf_conntrack_max"]; r.Verdict != VerdictMissing && r.Verdict != VerdictReadOnly && r.Verdict != VerdictOK {
			t.Errorf("nf_conntrack_max: %q", r.Verdict)
		}
		readOnlyOrMissing := 0
		for _, r := range before {
			if r.Verdict == VerdictReadOnly || r.Verdict == VerdictMissing {
				readOnlyOrMissing++
			}
		}
		if readOnlyOrMissing == 0 {
			t.Error("expected at least one read-only or missing setting in a child namespace")
		}

		rep, err := c.Apply(false)
		if err != nil {
			t.Fatal(err)
		}
		for _, ch := range rep.Changes {
			if before[ch.Key].Verdict == VerdictLow && ch.Action != ActionChanged {
				t.Errorf("%s: %s (%s)", ch.Key, ch.Action, ch.Detail)
			}
			if before[ch.Key].Verdict != VerdictLow && ch.Action == ActionChanged {
				t.Errorf("%s changed though its verdict was %s", ch.Key, before[ch.Key].Verdict)
			}
		}
		for _, r := range c.Check() {
			if before[r.Key].Verdict == VerdictLow && r.Verdict != VerdictOK {
				t.Errorf("after apply %s is %s (%s)", r.Key, r.Verdict, r.Current)
			}
		}
		if n := Somaxconn(); n != 65535 {
			t.Errorf("Somaxconn in the namespace = %d after apply, want 65535", n)
		}
		for k, v := range hostBefore {
			if got := hostValue(t, k); got != v {
				t.Errorf("host %s changed from %s to %s", k, v, got)
			}
		}

		rrep, err := c.Revert(false)
		if err != nil {
			t.Fatal(err)
		}
		for _, ch := range rrep.Changes {
			if ch.Action != ActionChanged {
				t.Errorf("revert %s: %s (%s)", ch.Key, ch.Action, ch.Detail)
			}
		}
		for _, r := range c.Check() {
			if r.Current != before[r.Key].Current {
				t.Errorf("after revert %s = %q, want %q", r.Key, r.Current, before[r.Key].Current)
			}
		}
		if _, err := os.Stat(state); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("state file left after a full revert: %v", err)
		}
	})
}

// safeInChildNS reports whether applying r cannot touch a global setting:
// per-netns settings always, global ones only if apply skips them (not low).
func safeInChildNS(r Result) bool {
	return r.Scope == "netns" || r.Verdict != VerdictLow
}

func hostNetNS(t *testing.T) string {
	ch := make(chan string)
	go func() { ch <- NetNSID() }()
	return <-ch
}
