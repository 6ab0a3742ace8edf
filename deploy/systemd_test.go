package deploy

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

const (
	unitFile      = "systemd/wsplice.service"
	unitConfig    = "systemd/wsplice.yaml"
	agentBinary   = "/usr/local/bin/wsplice"
	unitConfigArg = "/etc/wsplice/wsplice.yaml"
	// analyzePackage is the Debian package that ships systemd-analyze.
	analyzePackage = "systemd"
)

// unitCaps are the capabilities of the service: exactly these.
var unitCaps = []string{"CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_PERFMON", "CAP_SYS_RESOURCE"}

// unit is a parsed unit file: section → key → values in order (a key may
// repeat, as SystemCallFilter= does).
type unit map[string]map[string][]string

func parseUnit(t *testing.T, file string) unit {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && line[len(line)-1] == ']':
			section = line[1 : len(line)-1]
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: not KEY=VALUE inside a section: %q", file, n, line)
			}
			if strings.HasSuffix(v, "\\") {
				t.Fatalf("%s:%d: continuation lines are not used in this unit; keep it that way so it stays greppable", file, n)
			}
			u[section][k] = append(u[section][k], strings.TrimSpace(v))
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

// get returns the last value of key, as systemd applies it.
func (u unit) get(section, key string) string {
	vs := u[section][key]
	if len(vs) == 0 {
		return ""
	}
	return vs[len(vs)-1]
}

// words returns every value of key split on spaces.
func (u unit) words(section, key string) []string {
	var out []string
	for _, v := range u[section][key] {
		out = append(out, strings.Fields(v)...)
	}
	return out
}

// parseTimespan reads systemd time spans as this unit writes them: "45s",
// "2min", "1min 30s", or plain seconds.
func parseTimespan(s string) (time.Duration, error) {
	if n, err := strconv.Atoi(s); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	units := map[string]time.Duration{"ms": time.Millisecond, "s": time.Second, "sec": time.Second,
		"m": time.Minute, "min": time.Minute, "h": time.Hour, "hr": time.Hour}
	re := regexp.MustCompile(`^\s*(\d+)\s*([a-z]+)`)
	var total time.Duration
	for rest := s; strings.TrimSpace(rest) != ""; {
		m := re.FindStringSubmatch(rest)
		if m == nil {
			return 0, fmt.Errorf("time span %q", s)
		}
		u, ok := units[m[2]]
		if !ok {
			return 0, fmt.Errorf("time span %q: unit %q", s, m[2])
		}
		n, _ := strconv.Atoi(m[1])
		total += time.Duration(n) * u
		rest = rest[len(m[0]):]
	}
	return total, nil
}

func TestUnitNotifyReloadUpgrade(t *testing.T) {
	u := parseUnit(t, unitFile)
	if got := u.get("Service", "Type"); got != "notify" {
		t.Errorf("Type=%s, want notify: the agent signals readiness with sd_notify", got)
	}
	// The upgraded process, a child of the main PID, announces itself.
	if got := u.get("Service", "NotifyAccess"); got != "all" {
		t.Errorf("NotifyAccess=%s, want all: the new binary of a zero-downtime upgrade sends MAINPID= before it is the main PID", got)
	}
	if got := u.get("Service", "ExecStart"); got != agentBinary+" run -c "+unitConfigArg {
		t.Errorf("ExecStart=%s", got)
	}
	if got := u.get("Service", "ExecReload"); got != agentBinary+" reload" {
		t.Errorf("ExecReload=%s, want %s reload (synchronous; reports a refused config)", got, agentBinary)
	}
	if got := u.get("Service", "KillSignal"); got != "" && got != "SIGTERM" {
		t.Errorf("KillSignal=%s: the agent drains on SIGTERM", got)
	}
	if got := u.get("Service", "KillMode"); got != "" && got != "control-group" && got != "mixed" {
		t.Errorf("KillMode=%s: stop must reach every agent process, including one mid-upgrade", got)
	}
	if got := u.get("Service", "Restart"); got != "on-failure" && got != "always" {
		t.Errorf("Restart=%s", got)
	}
	prevent := u.words("Service", "RestartPreventExitStatus")
	if !slices.Contains(prevent, "3") {
		t.Errorf("RestartPreventExitStatus=%v: exit 3 (invalid config) cannot be fixed by restarting", prevent)
	}
}

