package tune

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

func TestJudge(t *testing.T) {
	tests := []struct {
		name    string
		s       Setting
		current string
		ok      bool
		target  string
		wantErr bool
	}{
		{"at least below", Setting{Key: "k", Recommended: "65535", Compare: AtLeast}, "4096", false, "65535", false},
		{"at least equal", Setting{Key: "k", Recommended: "65535", Compare: AtLeast}, "65535", true, "", false},
		{"at least bigger is kept", Setting{Key: "k", Recommended: "65535", Compare: AtLeast}, "1000000", true, "", false},
		{"at least fieldwise", Setting{Key: "k", Recommended: "10 20", Compare: AtLeast}, "5 30", false, "10 30", false},
		{"at most above", Setting{Key: "k", Recommended: "15", Compare: AtMost}, "60", false, "15", false},
		{"at most below", Setting{Key: "k", Recommended: "15", Compare: AtMost}, "10", true, "", false},
		{"exact differs", Setting{Key: "k", Recommended: "1", Compare: Exact}, "2", false, "1", false},
		{"exact differs lower", Setting{Key: "k", Recommended: "1", Compare: Exact}, "0", false, "1", false},
		{"exact same", Setting{Key: "k", Recommended: "0", Compare: Exact}, "0", true, "", false},
		{"range narrower", Setting{Key: "k", Recommended: "1024 65535", Compare: Range}, "32768\t60999", false, "1024 65535", false},
		{"range contains", Setting{Key: "k", Recommended: "1024 65535", Compare: Range}, "1024 65535", true, "", false},
		{"range widened not narrowed", Setting{Key: "k", Recommended: "1024 65535", Compare: Range}, "2000 65535", false, "1024 65535", false},
		{"range keeps lower start", Setting{Key: "k", Recommended: "10000 65535", Compare: Range}, "1024 60999", false, "1024 65535", false},
		{"info always ok", Setting{Key: "k", Compare: Info}, "4096 131072 6291456", true, "", false},
		{"not a number", Setting{Key: "k", Recommended: "1", Compare: Exact}, "yes", false, "", true},
		{"field count", Setting{Key: "k", Recommended: "1024 65535", Compare: Range}, "1024", false, "", true},
		{"empty", Setting{Key: "k", Recommended: "1", Compare: AtLeast}, "", false, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ok, target, err := tt.s.judge(tt.current)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if ok != tt.ok || target != tt.target {
				t.Errorf("judge(%q) = %v, %q; want %v, %q", tt.current, ok, target, tt.ok, tt.target)
			}
		})
	}
}

// TestSettingsTable keeps the table well-formed: what check, apply and the
// drop-in rely on.
func TestSettingsTable(t *testing.T) {
	seen := map[string]bool{}
	for _, s := range Settings {
		if seen[s.Key] {
			t.Errorf("%s listed twice", s.Key)
		}
		seen[s.Key] = true
		if s.Why == "" || strings.ContainsAny(s.Why, "\n\r") {
			t.Errorf("%s: Why must be one non-empty line", s.Key)
		}
		if s.Compare == Info {
			if s.Recommended != "" {
				t.Errorf("%s: Info settings have no recommended value", s.Key)
			}
			continue
		}
		if _, err := parseFields(s.Recommended); err != nil {
			t.Errorf("%s: recommended %q: %v", s.Key, s.Recommended, err)
		}
		if ok, _, err := s.judge(s.Recommended); err != nil || !ok {
			t.Errorf("%s: the recommendation does not satisfy itself (%v, %v)", s.Key, ok, err)
		}
		if s.PerNetNS && !strings.HasPrefix(s.Key, "net.") {
			t.Errorf("%s: only net.* settings can be per network namespace", s.Key)
		}
	}
	for _, k := range []string{
		"net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog", "net.ipv4.tcp_tw_reuse", "net.ipv4.tcp_fin_timeout",
		"net.ipv4.ip_local_port_range", "net.core.netdev_max_backlog", "fs.file-max", "fs.nr_open",
		"net.core.rmem_max", "net.core.wmem_max", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.ipv4.tcp_mem",
		"net.netfilter.nf_conntrack_max",
	} {
		if !seen[k] {
			t.Errorf("%s is missing from Settings (issue #6 asks for it)", k)
		}
	}
	// fs.nr_open must hold TargetConns connections.
	nr, _ := Lookup("fs.nr_open")
	if n, _ := parseFields(nr.Recommended); ConnsForNoFile(uint64(n[0])) < TargetConns {
		t.Errorf("fs.nr_open %s holds %d connections, fewer than TargetConns %d", nr.Recommended, ConnsForNoFile(uint64(n[0])), TargetConns)
	}
}

// TestDropInMatchesTable: sysctl/99-wsplice.conf is rendered from Settings.
// Regenerate with `go generate ./pkg/tune`.
func TestDropInMatchesTable(t *testing.T) {
	const path = "../../sysctl/99-wsplice.conf"
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := DropIn()
	if !bytes.Equal(got, want) {
		gl, wl := strings.Split(string(got), "\n"), strings.Split(string(want), "\n")
		for i := 0; i < max(len(gl), len(wl)); i++ {
			var g, w string
			if i < len(gl) {
				g = gl[i]
			}
			if i < len(wl) {
				w = wl[i]
			}
			if g != w {
				t.Fatalf("%s differs from the table at line %d:\n  file:  %q\n  table: %q\nrun `go generate ./pkg/tune`", path, i+1, g, w)
			}
		}
	}
	// Every non-info setting appears as a sysctl.d line; optional ones
	// with the "-" prefix that makes sysctl ignore a missing key.
	for _, s := range Settings {
		line := s.Key + " = " + s.Recommended + "\n"
		switch {
		case s.Compare == Info:
			if bytes.Contains(want, []byte("\n"+line)) {
				t.Errorf("info setting %s must not be set by the drop-in", s.Key)
			}
		case s.Optional:
			if !bytes.Contains(want, []byte("\n-"+line)) {
				t.Errorf("drop-in lacks %q", "-"+line)
			}
		default:
			if !bytes.Contains(want, []byte("\n"+line)) {
				t.Errorf("drop-in lacks %q", line)
			}
		}
	}
}

// TestReadmeCoversTable: sysctl/README.md explains every setting of the
// table with its value.
func TestReadmeCoversTable(t *testing.T) {
	b, err := os.ReadFile("../../sysctl/README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range Settings {
		row := "| `" + s.Key + "` | "
		if s.Compare != Info {
			row += "`" + s.Recommended + "` | " + s.Compare.String() + " | "
		}
		if !bytes.Contains(b, []byte(row)) {
			t.Errorf("sysctl/README.md has no row starting %q", row)
		}
	}
}
