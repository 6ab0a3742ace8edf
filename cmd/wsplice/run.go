package main

import (
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"
	"github.com/wsplice/wsplice/pkg/agent"
	"github.com/wsplice/wsplice/pkg/config"
)

func newRunCmd() *cobra.Command {
	var (
		file     string
		q        config.Quick
		level    string
		format   string
		access   string
		tune     string
		takeOver bool
	)
	cmd := &cobra.Command{
		Use:   "run [-c FILE | --listen ADDR --backend ADDR...]",
		Short: "Run the agent",
		Long: `Run the agent from a configuration file, or from flags for quick use:

  wsplice run -c /etc/wsplice/wsplice.yaml
  wsplice run --listen :8080 --backend 10.0.0.1:8080 --backend 10.0.0.2:8080=3

A backend flag takes an optional =WEIGHT or =backup.

With --take-over, an agent already running on this host and listening on
admin.takeover_socket hands this one its listening sockets and every
established connection (both data planes; the kernel keeps forwarding), then
waits, idle, to be stopped: the way the next pod of a DaemonSet update
replaces the current one without dropping a connection. When no agent
answers there, this one starts afresh. On one host without containers,
'wsplice upgrade' does the same job.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var cfg *config.Config
			var err error
			switch {
			case file != "" && (len(q.Listen) > 0 || len(q.Backends) > 0):
				return withCode(exitUsage, fmt.Errorf("use either -c FILE or --listen/--backend, not both"))
			case file != "":
				cfg, err = config.Load(file)
			case len(q.Listen) > 0 && len(q.Backends) > 0:
				cfg, err = config.FromQuick(q)
			default:
				return withCode(exitUsage, fmt.Errorf("nothing to run: give -c FILE, or --listen ADDR and at least one --backend ADDR"))
			}
			if err != nil {
				return withCode(exitConfig, err)
			}
			// Flags given explicitly override the file.
			fl := cmd.Flags()
			if fl.Changed("log-level") {
				cfg.Log.Level = level
			}
			if fl.Changed("log-format") {
				cfg.Log.Format = format
			}
			if fl.Changed("access-log") {
				cfg.Log.Access = access
			}
			if fl.Changed("tune") {
				cfg.Tune.Mode = tune
			}
			if file != "" && fl.Changed("dataplane") {
				cfg.Dataplane = q.Dataplane
				for i := range cfg.Listeners {
					cfg.Listeners[i].Dataplane = q.Dataplane
				}
			}
			if err := cfg.Validate(); err != nil {
				return withCode(exitConfig, err)
			}
			if takeOver && cfg.Admin.TakeoverSocket == "" {
				return withCode(exitConfig, fmt.Errorf("--take-over: set admin.takeover_socket in the configuration (the socket a running agent listens on, e.g. /run/wsplice-takeover/takeover.sock)"))
			}
			log := newLogger(cfg.Log)
			return withCode(exitFailure, agent.Run(cmd.Context(), agent.Options{Config: cfg, ConfigPath: file, Logger: log, TakeOver: takeOver}))
		},
	}
	f := cmd.Flags()
	f.StringVarP(&file, "config", "c", "", "configuration file (YAML)")
	f.StringSliceVar(&q.Listen, "listen", nil, "address to listen on (repeatable), e.g. :8080")
	f.StringArrayVar(&q.Backends, "backend", nil, "backend host:port[=WEIGHT|=backup] (repeatable)")
	f.StringVar(&q.Mode, "mode", "websocket", "listener mode: websocket, tcp or tls_passthrough")
	f.StringVar(&q.TLSCert, "tls-cert", "", "terminate TLS with this PEM certificate chain (with --tls-key)")
	f.StringVar(&q.TLSKey, "tls-key", "", "PEM private key of --tls-cert")
	f.StringVar(&q.Dataplane, "dataplane", "auto", "data plane: auto, sockmap or splice")
	f.StringVar(&q.Balance, "balance", "round_robin", "algorithm: round_robin, least_conn, maglev, random_two, first")
	f.StringVar(&q.HashKey, "hash-key", "client_ip", "maglev key: client_ip[/N], header:NAME, cookie:NAME, query:NAME, path, uri")
	f.StringVar(&level, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&format, "log-format", "text", "log format: text or json")
	f.StringVar(&access, "access-log", "", "access log: stdout, stderr or a file path (empty: off)")
	f.StringVar(&tune, "tune", "check", "host tuning at start: off, check (warn) or apply")
	f.BoolVar(&takeOver, "take-over", false, "take listeners and connections over from the agent on admin.takeover_socket, if one runs")
	return cmd
}

func newLogger(c config.Log) *slog.Logger {
	var lv slog.Level
	_ = lv.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: lv}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}
