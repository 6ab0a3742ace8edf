package admin

import (
	"bytes"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// runCLI runs one of Commands under a root with the two persistent flags
// main gives them, as `wsplice ARGS… --admin-socket socket`, and returns
// what it printed and its error (main turns ErrNoAgent into exit code 4
// and nil into 0).
func runCLI(t *testing.T, socket string, args ...string) (string, error) {
	t.Helper()
	root := &cobra.Command{Use: "wsplice", SilenceUsage: true, SilenceErrors: true}
	root.PersistentFlags().StringP("output", "o", "table", "")
	root.PersistentFlags().String("admin-socket", socket, "")
	for _, newCmd := range Commands() {
		root.AddCommand(newCmd())
	}
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(io.Discard)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

// staleSocket leaves a socket file at path that nobody accepts on, as an
// agent that closed its admin socket without removing it (or died) does.
func staleSocket(t *testing.T, path string) {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
}

// TestDrainIfRunning: `drain --if-running` (the DaemonSet's preStop hook)
// succeeds when no agent listens on the admin socket, as after a take-over
// by the next pod, and otherwise behaves as drain without it.
func TestDrainIfRunning(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")
	stale := filepath.Join(dir, "stale.sock")
	staleSocket(t, stale)

	// Without the flag no agent is an error (exit code 4): scripts that
	// drain on purpose must notice.
	for _, sock := range []string{missing, stale} {
		if _, err := runCLI(t, sock, "drain", "--all"); !errors.Is(err, ErrNoAgent) {
			t.Errorf("drain --all, nothing on %s: %v, want ErrNoAgent", filepath.Base(sock), err)
		}
	}
	// With it: a line that says so, and no error (exit code 0).
	for _, args := range [][]string{
		{"drain", "--all", "--if-running"},
		{"drain", "10.0.0.1:80", "--if-running"},
	} {
		for _, sock := range []string{missing, stale} {
			out, err := runCLI(t, sock, args...)
			if err != nil {
				t.Errorf("%v, nothing on %s: %v, want no error", args, filepath.Base(sock), err)
			}
			if !strings.Contains(out, "no agent listens on "+sock) {
				t.Errorf("%v, nothing on %s: printed %q", args, filepath.Base(sock), out)
			}
		}
	}

	// A running agent is drained as usual, and its errors still fail.
	h := newFake()
	s, _ := serve(t, h)
	sock := s.Path()
	out, err := runCLI(t, sock, "drain", "--all", "--if-running")
	if err != nil || !h.lameDuck || !strings.Contains(out, "agent draining") {
		t.Fatalf("drain --all --if-running with an agent: %v, lame duck %v, printed %q", err, h.lameDuck, out)
	}
	if _, err := runCLI(t, sock, "drain", "10.9.9.9:80", "--if-running"); !errors.Is(err, ErrNotFound) {
		t.Errorf("drain of an unknown backend with --if-running: %v, want ErrNotFound", err)
	}

	// undrain has no such flag: ending a drain that cannot happen is a
	// mistake worth an error.
	if _, err := runCLI(t, sock, "undrain", "--all", "--if-running"); err == nil {
		t.Error("undrain accepted --if-running")
	}
}

// TestNoAgentListens: only a missing socket or one nobody accepts on
// count as no agent; a listening socket does not.
func TestNoAgentListens(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	staleSocket(t, stale)
	if !noAgentListens(filepath.Join(dir, "missing.sock")) || !noAgentListens(stale) {
		t.Error("a missing or stale socket counts as an agent")
	}
	live := filepath.Join(dir, "live.sock")
	ln, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if noAgentListens(live) {
		t.Error("a listening socket counts as no agent")
	}
}
