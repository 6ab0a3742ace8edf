package main

import (
	"log/slog"
	"os"

	"github.com/spf13/cobra"
	"github.com/wsplice/wsplice/pkg/demo"
)

func init() {
	extraCommands = append(extraCommands, func() *cobra.Command {
		o := demo.Options{}
		verbose := false
		cmd := &cobra.Command{
			Use:   "demo",
			Short: "Run echo backends, the agent and WebSocket clients, and show where connections went",
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				o.Out = cmd.OutOrStdout()
				lv := slog.LevelWarn
				if verbose {
					lv = slog.LevelInfo
				}
				o.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lv}))
				return withCode(exitFailure, demo.Run(cmd.Context(), o))
			},
		}
		f := cmd.Flags()
		f.IntVar(&o.Backends, "backends", 3, "echo backends to start")
		f.IntVar(&o.Clients, "clients", 15, "WebSocket clients (each connects twice)")
		f.IntVar(&o.TLSClients, "tls-clients", 3, "how many of them use wss:// through the TLS listener")
		f.IntVar(&o.Messages, "messages", 34, "messages each client echoes per connection (1 B to 64 KiB)")
		f.StringVar(&o.Dataplane, "dataplane", "auto", "data plane: auto, sockmap or splice")
		f.BoolVarP(&verbose, "verbose", "v", false, "show the agent's log")
		return cmd
	})
}
