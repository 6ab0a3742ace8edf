// Package agent assembles a running wsplice: host tuning, data planes, the
// proxy, and the operator endpoints, and owns their start and stop order.
package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/dataplane"
	"github.com/wsplice/wsplice/pkg/health"
	"github.com/wsplice/wsplice/pkg/proxy"
	"github.com/wsplice/wsplice/pkg/sdnotify"
	"github.com/wsplice/wsplice/pkg/tune"
	"github.com/wsplice/wsplice/pkg/upgrade"
)

// Options are what the command line gives the agent besides the config.
type Options struct {
	Config     *config.Config
	ConfigPath string // for reload; empty when the config came from flags
	Logger     *slog.Logger
	// Ready, when set, receives the agent once it listens (tests, the demo).
	Ready func(*Agent)
	// OnClose, when set, is called for every closed connection after the
	// access log line (tests).
	OnClose func(*proxy.Conn, dataplane.Result)
	// TakeOver: if an agent listens on admin.takeover_socket, take its
	// listeners and connections over instead of starting afresh (the next
	// pod of a DaemonSet update; see upgrade.go).
	TakeOver bool
}

// Agent is one running wsplice.
type Agent struct {
	cfg     *config.Config
	path    string // config file, for reload
	onClose func(*proxy.Conn, dataplane.Result)
	log     *slog.Logger
	Proxy   *proxy.Server
	Splice  *dataplane.Splice
	Sockmap *dataplane.Sockmap // nil when the kernel path is unavailable
	access  *accessLog
	ep      atomic.Pointer[endpoints] // metrics, admin socket, periodic log
	Health  *health.Set               // active and passive checks, DNS discovery
	up      upgradeState              // binary upgrade: SIGUSR2, wsplice upgrade, taking over (upgrade.go)
}

