package tune

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// fakeTree writes a fake /proc/sys under a temporary directory: key → value.
func fakeTree(t *testing.T, values map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for k, v := range values {
		p := Setting{Key: k}.path(root)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func readKey(t *testing.T, root, key string) string {
	t.Helper()
	b, err := os.ReadFile(Setting{Key: key}.path(root))
	if err != nil {
		t.Fatal(err)
	}
	return normalize(string(b))
}

// testSettings is a small table covering each comparison.
var testSettings = []Setting{
	{Key: "net.core.somaxconn", Recommended: "65535", Compare: AtLeast, PerNetNS: true, Why: "backlog"},
	{Key: "net.ipv4.tcp_fin_timeout", Recommended: "15", Compare: AtMost, PerNetNS: true, Why: "fin"},
	{Key: "net.ipv4.tcp_tw_reuse", Recommended: "1", Compare: Exact, PerNetNS: true, Why: "tw"},
	{Key: "net.ipv4.ip_local_port_range", Recommended: "1024 65535", Compare: Range, PerNetNS: true, Why: "ports"},
	{Key: "net.ipv4.tcp_rmem", Compare: Info, PerNetNS: true, Why: "rmem"},
	{Key: "net.netfilter.nf_conntrack_max", Recommended: "1048576", Compare: AtLeast, Optional: true, Why: "ct"},
	{Key: "net.core.netdev_max_backlog", Recommended: "16384", Compare: AtLeast, Why: "netdev"},
	{Key: "fs.nr_open", Recommended: "2097152", Compare: AtLeast, Why: "nr_open"},
	{Key: "fs.file-max", Recommended: "4194304", Compare: AtLeast, Why: "file-max"},
	{Key: "net.core.rmem_max", Recommended: "1048576", Compare: AtLeast, Why: "rmem_max"},
}

// hostLike is a fresh kernel's values; conntrack and netdev_max_backlog
// are absent, as in a child network namespace without the module.
func hostLike() map[string]string {
	return map[string]string{
		"net.core.somaxconn":           "4096",
		"net.ipv4.tcp_fin_timeout":     "60",
		"net.ipv4.tcp_tw_reuse":        "2",
		"net.ipv4.ip_local_port_range": "32768\t60999",
		"net.ipv4.tcp_rmem":            "4096\t131072\t6291456",
		"fs.nr_open":                   "1048576",
		"fs.file-max":                  "9223372036854775807", // systemd's LONG_MAX: never lowered
		"net.core.rmem_max":            "212992",
	}
}

func newTestChecker(t *testing.T, values map[string]string) *Checker {
	return &Checker{
		Root:      fakeTree(t, values),
		Settings:  testSettings,
		StatePath: filepath.Join(t.TempDir(), "state", "tune-originals.json"),
		netnsID:   func() string { return "net:[1]" },
	}
}

func verdicts(rs []Result) map[string]Verdict {
	m := map[string]Verdict{}
	for _, r := range rs {
		m[r.Key] = r.Verdict
	}
	return m
}

func TestCheckFakeTree(t *testing.T) {
	c := newTestChecker(t, hostLike())
	// rmem_max is low but read-only here (as in a child namespace).
	c.writable = func(p string) error {
		if strings.HasSuffix(p, "/net/core/rmem_max") {
			return unix.EACCES
		}
		return nil
	}
	rs := c.Check()
	want := map[string]Verdict{
		"net.core.somaxconn":             VerdictLow,
		"net.ipv4.tcp_fin_timeout":       VerdictLow,
		"net.ipv4.tcp_tw_reuse":          VerdictLow,
		"net.ipv4.ip_local_port_range":   VerdictLow,
		"net.ipv4.tcp_rmem":              VerdictInfo,
		"net.netfilter.nf_conntrack_max": VerdictMissing,
		"net.core.netdev_max_backlog":    VerdictMissing,
		"fs.nr_open":                     VerdictLow,
		"fs.file-max":                    VerdictOK,
		"net.core.rmem_max":              VerdictReadOnly,
	}
	got := verdicts(rs)
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: verdict %q, want %q", k, got[k], v)
		}
	}
	for _, r := range rs {
		switch r.Key {
		case "net.ipv4.ip_local_port_range":
			if r.Current != "32768 60999" || r.Target != "1024 65535" {
				t.Errorf("port range current %q target %q", r.Current, r.Target)
			}
		case "net.netfilter.nf_conntrack_max":
			if !strings.Contains(r.Detail, "not present") {
				t.Errorf("conntrack detail %q, want it to say not present", r.Detail)
			}
		case "net.core.netdev_max_backlog":
			if !strings.Contains(r.Detail, "global") {
				t.Errorf("netdev_max_backlog detail %q, want it to say the setting is global", r.Detail)
			}
		case "net.core.rmem_max":
			if !strings.Contains(r.Detail, "cannot write") || r.Target != "1048576" {
				t.Errorf("rmem_max detail %q target %q", r.Detail, r.Target)
			}
		}
		if r.Why == "" || r.Scope == "" {
			t.Errorf("%s: why %q scope %q", r.Key, r.Why, r.Scope)
		}
	}
	if !NeedsChange(rs) {
		t.Error("NeedsChange = false")
	}
}

