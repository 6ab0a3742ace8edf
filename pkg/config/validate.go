package config

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	"github.com/wsplice/wsplice/pkg/balance"
)

// Choices for the enumerated fields; Validate names them in its errors.
var (
	Modes         = []string{"websocket", "tcp", "tls_passthrough"}
	Dataplanes    = []string{"auto", "sockmap", "splice"}
	Algorithms    = []string{"round_robin", "least_conn", "maglev", "random_two", "first"}
	Fallbacks     = []string{"round_robin", "least_conn", "random_two", "first"}
	Forwards      = []string{"headers", "proxy_v1", "proxy_v2", "none"}
	HealthTypes   = []string{"none", "tcp", "http", "websocket"}
	LogLevels     = []string{"debug", "info", "warn", "error"}
	LogFormats    = []string{"text", "json"}
	TuneModes     = []string{"off", "check", "apply"}
	StatusClasses = []string{"http_1xx", "http_2xx", "http_3xx", "http_4xx", "http_5xx"}
)

// FieldError is a validation error: the field's path in the config and
// what to do about it.
type FieldError struct {
	Field string // e.g. "pools[0].backends[1].address"
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

// Validate checks every field and returns all problems at once, each
// naming its field.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	oneOf := func(field, v string, choices []string) {
		if !slices.Contains(choices, v) {
			bad(field, "%q is not one of %s", v, strings.Join(choices, ", "))
		}
	}

	if len(c.Listeners) == 0 {
		bad("listeners", "no listener: add one, e.g. listeners: [{address: \":8080\"}]")
	}
	if len(c.Pools) == 0 {
		bad("pools", "no pool: add one with at least one backend, e.g. pools: [{name: app, backends: [{address: \"10.0.0.1:8080\"}]}]")
	}
	oneOf("dataplane", c.Dataplane, Dataplanes)

	pools := map[string]bool{}
	for i, p := range c.Pools {
		f := fmt.Sprintf("pools[%d]", i)
		if p.Name == "" {
			bad(f+".name", "empty: every pool needs a name that routes refer to")
		} else if pools[p.Name] {
			bad(f+".name", "pool %q is defined twice: rename one", p.Name)
		}
		pools[p.Name] = true
		if len(p.Backends) == 0 {
			bad(f+".backends", "no backend: add at least one {address: host:port}")
		}
		seen := map[string]bool{}
		primaries := 0
		for j, b := range p.Backends {
			bf := fmt.Sprintf("%s.backends[%d]", f, j)
			if err := checkHostPort(b.Address, false); err != nil && !IsSRVName(b.Address) {
				bad(bf+".address", "%v", err)
			}
			if seen[b.Address] {
				bad(bf+".address", "%q is listed twice in this pool: use weight to give it a larger share", b.Address)
			}
			seen[b.Address] = true
			if b.Weight < 1 || b.Weight > 1000 {
				bad(bf+".weight", "%d is out of range: use 1 to 1000", b.Weight)
			}
			if b.MaxConns < 0 {
				bad(bf+".max_conns", "%d is negative: use 0 for no cap", b.MaxConns)
			}
			if !b.Backup {
				primaries++
			}
		}
		if len(p.Backends) > 0 && primaries == 0 {
			bad(f+".backends", "every backend is a backup: mark at least one as primary (backup: false)")
		}
		oneOf(f+".balance", p.Balance, Algorithms)
		oneOf(f+".hash_fallback", p.HashFallback, Fallbacks)
		if err := CheckHashKey(p.HashKey); err != nil {
			bad(f+".hash_key", "%v", err)
		}
		if p.MaglevTableSize != 0 && (!balance.IsPrime(p.MaglevTableSize) || p.MaglevTableSize < 100*len(p.Backends)) {
			bad(f+".maglev_table_size", "%d must be a prime ≥ 100 × backends (%d): try %d, or 0 to pick one",
				p.MaglevTableSize, 100*len(p.Backends), balance.NextPrime(max(p.MaglevTableSize, 100*len(p.Backends))))
		}
		if p.BalanceFactor < 0 || p.BalanceFactor > 10 {
			bad(f+".balance_factor", "%g is out of range: use 0 (off) or e.g. 0.25 for at most 125%% of the average load", p.BalanceFactor)
		}
		if p.MaxTries < 1 || p.MaxTries > 100 {
			bad(f+".max_tries", "%d is out of range: use 1 to 100", p.MaxTries)
		}
		oneOf(f+".forward", p.Forward, Forwards)
		h := p.Health
		oneOf(f+".health.type", h.Type, HealthTypes)
		if h.Timeout > h.Interval {
			bad(f+".health.timeout", "%s is longer than the interval %s: make it shorter", h.Timeout.D(), h.Interval.D())
		}
		if h.Rise < 1 || h.Fall < 1 {
			bad(f+".health", "rise and fall must be at least 1")
		}
		if !strings.HasPrefix(h.Path, "/") {
			bad(f+".health.path", "%q must start with /", h.Path)
		}
		for k, e := range h.Expect {
			oneOf(fmt.Sprintf("%s.health.expect[%d]", f, k), e, StatusClasses)
		}
		if h.MaxFails < 0 {
			bad(f+".health.max_fails", "%d is negative: use 0 to disable passive checks", h.MaxFails)
		}
	}

	names := map[string]bool{}
	addrs := map[string]bool{}
	for i, l := range c.Listeners {
		f := fmt.Sprintf("listeners[%d]", i)
		if err := checkHostPort(l.Address, true); err != nil {
			bad(f+".address", "%v", err)
		}
		if addrs[l.Address] {
			bad(f+".address", "%q is used by two listeners: give each its own port", l.Address)
		}
		addrs[l.Address] = true
		if names[l.Name] {
			bad(f+".name", "%q is used by two listeners: names must be unique", l.Name)
		}
		names[l.Name] = true
		oneOf(f+".mode", l.Mode, Modes)
		oneOf(f+".dataplane", l.Dataplane, Dataplanes)
		if l.Pool != "" && !pools[l.Pool] {
			bad(f+".pool", "no pool named %q: define it under pools or fix the name", l.Pool)
		}
		switch l.Mode {
		case "tcp":
			if l.Pool == "" {
				bad(f+".pool", "a tcp listener needs a pool: set pool to one of the pools")
			}
			if len(l.Routes) > 0 {
				bad(f+".routes", "a tcp listener does not read HTTP, so it cannot route: remove routes and set pool")
			}
		case "websocket":
			if l.Pool == "" && len(l.Routes) == 0 {
				bad(f+".routes", "no route and no pool: add routes or set pool")
			}
		}
		for j, r := range l.Routes {
			rf := fmt.Sprintf("%s.routes[%d]", f, j)
			if r.Pool == "" {
				bad(rf+".pool", "empty: name the pool that serves this route")
			} else if !pools[r.Pool] {
				bad(rf+".pool", "no pool named %q: define it under pools or fix the name", r.Pool)
			}
			p := strings.TrimPrefix(r.Path, "=")
			if r.Path != "" && !strings.HasPrefix(p, "/") {
				bad(rf+".path", "%q must start with / (or =/ for an exact match)", r.Path)
			}
			if strings.Contains(r.Host, "*") && !strings.HasPrefix(r.Host, "*.") {
				bad(rf+".host", "%q: a wildcard is only allowed as the first label, like *.example.com", r.Host)
			}
			if r.HashKey != "" {
				if err := CheckHashKey(r.HashKey); err != nil {
					bad(rf+".hash_key", "%v", err)
				}
			}
		}
		if l.HandshakeTimeout.D() <= 0 {
			bad(f+".handshake_timeout", "must be positive, e.g. 10s")
		}
		if l.MaxHeadBytes < 1024 || l.MaxHeadBytes > 1<<20 {
			bad(f+".max_head_bytes", "%d is out of range: use 1024 to 1048576", l.MaxHeadBytes)
		}
		if l.MaxHeaders < 1 || l.MaxHeaders > 1000 {
			bad(f+".max_headers", "%d is out of range: use 1 to 1000", l.MaxHeaders)
		}
		validateTLS(&c.Listeners[i], f, bad)
		if l.Backlog < 0 {
			bad(f+".backlog", "%d is negative: use 0 to follow net.core.somaxconn", l.Backlog)
		}
	}

	s := c.Sockmap
	if s.MaxConns < 1 || s.MaxConns > 1<<24 {
		bad("sockmap.max_conns", "%d is out of range: use 1 to 16777216", s.MaxConns)
	}
	if s.ParkedHighWater < 64<<10 {
		bad("sockmap.parked_high_water", "%d is below 65536 bytes: that would demote ordinary traffic", s.ParkedHighWater)
	}
	if s.RateLimit < 0 {
		bad("sockmap.rate_limit", "%d is negative: use 0 to turn the rate trigger off", s.RateLimit)
	}
	if s.PollInterval.D() <= 0 {
		bad("sockmap.poll_interval", "must be positive, e.g. 5ms")
	}
	if s.RcvBuf < 4096 {
		bad("sockmap.rcvbuf", "%d is too small: use at least 4096 bytes", s.RcvBuf)
	}
	oneOf("log.level", c.Log.Level, LogLevels)
	oneOf("log.format", c.Log.Format, LogFormats)
	oneOf("tune.mode", c.Tune.Mode, TuneModes)
	if c.Metrics.Address != "" {
		if err := checkHostPort(c.Metrics.Address, true); err != nil {
			bad("metrics.address", "%v", err)
		} else if addrs[c.Metrics.Address] {
			bad("metrics.address", "%q is also a data listener: metrics must never be reachable from data listeners, use another port", c.Metrics.Address)
		}
	}
	if c.Admin.TakeoverSocket != "" && !strings.HasPrefix(c.Admin.TakeoverSocket, "/") {
		bad("admin.takeover_socket", "%q must be an absolute path (or leave it out)", c.Admin.TakeoverSocket)
	}
	if c.Admin.TakeoverSocket != "" && c.Admin.TakeoverSocket == c.Admin.Socket {
		bad("admin.takeover_socket", "%q is also admin.socket: give it a path of its own", c.Admin.TakeoverSocket)
	}
	if c.Admin.Socket != "" && !strings.HasPrefix(c.Admin.Socket, "/") {
		bad("admin.socket", "%q must be an absolute path", c.Admin.Socket)
	}
	lim := c.Limits
	if lim.MaxConns < 1 {
		bad("limits.max_conns", "%d: use a positive number", lim.MaxConns)
	}
	if lim.PerIPConns < 0 || lim.PerIPRate < 0 || lim.PerIPBurst < 0 {
		bad("limits", "per_ip_conns, per_ip_rate and per_ip_burst cannot be negative: use 0 to turn a limit off")
	}
	if lim.IPv6Prefix < 1 || lim.IPv6Prefix > 128 {
		bad("limits.ipv6_prefix", "%d is out of range: use 1 to 128 (64 groups a typical home network)", lim.IPv6Prefix)
	}
	return errors.Join(errs...)
}

