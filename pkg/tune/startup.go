package tune

import (
	"fmt"
	"log/slog"
)

// Mode says what the agent does with host settings at start
// (`wsplice run --tune=…`, config tune.mode).
type Mode string

const (
	// ModeOff leaves sysctls alone and does not check them.
	ModeOff Mode = "off"
	// ModeCheck compares and warns; it changes nothing (the default).
	ModeCheck Mode = "check"
	// ModeApply writes the settings that fall short, recording originals.
	ModeApply Mode = "apply"
)

// ParseMode parses off, check or apply.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ModeOff, ModeCheck, ModeApply:
		return m, nil
	case "":
		return ModeCheck, nil
	}
	return "", fmt.Errorf("tune mode %q: use off, check or apply", s)
}

// StartupOptions says what Startup prepares for.
type StartupOptions struct {
	Mode Mode
	// WantConns is the configured global connection limit.
	WantConns int
	// Backends and SourceAddrs feed the port limit of the capacity report
	// (see CapacityInput).
	Backends    int
	SourceAddrs int
	// Checker to use; nil means the host's /proc/sys and DefaultStatePath.
	Checker *Checker
}

// StartupReport is what Startup found and did, for the agent to log and act
// on. It holds no error: every problem in it is a warning.
type StartupReport struct {
	Mode Mode `json:"mode"`
	// Results is check's table (after apply, when applying); nil when off.
	Results []Result `json:"results,omitempty"`
	// Applied is what apply did; nil unless Mode is apply.
	Applied *Report `json:"applied,omitempty"`
	// ApplyError is why apply did nothing (it could not record originals).
	ApplyError string `json:"apply_error,omitempty"`
	// NoFile is what RaiseNoFile did.
	NoFile NoFileResult `json:"nofile"`
	// Capacity is what the host can hold after the changes.
	Capacity Capacity `json:"capacity"`
	// Backlog is net.core.somaxconn: the listen backlog the agent gets.
	Backlog int `json:"backlog"`
	// MaxConns is what the agent must cap its global connection limit to:
	// WantConns, or less when the open-file limit cannot hold it. (Other
	// capacity limits are estimates and only warned about.)
	MaxConns int `json:"max_conns"`
}

// Startup prepares the host for the agent: in apply mode it writes the
// settings that fall short, in check mode it only compares; in every mode
// it raises RLIMIT_NOFILE for WantConns (the process's own limit, not a
// host setting) and estimates capacity. Call it on the goroutine whose
// network namespace the agent serves from (normally the process's).
func Startup(opts StartupOptions) (*StartupReport, error) {
	c := opts.Checker
	if c == nil {
		c = &Checker{}
	}
	rep := &StartupReport{Mode: opts.Mode}
	switch opts.Mode {
	case ModeApply:
		ar, err := c.Apply(false)
		if err != nil {
			rep.ApplyError = err.Error()
		} else {
			rep.Applied = &ar
		}
		rep.Results = c.Check()
	case ModeCheck:
		rep.Results = c.Check()
	case ModeOff:
	default:
		return nil, fmt.Errorf("tune mode %q: use off, check or apply", opts.Mode)
	}
	nf, err := RaiseNoFile(opts.WantConns)
	if err != nil {
		return nil, err
	}
	rep.NoFile = nf
	rep.MaxConns = nf.MaxConns
	rep.Backlog = c.Somaxconn()
	rep.Capacity = c.Capacity(CapacityInput{WantConns: opts.WantConns, Backends: opts.Backends, SourceAddrs: opts.SourceAddrs})
	return rep, nil
}

// Log writes the report to the agent's logger: a warning per setting that
// falls short, per failed change, for a capped open-file limit and for an
// estimated capacity below the configured connections; one info line with
// the capacity. (The package itself never logs; the agent calls this.)
func (r *StartupReport) Log(l *slog.Logger) {
	if r.ApplyError != "" {
		l.Warn("tune apply did nothing", "err", r.ApplyError)
	}
	if r.Applied != nil {
		for _, ch := range r.Applied.Changes {
			switch ch.Action {
			case ActionChanged:
				l.Info("sysctl applied", "key", ch.Key, "before", ch.Before, "after", ch.After, "state", r.Applied.StatePath)
			case ActionFailed:
				l.Warn("sysctl apply failed", "key", ch.Key, "value", ch.Before, "detail", ch.Detail)
			}
		}
	}
	for _, res := range r.Results {
		switch res.Verdict {
		case VerdictLow:
			l.Warn("sysctl below recommendation", "key", res.Key, "current", res.Current, "recommended", res.Recommended, "compare", res.Compare.String(), "why", res.Why, "fix", "wsplice tune apply, or the sysctl/99-wsplice.conf drop-in")
		case VerdictReadOnly:
			l.Warn("sysctl below recommendation and read-only here", "key", res.Key, "current", res.Current, "recommended", res.Recommended, "detail", res.Detail, "why", res.Why)
		case VerdictError:
			l.Warn("sysctl unreadable", "key", res.Key, "detail", res.Detail)
		}
	}
	if r.NoFile.Capped {
		l.Warn("max connections capped by the open-file limit", "max_conns", r.NoFile.MaxConns, "want", r.NoFile.WantConns, "hard_limit", r.NoFile.Hard, "need", r.NoFile.Need, "fix", r.NoFile.Message)
	}
	attrs := []any{"max_conns", r.Capacity.MaxConns, "configured", r.Capacity.WantConns, "limited_by", r.Capacity.LimitedBy, "backlog", r.Backlog}
	if r.Capacity.PortsPerBackend > 0 {
		attrs = append(attrs, "conns_per_backend_per_source_ip", r.Capacity.PortsPerBackend)
	}
	for _, lim := range r.Capacity.Limits {
		attrs = append(attrs, "limit_"+lim.Name, lim.MaxConns)
	}
	l.Info("capacity", attrs...)
	if r.Capacity.MaxConns < r.Capacity.WantConns && r.Capacity.LimitedBy != "fds" {
		for _, lim := range r.Capacity.Limits {
			if lim.Name == r.Capacity.LimitedBy {
				l.Warn("host may not hold the configured connections", "limited_by", lim.Name, "max_conns", lim.MaxConns, "configured", r.Capacity.WantConns, "detail", lim.Detail)
			}
		}
	}
}
