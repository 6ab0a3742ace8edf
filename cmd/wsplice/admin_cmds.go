package main

import (
	"errors"

	"github.com/spf13/cobra"
	"github.com/wsplice/wsplice/pkg/admin"
)

// The operator commands that talk to a running agent over its admin socket
// (status, conns, backends, drain, undrain, weight, kill) live in package
// admin, next to the API they use; here they only get exit codes.
func init() {
	for _, newCmd := range admin.Commands() {
		extraCommands = append(extraCommands, func() *cobra.Command { return withAdminExit(newCmd()) })
	}
}

// withAdminExit maps the admin errors to exit codes: no agent to talk to,
// bad arguments, or a failure the agent reported.
func withAdminExit(cmd *cobra.Command) *cobra.Command {
	runE := cmd.RunE
	cmd.RunE = func(c *cobra.Command, args []string) error {
		err := runE(c, args)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, admin.ErrNoAgent):
			return withCode(exitNoAgent, err)
		case errors.Is(err, admin.ErrInvalid):
			return withCode(exitUsage, err)
		}
		return withCode(exitFailure, err)
	}
	return cmd
}