func TestUnitDrainFitsStopTimeout(t *testing.T) {
	u := parseUnit(t, unitFile)
	data, err := os.ReadFile(unitConfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg := parseAgentConfig(t, unitConfig, data)
	stop, err := parseTimespan(u.get("Service", "TimeoutStopSec"))
	if err != nil {
		t.Fatalf("TimeoutStopSec: %v", err)
	}
	if drain := cfg.drainTimeout(t); stop < drain+drainMargin {
		t.Errorf("TimeoutStopSec=%s is not above drain_timeout %s + %s: systemd would SIGKILL mid-drain", stop, drain, drainMargin)
	}
	// The admin socket (ExecReload's way in) sits in the RuntimeDirectory.
	rd := u.get("Service", "RuntimeDirectory")
	if path.Dir(cfg.adminSocket()) != "/run/"+rd {
		t.Errorf("admin.socket %s is not in RuntimeDirectory=%s (/run/%s)", cfg.adminSocket(), rd, rd)
	}
}

func TestUnitCapabilitiesAndLimits(t *testing.T) {
	u := parseUnit(t, unitFile)
	for _, key := range []string{"AmbientCapabilities", "CapabilityBoundingSet"} {
		got := slices.Sorted(slices.Values(u.words("Service", key)))
		if !slices.Equal(got, unitCaps) {
			t.Errorf("%s=%v, want exactly %v", key, got, unitCaps)
		}
	}
	if u.get("Service", "NoNewPrivileges") != "yes" {
		t.Error("NoNewPrivileges is not yes")
	}
	nofile := u.get("Service", "LimitNOFILE")
	soft, _, _ := strings.Cut(nofile, ":")
	if n, err := strconv.Atoi(soft); err != nil || n < 1<<16 {
		t.Errorf("LimitNOFILE=%s: want a number of at least 65536 (two descriptors per connection)", nofile)
	}
}

func TestUnitSandboxAllowsBPF(t *testing.T) {
	u := parseUnit(t, unitFile)
	for key, want := range map[string]string{
		"ProtectSystem":         "strict",
		"ProtectKernelTunables": "yes",
		"ProtectKernelModules":  "yes",
		"ProtectControlGroups":  "yes",
		"ProtectHome":           "yes",
		"PrivateTmp":            "yes",
		"PrivateDevices":        "yes",
		"RestrictNamespaces":    "yes",
		"LockPersonality":       "yes",
	} {
		if got := u.get("Service", key); got != want {
			t.Errorf("%s=%q, want %q", key, got, want)
		}
	}
	// ProtectKernelTunables= makes /sys read-only, bpffs included, and so
	// it stays: the agent pins no BPF objects (its maps travel to the next
	// agent in an upgrade as descriptors), so nothing below /sys is written.
	for _, p := range u.words("Service", "ReadWritePaths") {
		if p = strings.TrimLeft(p, "-+"); p == "/sys" || strings.HasPrefix(p, "/sys/") {
			t.Errorf("ReadWritePaths= %s: the agent writes nothing below /sys; keep it read-only", p)
		}
	}
	// bpf(2) is in @privileged, not @system-service.
	allow := u.words("Service", "SystemCallFilter")
	if !slices.Contains(allow, "bpf") {
		t.Errorf("SystemCallFilter=%v does not allow bpf", allow)
	}
	for _, v := range u[("Service")]["SystemCallFilter"] {
		if strings.HasPrefix(v, "~") && (strings.Contains(v, "bpf") || strings.Contains(v, "@privileged")) {
			t.Errorf("SystemCallFilter=%s denies bpf", v)
		}
	}
	if fams := u.words("Service", "RestrictAddressFamilies"); !slices.Contains(fams, "AF_UNIX") || !slices.Contains(fams, "AF_INET") || !slices.Contains(fams, "AF_INET6") {
		t.Errorf("RestrictAddressFamilies=%v: the agent needs AF_UNIX (admin, sd_notify), AF_INET and AF_INET6", fams)
	}
	if u.get("Service", "PrivateNetwork") == "yes" || u.get("Service", "MemoryDenyWriteExecute") == "no" {
		t.Error("PrivateNetwork=yes would hide the host's network; MemoryDenyWriteExecute should stay on")
	}
	// Requiring the BPF file system's mount would keep the service from
	// starting where it is not mounted, for nothing the agent uses.
	if after := u.words("Unit", "RequiresMountsFor"); slices.ContainsFunc(after, func(p string) bool { return strings.HasPrefix(p, "/sys/fs/bpf") }) {
		t.Errorf("RequiresMountsFor=%v: the agent no longer uses the BPF file system", after)
	}
}

// analyze returns systemd-analyze, or skips the test with the package to
// install. It skips in CI too, by design: the tool is an optional install
// (apt-get install -y systemd), and the other unit tests still run.
func analyze(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skipf("systemd-analyze not found: install the %q package (apt-get install -y %s) to verify the unit", analyzePackage, analyzePackage)
	}
	return p
}

// stagedUnit copies the unit into a temporary directory with the agent's
// path replaced by an executable stub, because verify checks that every
// Exec*= command exists and the agent is not installed on a test machine.
// Nothing else in the unit changes.
func stagedUnit(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	stub := filepath.Join(dir, "wsplice")
	if err := os.WriteFile(stub, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(data, []byte(agentBinary)) {
		t.Fatalf("%s does not run %s", unitFile, agentBinary)
	}
	staged := filepath.Join(dir, "wsplice.service")
	if err := os.WriteFile(staged, bytes.ReplaceAll(data, []byte(agentBinary), []byte(stub)), 0o644); err != nil {
		t.Fatal(err)
	}
	return staged
}

func TestUnitSystemdAnalyzeVerify(t *testing.T) {
	bin := analyze(t)
	staged := stagedUnit(t)
	// --man=no: Documentation= is a URL, and man pages may be absent.
	out, err := exec.Command(bin, "verify", "--man=no", staged).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unitFile, err, out)
	}
}

// TestUnitSecurityExposure keeps the sandbox from eroding: systemd's own
// score (0 best, 10 worst) must stay at "OK" or better.
func TestUnitSecurityExposure(t *testing.T) {
	bin := analyze(t)
	help, _ := exec.Command(bin, "--help").CombinedOutput()
	if !bytes.Contains(help, []byte("--offline")) || !bytes.Contains(help, []byte("--threshold")) {
		t.Skip("this systemd-analyze has no offline security review (systemd < 250)")
	}
	staged := stagedUnit(t)
	// --threshold counts tenths: 30 is an exposure of 3.0.
	out, err := exec.Command(bin, "security", "--offline=yes", "--threshold=30", "--no-pager", staged).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: exposure above 3.0 or error: %v\n%s", err, out)
	}
	if i := bytes.LastIndex(out, []byte("Overall exposure level")); i >= 0 {
		t.Logf("%s", bytes.TrimSpace(out[i:]))
	}
}