// Run starts the agent and blocks until ctx is cancelled (first SIGTERM or
// SIGINT), then drains: listeners close, established connections get
// drain_timeout to finish, the rest are closed gradually. A second signal
// during the drain closes everything at once.
func Run(ctx context.Context, opts Options) error {
	cfg := opts.Config
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	a := &Agent{cfg: cfg, log: log, path: opts.ConfigPath, onClose: opts.OnClose}
	if err := a.initUpgrade(opts.TakeOver); err != nil { // (upgrade.go)
		return err
	}
	if err := a.start(); err != nil {
		a.upgradeStartFailed(err) // the old agent, if any, keeps serving (upgrade.go)
		if a.Health != nil {
			a.Health.Stop()
		}
		a.stopEndpoints()
		a.stopPlanes()
		return err
	}
	if opts.Ready != nil {
		opts.Ready(a)
	}
	// Type=notify: systemd considers the unit started only now.
	if _, err := sdnotify.Ready(); err != nil {
		log.Warn("sd_notify READY failed", "err", err)
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP, syscall.SIGUSR2)
	defer signal.Stop(hup)
wait:
	for {
		select {
		case <-ctx.Done():
			break wait
		case <-a.up.committed:
			return a.finishUpgrade(ctx) // a new process serves now (upgrade.go)
		case sig := <-hup:
			if sig == syscall.SIGUSR2 {
				a.upgradeOnSignal() // in the background (upgrade.go)
				continue
			}
			if err := a.Reload(); err != nil {
				log.Error("reload rejected, the running configuration stays", "err", err)
			}
		}
	}

	a.stopTakeover()       // a draining agent hands nothing over (upgrade.go)
	if a.settleUpgrade() { // an upgrade committed while the stop came (upgrade.go)
		return a.finishUpgrade(ctx)
	}
	drainCtx, cancel := context.WithTimeout(context.Background(), cfg.DrainTimeout.D())
	defer cancel()
	again := make(chan os.Signal, 1)
	signal.Notify(again, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(again)
	go func() {
		select {
		case <-again:
			log.Warn("second signal: closing every connection now")
			cancel()
		case <-drainCtx.Done():
		}
	}()
	log.Info("stopping", "drain_timeout", cfg.DrainTimeout.D(), "connections", a.Proxy.Active())
	sdnotify.Stopping()
	sdnotify.Status(fmt.Sprintf("draining %d connections", a.Proxy.Active()))
	spread := min(cfg.DrainTimeout.D()/10, 5*time.Second)
	a.Proxy.Shutdown(drainCtx, spread)
	a.Health.Stop()
	a.stopEndpoints()
	a.stopPlanes()
	a.access.close()
	log.Info("stopped")
	return nil
}

func (a *Agent) start() error {
	if err := a.tune(); err != nil {
		return err
	}
	a.Splice = dataplane.NewSplice(dataplane.SpliceOptions{Logger: a.log})
	planes := proxy.Planes{Splice: a.Splice}
	if err := a.startSockmap(); err != nil {
		return err
	}
	if a.Sockmap != nil {
		planes.Sockmap = a.Sockmap
	}
	access, err := openAccessLog(a.cfg.Log)
	if err != nil {
		return err
	}
	a.access = access
	// connClosed writes the access-log line and feeds the metrics.
	onClose := a.connClosed
	if a.onClose != nil {
		onClose = func(c *proxy.Conn, r dataplane.Result) {
			a.connClosed(c, r)
			a.onClose(c, r)
		}
	}
	a.Health = health.NewSet(health.Options{Logger: a.log, OnEvent: a.healthEvent})
	srv, err := proxy.New(a.cfg, planes, proxy.Options{
		Logger: a.log, OnClose: onClose, OnEstablish: a.connEstablished,
		OnConnectResult: a.Health.ReportResult, Specs: a.Health.Specs,
	})
	if err != nil {
		return err
	}
	a.Proxy = srv
	if err := a.Health.Apply(context.Background(), srv.Pools(), a.cfg.Pools); err != nil {
		return fmt.Errorf("health checks: %w", err)
	}
	if a.up.inherit != nil { // started by an upgrade: take over (upgrade.go)
		if err := a.takeOver(); err != nil {
			return err
		}
		a.startTakeover()
		return nil
	}
	// The admin socket comes before the listeners: a second agent started
	// by mistake fails on it before SO_REUSEPORT gives it any traffic.
	if err := a.startEndpoints(); err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		return err
	}
	a.startTakeover()
	return nil
}

// tune checks or applies the host settings (cfg.Tune.Mode), raises
// RLIMIT_NOFILE for the configured connections, and caps the global
// connection limit to what the open-file limit can hold, so the agent
// refuses cleanly instead of failing accept later.
func (a *Agent) tune() error {
	mode, err := tune.ParseMode(a.cfg.Tune.Mode)
	if err != nil {
		return err
	}
	backends := 0
	for _, p := range a.cfg.Pools {
		backends += len(p.Backends)
	}
	rep, err := tune.Startup(tune.StartupOptions{Mode: mode, WantConns: a.cfg.Limits.MaxConns, Backends: backends})
	if err != nil {
		return fmt.Errorf("host tuning: %w", err)
	}
	rep.Log(a.log)
	if rep.MaxConns > 0 && rep.MaxConns < a.cfg.Limits.MaxConns {
		a.log.Warn("capping limits.max_conns to what the open-file limit holds", "configured", a.cfg.Limits.MaxConns, "cap", rep.MaxConns)
		a.cfg.Limits.MaxConns = rep.MaxConns
	}
	return nil
}

