package main

import (
	"fmt"

	"github.com/spf13/cobra"
	"github.com/wsplice/wsplice/pkg/config"
)

func newConfigCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "config", Short: "Work with configuration files"}
	var file string
	check := &cobra.Command{
		Use:   "check -c FILE",
		Short: "Validate a configuration file without starting anything",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if file == "" {
				return withCode(exitUsage, fmt.Errorf("config check: -c FILE is required"))
			}
			cfg, err := config.Load(file)
			if err != nil {
				return withCode(exitConfig, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: ok (%d listeners, %d pools)\n", file, len(cfg.Listeners), len(cfg.Pools))
			return nil
		},
	}
	check.Flags().StringVarP(&file, "config", "c", "", "configuration file (YAML)")
	cmd.AddCommand(check)
	return cmd
}