func TestCheckUnreadableIsAVerdict(t *testing.T) {
	v := hostLike()
	v["net.core.somaxconn"] = "lots"
	c := newTestChecker(t, v)
	// A directory where a file should be: reading fails with EISDIR.
	if err := os.MkdirAll(Setting{Key: "net.core.netdev_max_backlog"}.path(c.Root), 0o755); err != nil {
		t.Fatal(err)
	}
	got := verdicts(c.Check())
	if got["net.core.somaxconn"] != VerdictError || got["net.core.netdev_max_backlog"] != VerdictError {
		t.Errorf("verdicts %v, want error for the unparsable and the unreadable setting", got)
	}
}

func TestApplyRevertFakeTree(t *testing.T) {
	c := newTestChecker(t, hostLike())
	c.writable = func(p string) error {
		if strings.HasSuffix(p, "/net/core/rmem_max") {
			return unix.EROFS
		}
		return nil
	}

	// Dry run: reports, writes nothing, records nothing.
	dry, err := c.Apply(true)
	if err != nil {
		t.Fatal(err)
	}
	if readKey(t, c.Root, "net.core.somaxconn") != "4096" {
		t.Fatal("dry run wrote somaxconn")
	}
	if _, err := os.Stat(c.StatePath); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("dry run wrote the state file (%v)", err)
	}
	if a := actions(dry)["net.core.somaxconn"]; a != ActionWouldChange {
		t.Errorf("dry run action %q", a)
	}

	rep, err := c.Apply(false)
	if err != nil {
		t.Fatal(err)
	}
	wantAct := map[string]Action{
		"net.core.somaxconn":             ActionChanged,
		"net.ipv4.tcp_fin_timeout":       ActionChanged,
		"net.ipv4.tcp_tw_reuse":          ActionChanged,
		"net.ipv4.ip_local_port_range":   ActionChanged,
		"net.ipv4.tcp_rmem":              ActionSkipped,
		"net.netfilter.nf_conntrack_max": ActionSkipped,
		"net.core.netdev_max_backlog":    ActionSkipped,
		"fs.nr_open":                     ActionChanged,
		"fs.file-max":                    ActionUnchanged,
		"net.core.rmem_max":              ActionSkipped,
	}
	for k, a := range actions(rep) {
		if wantAct[k] != a {
			t.Errorf("%s: action %q, want %q", k, a, wantAct[k])
		}
	}
	after := map[string]string{
		"net.core.somaxconn":           "65535",
		"net.ipv4.tcp_fin_timeout":     "15",
		"net.ipv4.tcp_tw_reuse":        "1",
		"net.ipv4.ip_local_port_range": "1024 65535",
		"fs.nr_open":                   "2097152",
		"fs.file-max":                  "9223372036854775807",
		"net.core.rmem_max":            "212992",
		"net.ipv4.tcp_rmem":            "4096 131072 6291456",
	}
	for k, v := range after {
		if got := readKey(t, c.Root, k); got != v {
			t.Errorf("after apply %s = %q, want %q", k, got, v)
		}
	}
	st, err := ReadState(c.StatePath)
	if err != nil {
		t.Fatal(err)
	}
	if st.NetNS != "net:[1]" || st.Root != c.Root || len(st.Entries) != 5 {
		t.Fatalf("state %+v", st)
	}
	if e := entry(st, "net.ipv4.ip_local_port_range"); e.Original != "32768 60999" || e.Applied != "1024 65535" || !e.PerNetNS {
		t.Errorf("port range entry %+v", e)
	}

	// A second apply finds nothing low and keeps the originals.
	rep2, err := c.Apply(false)
	if err != nil {
		t.Fatal(err)
	}
	for k, a := range actions(rep2) {
		if a == ActionChanged {
			t.Errorf("second apply changed %s", k)
		}
	}
	st2, err := ReadState(c.StatePath)
	if err != nil {
		t.Fatal(err)
	}
	if e := entry(st2, "net.core.somaxconn"); e.Original != "4096" {
		t.Errorf("second apply lost the original: %+v", e)
	}

	// Someone changes fin_timeout after apply: revert leaves it alone.
	if err := os.WriteFile(Setting{Key: "net.ipv4.tcp_fin_timeout"}.path(c.Root), []byte("20\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	rdry, err := c.Revert(true)
	if err != nil {
		t.Fatal(err)
	}
	if a := actions(rdry)["net.core.somaxconn"]; a != ActionWouldChange || readKey(t, c.Root, "net.core.somaxconn") != "65535" {
		t.Errorf("revert dry run: action %q, somaxconn %s", a, readKey(t, c.Root, "net.core.somaxconn"))
	}
	rrep, err := c.Revert(false)
	if err != nil {
		t.Fatal(err)
	}
	ra := actions(rrep)
	if ra["net.core.somaxconn"] != ActionChanged || ra["net.ipv4.tcp_fin_timeout"] != ActionSkipped {
		t.Errorf("revert actions %v", ra)
	}
	for k, v := range map[string]string{
		"net.core.somaxconn":           "4096",
		"net.ipv4.tcp_tw_reuse":        "2",
		"net.ipv4.ip_local_port_range": "32768 60999",
		"fs.nr_open":                   "1048576",
		"net.ipv4.tcp_fin_timeout":     "20",
	} {
		if got := readKey(t, c.Root, k); got != v {
			t.Errorf("after revert %s = %q, want %q", k, got, v)
		}
	}
	// Only the entry left alone remains.
	st3, err := ReadState(c.StatePath)
	if err != nil {
		t.Fatal(err)
	}
	if len(st3.Entries) != 1 || st3.Entries[0].Key != "net.ipv4.tcp_fin_timeout" {
		t.Errorf("state after revert %+v", st3.Entries)
	}
	// Put it back to what apply wrote: the next revert restores it and
	// removes the state file.
	if err := os.WriteFile(Setting{Key: "net.ipv4.tcp_fin_timeout"}.path(c.Root), []byte("15\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Revert(false); err != nil {
		t.Fatal(err)
	}
	if got := readKey(t, c.Root, "net.ipv4.tcp_fin_timeout"); got != "60" {
		t.Errorf("fin_timeout %q after the second revert", got)
	}
	if _, err := os.Stat(c.StatePath); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("state file still there after a complete revert (%v)", err)
	}
	if _, err := c.Revert(false); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("revert without a state file: %v, want fs.ErrNotExist", err)
	}
}

