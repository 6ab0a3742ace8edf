package admin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
)

// Commands returns the constructors of the operator commands that talk to
// a running agent: status, conns, backends, drain, undrain, weight, kill.
// They read two persistent flags of the root command: -o/--output (table
// or json) and --admin-socket. Their errors wrap ErrNoAgent when the agent
// cannot be reached and ErrInvalid for bad arguments, so main can choose an
// exit code.
func Commands() []func() *cobra.Command {
	return []func() *cobra.Command{statusCmd, connsCmd, backendsCmd, drainCmd(true), drainCmd(false), weightCmd, killCmd, reloadCmd, upgradeCmd}
}

// cliEnv is what every command reads from the root's flags.
type cliEnv struct {
	out    io.Writer
	json   bool
	client *Client
}

func env(cmd *cobra.Command) (*cliEnv, error) {
	format, socket := "table", ""
	if f := cmd.Flag("output"); f != nil {
		format = f.Value.String()
	}
	if f := cmd.Flag("admin-socket"); f != nil {
		socket = f.Value.String()
	}
	if format != "table" && format != "json" {
		return nil, Invalidf("-o %q: use table or json", format)
	}
	if socket == "" {
		return nil, Invalidf("--admin-socket is empty")
	}
	return &cliEnv{out: cmd.OutOrStdout(), json: format == "json", client: NewClient(socket)}, nil
}

// run wraps a command body with the environment and closes the client.
func run(fn func(ctx context.Context, e *cliEnv, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		e, err := env(cmd)
		if err != nil {
			return err
		}
		defer e.client.Close()
		ctx := cmd.Context()
		if ctx == nil {
			ctx = context.Background()
		}
		return fn(ctx, e, args)
	}
}

func statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the running agent: data plane, listeners, connections, pools",
		Args:  cobra.NoArgs,
		RunE: run(func(ctx context.Context, e *cliEnv, _ []string) error {
			st, err := e.client.Status(ctx)
			if err != nil {
				return err
			}
			if e.json {
				return WriteJSON(e.out, st)
			}
			return WriteStatus(e.out, st, time.Now())
		}),
	}
}

func connsCmd() *cobra.Command {
	var q ConnQuery
	var sortKey string
	var noTCP bool
	cmd := &cobra.Command{
		Use:   "conns",
		Short: "List established connections, like ss: client, backend, data plane, age, idle, bytes, RTT",
		Long: `List established connections, oldest first. IN is bytes from the client to
the backend, OUT from the backend to the client. RTT(C) and RTT(B) are the
smoothed round-trip times of the client's and the backend's socket, RETR their
retransmitted segments, read from the kernel's socket diagnostics.

  wsplice conns --backend 10.0.0.1:8080 --sort out
  wsplice conns --client 192.0.2.0/24 -o json`,
		Args: cobra.NoArgs,
		RunE: run(func(ctx context.Context, e *cliEnv, _ []string) error {
			q.TCP = !noTCP
			cs, err := e.client.Conns(ctx, q)
			if err != nil {
				return err
			}
			if err := SortConns(cs, sortKey); err != nil {
				return err
			}
			if e.json {
				return WriteJSON(e.out, cs)
			}
			return WriteConns(e.out, cs)
		}),
	}
	f := cmd.Flags()
	f.StringVar(&q.Backend, "backend", "", "only connections to this backend (host:port, host, or pool/host:port)")
	f.StringVar(&q.Client, "client", "", "only connections from this client (address, address:port or prefix)")
	f.StringVar(&q.Route, "route", "", "only connections of this route (as listed in ROUTE)")
	f.StringVar(&sortKey, "sort", "id", "sort by: "+strings.Join(ConnSortKeys, ", ")+" (numbers largest first)")
	f.BoolVar(&noTCP, "no-tcp", false, "skip the kernel's TCP detail (RTT, retransmits): faster with many connections")
	return cmd
}

func backendsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "backends",
		Short: "List backends: state, weight, active connections, recent state changes",
		Args:  cobra.NoArgs,
		RunE: run(func(ctx context.Context, e *cliEnv, _ []string) error {
			bs, err := e.client.Backends(ctx)
			if err != nil {
				return err
			}
			return writeBackends(e, bs)
		}),
	}
}

func writeBackends(e *cliEnv, bs []Backend) error {
	if e.json {
		return WriteJSON(e.out, bs)
	}
	return WriteBackends(e.out, bs, time.Now())
}