// CheckHashKey validates a hash key expression.
func CheckHashKey(k string) error {
	name, arg, hasArg := strings.Cut(k, ":")
	switch name {
	case "path", "uri", "client_port":
		if hasArg {
			return fmt.Errorf("%q takes no argument: write %s", k, name)
		}
		return nil
	case "header", "cookie", "query":
		if arg == "" {
			return fmt.Errorf("%q needs a name: write %s:NAME", k, name)
		}
		return nil
	}
	if ip, prefix, ok := strings.Cut(k, "/"); ok && ip == "client_ip" {
		n, err := strconv.Atoi(prefix)
		if err != nil || n < 1 || n > 128 {
			return fmt.Errorf("%q: the prefix must be 1 to 128, e.g. client_ip/24", k)
		}
		return nil
	}
	if k == "client_ip" {
		return nil
	}
	return fmt.Errorf("%q is not a hash key: use client_ip, client_ip/24, header:NAME, cookie:NAME, query:NAME, path or uri", k)
}

// IsSRVName reports whether addr is a DNS SRV name such as a Kubernetes
// headless Service's "_ws._tcp.chat.default.svc.cluster.local": two
// leading labels that start with "_" and no port (the records carry it).
func IsSRVName(addr string) bool {
	a, rest, ok := strings.Cut(addr, ".")
	if !ok {
		return false
	}
	b, rest, ok := strings.Cut(rest, ".")
	return ok && len(a) > 1 && len(b) > 1 && a[0] == '_' && b[0] == '_' && rest != "" && !strings.Contains(addr, ":")
}

func checkHostPort(addr string, listen bool) error {
	if addr == "" {
		return errors.New("empty: write host:port, e.g. 10.0.0.1:8080 or [::1]:8080")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port (IPv6 needs brackets, [::1]:8080)", addr)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 || (!listen && n == 0) {
		return fmt.Errorf("%q: port must be 1 to 65535", addr)
	}
	if !listen && host == "" {
		return fmt.Errorf("%q has no host: write host:port", addr)
	}
	return nil
}