func TestApplyWriteFailureIsReported(t *testing.T) {
	c := newTestChecker(t, hostLike())
	c.writeFile = func(p string, b []byte) error {
		switch {
		case strings.HasSuffix(p, "/fs/nr_open"):
			return unix.EPERM
		case strings.HasSuffix(p, "/net/ipv4/tcp_tw_reuse"):
			return unix.EINVAL
		}
		return writeSysctl(p, b)
	}
	rep, err := c.Apply(false)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Failed() {
		t.Error("Failed() = false")
	}
	for _, ch := range rep.Changes {
		switch ch.Key {
		case "fs.nr_open":
			if ch.Action != ActionFailed || !strings.Contains(ch.Detail, "cannot write") || ch.After != "1048576" {
				t.Errorf("nr_open change %+v", ch)
			}
		case "net.ipv4.tcp_tw_reuse":
			if ch.Action != ActionFailed || !strings.Contains(ch.Detail, "invalid argument") {
				t.Errorf("tw_reuse change %+v", ch)
			}
		case "net.core.somaxconn":
			if ch.Action != ActionChanged {
				t.Errorf("somaxconn change %+v", ch)
			}
		}
	}
}

func TestApplyStateUnwritableWritesNothing(t *testing.T) {
	c := newTestChecker(t, hostLike())
	// The state "directory" is a file: recording fails.
	blocker := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(blocker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	c.StatePath = filepath.Join(blocker, "state.json")
	if _, err := c.Apply(false); err == nil || !strings.Contains(err.Error(), "recording originals") {
		t.Fatalf("Apply error %v, want a recording failure", err)
	}
	if got := readKey(t, c.Root, "net.core.somaxconn"); got != "4096" {
		t.Errorf("somaxconn %q: apply wrote although it could not record the original", got)
	}
}

func TestRevertOtherNetNS(t *testing.T) {
	c := newTestChecker(t, hostLike())
	if _, err := c.Apply(false); err != nil {
		t.Fatal(err)
	}
	c.netnsID = func() string { return "net:[2]" }
	rep, err := c.Revert(false)
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range rep.Changes {
		if ch.Scope == "netns" && (ch.Action != ActionSkipped || !strings.Contains(ch.Detail, "net:[1]")) {
			t.Errorf("%s reverted from another namespace: %+v", ch.Key, ch)
		}
		if ch.Key == "fs.nr_open" && ch.Action != ActionChanged {
			t.Errorf("global fs.nr_open not reverted: %+v", ch)
		}
	}
	if got := readKey(t, c.Root, "net.core.somaxconn"); got != "65535" {
		t.Errorf("somaxconn %q", got)
	}
	// fs.nr_open is low again; apply from this namespace refuses to mix
	// its originals with those recorded in net:[1], and writes nothing.
	if _, err := c.Apply(false); err == nil || !strings.Contains(err.Error(), "net:[1]") {
		t.Fatalf("apply from another namespace: %v, want a refusal naming net:[1]", err)
	}
	if got := readKey(t, c.Root, "fs.nr_open"); got != "1048576" {
		t.Errorf("fs.nr_open %q after a refused apply", got)
	}
}

func TestResultsJSON(t *testing.T) {
	c := newTestChecker(t, hostLike())
	b, err := json.Marshal(c.Check())
	if err != nil {
		t.Fatal(err)
	}
	var back []map[string]any
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	for _, r := range back {
		if r["key"] != "net.ipv4.ip_local_port_range" {
			continue
		}
		want := map[string]any{"scope": "netns", "current": "32768 60999", "recommended": "1024 65535", "compare": "range", "verdict": "low", "target": "1024 65535", "why": "ports"}
		for k, v := range want {
			if r[k] != v {
				t.Errorf("json %s = %v, want %v", k, r[k], v)
			}
		}
		return
	}
	t.Fatal("port range missing from JSON")
}

func TestWriteResultsTable(t *testing.T) {
	c := newTestChecker(t, hostLike())
	var b bytes.Buffer
	if err := WriteResults(&b, c.Check(), "net:[1]"); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, s := range []string{"SETTING", "CURRENT", "RECOMMENDED", "VERDICT", "WHY", "net.core.somaxconn", "≥ 65535", "low → 65535", "missing", "net:[1]"} {
		if !strings.Contains(out, s) {
			t.Errorf("table lacks %q:\n%s", s, out)
		}
	}
	b.Reset()
	rep, _ := c.Apply(true)
	if err := WriteReport(&b, rep); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "would change") || !strings.Contains(b.String(), "dry run") {
		t.Errorf("report:\n%s", b.String())
	}
}

func TestSomaxconnFakeTree(t *testing.T) {
	c := &Checker{Root: fakeTree(t, map[string]string{"net.core.somaxconn": "65535"})}
	if n := c.Somaxconn(); n != 65535 {
		t.Errorf("Somaxconn = %d", n)
	}
	c = &Checker{Root: t.TempDir()}
	if n := c.Somaxconn(); n != DefaultSomaxconn {
		t.Errorf("Somaxconn without the file = %d, want %d", n, DefaultSomaxconn)
	}
}

func actions(r Report) map[string]Action {
	m := map[string]Action{}
	for _, c := range r.Changes {
		m[c.Key] = c.Action
	}
	return m
}

func entry(st *State, key string) StateEntry {
	for _, e := range st.Entries {
		if e.Key == key {
			return e
		}
	}
	return StateEntry{}
}