func drainCmd(on bool) func() *cobra.Command {
	return func() *cobra.Command {
		var wait, closeOver time.Duration
		cmd := &cobra.Command{
			Use:   "undrain BACKEND | --all",
			Short: "Let a drained backend take new connections again (--all: end the agent-wide drain)",
		}
		var all, ifRunning bool
		cmd.Flags().BoolVar(&all, "all", false, "the whole agent instead of one backend")
		cmd.Args = func(cmd *cobra.Command, args []string) error {
			if all && len(args) > 0 || !all && len(args) != 1 {
				return Invalidf("name one BACKEND, or use --all")
			}
			return nil
		}
		if on {
			cmd.Use = "drain BACKEND | --all"
			cmd.Short = "Stop sending new connections to a backend; its established connections stay"
			cmd.Long = `Stop sending new connections to a backend. Established connections stay
until they close (or are killed). BACKEND is host:port, host (every port), or
pool/host:port; without a pool it drains the backend in every pool.

  wsplice drain 10.0.0.1:8080 --wait 10m   # return once its connections are gone
  wsplice drain 10.0.0.1:8080 --close-over 5m   # and close them, spread over 5 minutes

With --all the whole agent goes lame duck: /readyz answers 503 so load
balancers and Kubernetes stop sending new clients, listeners keep accepting
meanwhile, and established connections stay. Stop the agent (SIGTERM) to
close the listeners and drain (a Kubernetes preStop hook does this).

With --if-running, no agent listening on the admin socket is not an error:
the command says so and exits 0. That is the preStop hook of a pod whose
agent handed everything to the next pod (wsplice run --take-over) and closed
its admin socket: there is nothing left to drain, and the hook must not fail.
Any other failure (permission denied, no answer, an error from the agent)
still fails.`
			cmd.Flags().DurationVar(&wait, "wait", 0, "wait until the backend has no active connections, at most this long")
			cmd.Flags().DurationVar(&closeOver, "close-over", 0, "also close its established connections, spread evenly over this time (clients reconnect elsewhere without a herd)")
			cmd.Flags().BoolVar(&ifRunning, "if-running", false, "when no agent listens on the admin socket, say so and exit 0 instead of failing (preStop after a take-over)")
		}
		cmd.RunE = run(func(ctx context.Context, e *cliEnv, args []string) error {
			err := drain(ctx, e, args, on, all, wait, closeOver)
			if err != nil && ifRunning && errors.Is(err, ErrNoAgent) && noAgentListens(e.client.path) {
				fmt.Fprintf(e.out, "no agent listens on %s: nothing to drain\n", e.client.path)
				return nil
			}
			return err
		})
		return cmd
	}
}

// drain is the body of drain and undrain (on: drain).
func drain(ctx context.Context, e *cliEnv, args []string, on, all bool, wait, closeOver time.Duration) error {
	if all {
		if err := e.client.LameDuck(ctx, on); err != nil {
			return err
		}
		state := "draining: readiness is false, established connections stay"
		if !on {
			state = "ready: taking new connections"
		}
		fmt.Fprintln(e.out, "agent", state)
		return nil
	}
	bs, err := e.client.DrainOver(ctx, args[0], on, closeOver)
	if err != nil {
		return err
	}
	if wait > 0 {
		if bs, err = waitDrained(ctx, e.client, args[0], wait); err != nil {
			return err
		}
	}
	return writeBackends(e, bs)
}

// noAgentListens reports whether nothing listens on the admin socket at
// path: no such file, or a socket file nobody accepts on (the agent closed
// it or died). ErrNoAgent also covers a socket this user may not use,
// where an agent may well be running: that is not "no agent".
func noAgentListens(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)
}

// waitDrained polls until no backend matching spec has active connections.
func waitDrained(ctx context.Context, c *Client, spec string, limit time.Duration) ([]Backend, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		all, err := c.Backends(ctx)
		if err != nil {
			return nil, err
		}
		var bs []Backend
		var active int64
		for _, b := range all {
			if MatchBackend(spec, b.Pool, b.Address) {
				bs = append(bs, b)
				active += b.Active
			}
		}
		if active == 0 {
			return bs, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%s still has %d active connections after %s (it stays drained; use wsplice kill to close them)", spec, active, limit)
		case <-t.C:
		}
	}
}

func reloadCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "reload",
		Short: "Re-read the agent's configuration file and apply it without dropping connections",
		Args:  cobra.NoArgs,
		RunE: run(func(ctx context.Context, e *cliEnv, _ []string) error {
			if err := e.client.Reload(ctx); err != nil {
				return err
			}
			fmt.Fprintln(e.out, "configuration reloaded")
			return nil
		}),
	}
}