// startSockmap starts the sockmap plane when a listener may use it, or
// when this agent inherited a running agent's sockmap objects (an
// upgrade: its kernel-path connections can only be adopted on them, and
// listeners configured for splice still get none).
func (a *Agent) startSockmap() error {
	inh := a.inheritedSockmap()
	want := a.wantsSockmap()
	if !want && inh == nil {
		a.log.Info("data plane: splice (configured)")
		return nil
	}
	s := a.cfg.Sockmap
	opts := dataplane.SockmapOptions{
		MaxConns: s.MaxConns, ParkedHighWater: s.ParkedHighWater, RateLimit: s.RateLimit,
		PollInterval: s.PollInterval.D(), RcvBuf: s.RcvBuf, Fallback: a.Splice, Logger: a.log,
	}
	if inh != nil {
		opts.Inherit = inh
		sm, err := dataplane.NewSockmap(opts)
		if err == nil {
			a.Sockmap = sm
			a.log.Info("data plane: sockmap on the running agent's BPF maps (upgrade), splice as fallback")
			return nil
		}
		a.log.Warn("upgrade: cannot use the running agent's sockmap objects; its kernel-path connections stay with it until they close", "err", err)
		opts.Inherit = nil
		if !want {
			a.log.Info("data plane: splice (configured)")
			return nil
		}
	}
	sm, err := dataplane.NewSockmap(opts)
	switch {
	case err == nil:
		a.Sockmap = sm
		a.log.Info("data plane: sockmap (in-kernel forwarding), splice as fallback")
	case a.requiresSockmap():
		return fmt.Errorf("dataplane sockmap was requested but is unavailable: %w (use dataplane: auto to fall back to splice)", err)
	default:
		a.log.Warn("data plane: splice, because the sockmap plane is unavailable", "why", err)
	}
	return nil
}

// inheritedSockmap returns the running agent's sockmap objects when this
// process takes over from it and it sent them (its hello), else nil.
func (a *Agent) inheritedSockmap() *dataplane.InheritedSockmap {
	objs := a.up.objects
	a.up.objects = upgrade.Objects{}
	if len(objs.Files) == 0 {
		return nil
	}
	inh, err := dataplane.InheritSockmap(objs.Meta, objs.Files)
	if err != nil {
		a.log.Warn("upgrade: the running agent's sockmap objects are unusable; its kernel-path connections stay with it until they close", "err", err)
		return nil
	}
	return inh
}

// wantsSockmap: some listener may use the kernel path.
func (a *Agent) wantsSockmap() bool {
	for _, l := range a.cfg.Listeners {
		if l.Dataplane != "splice" {
			return true
		}
	}
	return false
}

// requiresSockmap: a listener insists on the kernel path.
func (a *Agent) requiresSockmap() bool {
	for _, l := range a.cfg.Listeners {
		if l.Dataplane == "sockmap" {
			return true
		}
	}
	return false
}

func (a *Agent) stopPlanes() {
	if a.Sockmap != nil {
		if err := a.Sockmap.Close(); err != nil {
			a.log.Warn("closing sockmap plane", "err", err)
		}
	}
	if a.Splice != nil {
		a.Splice.Close()
	}
}

// Reload re-reads the configuration file, validates all of it and applies
// the difference (see proxy.Server.Reload). An invalid file changes nothing
// and the error says why. Established connections are never dropped.
func (a *Agent) Reload() error {
	// Type=notify-reload wants RELOADING=1 then READY=1, also when the new
	// file is rejected (the old configuration keeps serving).
	sdnotify.Reloading()
	defer sdnotify.Ready()
	if a.path == "" {
		// Flags only: nothing to re-read but the certificate files.
		return a.Proxy.ReloadCertificates()
	}
	cfg, err := config.Load(a.path)
	if err != nil {
		return err
	}
	// The agent keeps its start-up config (tuning, planes); the proxy holds
	// the live one (Proxy.Config).
	if err := a.Proxy.Reload(cfg); err != nil {
		return err
	}
	return a.Health.Apply(context.Background(), a.Proxy.Pools(), cfg.Pools)
}

// Addr returns the bound address of the named listener (tests use ":0").
func (a *Agent) Addr(name string) net.Addr { return a.Proxy.Addrs()[name] }
