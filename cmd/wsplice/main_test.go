package main

import (
	"os"
	"path/filepath"
	"testing"
)

// TestExitCodes checks that scripts can tell failures apart.
func TestExitCodes(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(good, []byte("listeners: [{address: \":8080\"}]\npools: [{name: p, backends: [{address: \"10.0.0.1:80\"}]}]\n"), 0o600)
	os.WriteFile(bad, []byte("listeners: [{address: \":8080\", colour: blue}]\n"), 0o600)
	cases := []struct {
		args []string
		want int
	}{
		{[]string{"version"}, exitOK},
		{[]string{"config", "check", "-c", good}, exitOK},
		{[]string{"config", "check", "-c", bad}, exitConfig},
		{[]string{"config", "check"}, exitUsage},
		{[]string{"run"}, exitUsage},
		{[]string{"run", "--listen", ":1", "--backend", "nohost"}, exitConfig},
		{[]string{"run", "-c", good, "--listen", ":1"}, exitUsage},
		{[]string{"no-such-command"}, exitUsage},
		{[]string{"status", "--admin-socket", filepath.Join(dir, "none.sock")}, exitNoAgent},
		{[]string{"drain", "--all", "--admin-socket", filepath.Join(dir, "none.sock")}, exitNoAgent},
		{[]string{"drain", "--all", "--if-running", "--admin-socket", filepath.Join(dir, "none.sock")}, exitOK},
		{[]string{"run", "--take-over", "--listen", ":1", "--backend", "127.0.0.1:1"}, exitConfig}, // no admin.takeover_socket
		{[]string{"completion", "bash"}, exitOK},
	}
	for _, tc := range cases {
		devnull, _ := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		stdout, stderr := os.Stdout, os.Stderr
		os.Stdout, os.Stderr = devnull, devnull
		got := execute(tc.args)
		os.Stdout, os.Stderr = stdout, stderr
		devnull.Close()
		if got != tc.want {
			t.Errorf("wsplice %v exited %d, want %d", tc.args, got, tc.want)
		}
	}
}
