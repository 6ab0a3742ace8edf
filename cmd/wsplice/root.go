package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/spf13/cobra"
)

// Exit codes, so scripts and systemd can tell failures apart.
const (
	exitOK      = 0
	exitFailure = 1 // the agent or a command failed at run time
	exitUsage   = 2 // bad flags or arguments
	exitConfig  = 3 // the configuration is invalid
	exitNoAgent = 4 // the CLI could not reach a running agent
)

// exitError carries an exit code through cobra.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func withCode(code int, err error) error {
	if err == nil {
		return nil
	}
	return &exitError{code: code, err: err}
}

// version is set by the linker (-X main.version=…); otherwise the module
// version from the build info is used.
var version = ""

func buildVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		rev := ""
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				rev = s.Value[:12]
			}
		}
		if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			return bi.Main.Version
		}
		if rev != "" {
			return "devel-" + rev
		}
	}
	return "devel"
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "wsplice",
		Short: "A WebSocket balancer that forwards established connections in the kernel",
		Long: `wsplice reads the HTTP/1.1 Upgrade handshake of each connection, picks a
backend by consistent hash, and hands the stream to the kernel (BPF sockmap),
with splice(2) as the fallback.

Agent:     wsplice run -c wsplice.yaml
Quick use: wsplice run --listen :8080 --backend 10.0.0.1:8080 --backend 10.0.0.2:8080`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringP("output", "o", "table", "output format: table or json")
	root.PersistentFlags().String("admin-socket", "/run/wsplice/admin.sock", "the running agent's admin socket")
	root.AddCommand(newRunCmd(), newVersionCmd(), newConfigCmd(), newTuneCmd())
	for _, c := range extraCommands {
		root.AddCommand(c())
	}
	return root
}

// extraCommands are registered by other files of this package (one noun or
// verb per file).
var extraCommands []func() *cobra.Command

func execute(args []string) int {
	root := newRootCmd()
	root.SetArgs(args)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := root.ExecuteContext(ctx)
	if err == nil {
		return exitOK
	}
	fmt.Fprintln(os.Stderr, "wsplice:", err)
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	// cobra's own errors are usage errors (unknown flag, bad arguments).
	return exitUsage
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintln(cmd.OutOrStdout(), "wsplice", buildVersion())
			return nil
		},
	}
}