func upgradeCmd() *cobra.Command {
	var binary string
	var wait time.Duration
	var strict bool
	cmd := &cobra.Command{
		Use:   "upgrade",
		Short: "Replace the running agent with a new binary without dropping a connection",
		Long: `Replace the running agent with a new process of its binary, read again from
disk (install the new binary over the old path first), or of --binary. The new
process takes over the listening sockets and every established connection,
tells systemd it is the main process, and the old one exits. If the new binary
fails to start or to take over, the running agent keeps serving and this
command says why. SIGUSR2 to the agent does the same without waiting.

Connections move on both data planes: on sockmap the new agent takes over the
running agent's BPF maps and the kernel keeps forwarding throughout. TLS-
terminated connections cannot move (their session state is in the process):
they stay with the old agent until they close or its drain_timeout; --strict
refuses the upgrade while there are any.

  install -m 0755 ./wsplice /usr/local/bin/wsplice && wsplice upgrade`,
		Args: cobra.NoArgs,
		RunE: run(func(ctx context.Context, e *cliEnv, _ []string) error {
			res, err := e.client.UpgradeWith(ctx, UpgradeRequest{Binary: binary, Strict: strict})
			if err != nil {
				return err
			}
			// The new agent opens the admin socket once the old one has let
			// go of it: wait until it answers there.
			if err := waitAgent(ctx, e.client, res.NewPID, wait); err != nil {
				return err
			}
			if e.json {
				return WriteJSON(e.out, res)
			}
			sec := func(f float64) time.Duration { return time.Duration(f * float64(time.Second)).Round(time.Millisecond) }
			fmt.Fprintf(e.out, "upgraded: pid %d → %d, %d listeners and %d connections handed over in %d batches (the longest batch %s, accepting paused %s), took %s\n",
				res.OldPID, res.NewPID, res.Listeners, res.Connections, res.Batches, sec(res.MaxBatch), sec(res.AcceptPause), sec(res.Seconds))
			if res.Stayed > 0 {
				fmt.Fprintf(e.out, "%d connections stayed with the old agent (%d rejected by the new one, the others TLS-terminated or established during the hand-off): it (pid %d) serves them until they close or its drain deadline\n", res.Stayed, res.Rejected, res.OldPID)
			}
			return nil
		}),
	}
	cmd.Flags().StringVar(&binary, "binary", "", "absolute path of the new binary (default: the running agent's own path)")
	cmd.Flags().DurationVar(&wait, "wait", 30*time.Second, "how long to wait for the new agent to answer on the admin socket")
	cmd.Flags().BoolVar(&strict, "strict", false, "refuse while TLS-terminated connections (which cannot move) are open, instead of leaving them to the old agent")
	return cmd
}

// waitAgent polls the admin socket until the agent with pid answers.
func waitAgent(ctx context.Context, c *Client, pid int, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for {
		st, err := c.Status(ctx)
		if err == nil && st.PID == pid {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the new agent (pid %d) took over but does not answer on the admin socket after %s (last: pid %d, %v)", pid, limit, st.PID, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func weightCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "weight BACKEND N",
		Short: "Set a backend's weight (0 to " + strconv.Itoa(MaxWeight) + "; 0 takes it out of new selections)",
		Long: `Set a backend's live weight, its share of new connections. Maglev moves keys
when shares change, as with any change of the backend set. A reload resets the
weight only if the file's weight for the backend changed.`,
		Args: cobra.ExactArgs(2),
		RunE: run(func(ctx context.Context, e *cliEnv, args []string) error {
			w, err := strconv.Atoi(args[1])
			if err != nil {
				return Invalidf("weight %q is not a number", args[1])
			}
			bs, err := e.client.SetWeight(ctx, args[0], w)
			if err != nil {
				return err
			}
			return writeBackends(e, bs)
		}),
	}
}

func killCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "kill CONN...",
		Short: "Close connections by id (RST to both sides), ids as listed by wsplice conns",
		Args:  cobra.MinimumNArgs(1),
		RunE: run(func(ctx context.Context, e *cliEnv, args []string) error {
			ids := make([]uint64, len(args))
			for i, a := range args {
				id, err := strconv.ParseUint(a, 10, 64)
				if err != nil {
					return Invalidf("connection id %q is not a number", a)
				}
				ids[i] = id
			}
			// Kill in order; on a failure, report what was killed before it.
			killed := []uint64{}
			var kerr error
			for _, id := range ids {
				if kerr = e.client.Kill(ctx, id); kerr != nil {
					break
				}
				killed = append(killed, id)
			}
			if e.json && kerr == nil {
				return WriteJSON(e.out, struct {
					Killed []uint64 `json:"killed"`
				}{killed})
			}
			for _, id := range killed {
				fmt.Fprintf(e.out, "killed connection %d\n", id)
			}
			return kerr
		}),
	}
}
