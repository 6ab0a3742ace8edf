package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"

	"github.com/spf13/cobra"
	"github.com/wsplice/wsplice/pkg/tune"
)

// newTuneCmd is `wsplice tune`: check, apply and revert the host's kernel
// settings, and print the sysctl.d drop-in. It works on the host directly,
// not through the agent.
func newTuneCmd() *cobra.Command {
	var root string
	cmd := &cobra.Command{
		Use:   "tune",
		Short: "Check, apply or revert the kernel settings for many concurrent sockets",
		Long: `Compare the running kernel's sysctls with wsplice's recommendations, apply
the ones that fall short (recording the originals), revert them, or print the
sysctl.d drop-in made from the same table.

Per-network-namespace (net.*) settings are read and written in the network
namespace this command runs in; fs.* and a few net.core ones are global.`,
		Args: cobra.NoArgs,
	}
	// Tests point the commands at a fake tree so they never write host sysctls.
	cmd.PersistentFlags().StringVar(&root, "sysctl-root", tune.DefaultRoot, "sysctl tree to read and write")
	_ = cmd.PersistentFlags().MarkHidden("sysctl-root")
	checker := func(state string) *tune.Checker { return &tune.Checker{Root: root, StatePath: state} }

	check := &cobra.Command{
		Use:   "check",
		Short: "Print each setting: current, recommended, verdict and why",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			rs := checker("").Check()
			ns := tune.NetNSID()
			if out == "json" {
				return writeJSON(cmd.OutOrStdout(), struct {
					NetNS   string        `json:"netns,omitempty"`
					Results []tune.Result `json:"results"`
				}{ns, rs})
			}
			return tune.WriteResults(cmd.OutOrStdout(), rs, ns)
		},
	}

	var dryRun bool
	var state string
	apply := &cobra.Command{
		Use:   "apply [--dry-run] [--state FILE]",
		Short: "Write the settings that fall short, recording the originals for revert",
		Long: `Write every setting whose verdict is "low", after recording the value it
replaces in the state file (revert restores from it). Values bigger than the
recommendation are never lowered; missing and read-only settings are reported
and skipped.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			rep, err := checker(state).Apply(dryRun)
			if err != nil {
				return withCode(exitFailure, err)
			}
			if err := writeReport(cmd.OutOrStdout(), out, rep); err != nil {
				return err
			}
			if rep.Failed() {
				return withCode(exitFailure, errors.New("some settings could not be applied (see ACTION)"))
			}
			return nil
		},
	}
	apply.Flags().BoolVar(&dryRun, "dry-run", false, "show what would change; write nothing")
	apply.Flags().StringVar(&state, "state", tune.DefaultStatePath, "file to record the original values in")

	var revertDry bool
	var revertState string
	revert := &cobra.Command{
		Use:   "revert [--state FILE]",
		Short: "Restore the values apply replaced",
		Long: `Restore the originals recorded by apply. A setting someone changed since
apply is left alone and reported; per-namespace settings are restored only
in the network namespace they were applied in.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			rep, err := checker(revertState).Revert(revertDry)
			if errors.Is(err, fs.ErrNotExist) {
				return withCode(exitFailure, fmt.Errorf("nothing to revert: no state file %s (apply writes it; give --state if it used another)", revertState))
			}
			if err != nil {
				return withCode(exitFailure, err)
			}
			if err := writeReport(cmd.OutOrStdout(), out, rep); err != nil {
				return err
			}
			if rep.Failed() {
				return withCode(exitFailure, errors.New("some settings could not be restored (see ACTION)"))
			}
			return nil
		},
	}
	revert.Flags().BoolVar(&revertDry, "dry-run", false, "show what would be restored; write nothing")
	revert.Flags().StringVar(&revertState, "state", tune.DefaultStatePath, "file apply recorded the original values in")

	dropin := &cobra.Command{
		Use:   "dropin",
		Short: "Print the sysctl.d drop-in (for /etc/sysctl.d/99-wsplice.conf)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := cmd.OutOrStdout().Write(tune.DropIn())
			return err
		},
	}

	cmd.AddCommand(check, apply, revert, dropin)
	return cmd
}

// outputFormat reads the root's -o/--output flag: table or json.
func outputFormat(cmd *cobra.Command) (string, error) {
	out, err := cmd.Flags().GetString("output")
	if err != nil {
		return "table", nil
	}
	switch out {
	case "", "table":
		return "table", nil
	case "json":
		return "json", nil
	}
	return "", withCode(exitUsage, fmt.Errorf("-o %q: use table or json", out))
}

func writeReport(w io.Writer, out string, rep tune.Report) error {
	if out == "json" {
		return writeJSON(w, rep)
	}
	return tune.WriteReport(w, rep)
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
