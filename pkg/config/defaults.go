package config

import "time"

// Defaults that are safe on the public internet. They are applied by
// SetDefaults to every field left empty.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultIdleTimeout      = time.Hour
	DefaultMaxHeadBytes     = 16 << 10
	DefaultMaxHeaders       = 100
	DefaultConnectTimeout   = 5 * time.Second
	DefaultMaxTries         = 3
	DefaultDrainTimeout     = 30 * time.Second
	DefaultMaxConns         = 100000
	DefaultSockmapMaxConns  = 65536
	DefaultParkedHighWater  = 4 << 20
	DefaultPollInterval     = 5 * time.Millisecond
	DefaultRcvBuf           = 1 << 20
	DefaultAdminSocket      = "/run/wsplice/admin.sock"
)

// SetDefaults fills every unset field with its default.
func (c *Config) SetDefaults() {
	if c.Dataplane == "" {
		c.Dataplane = "auto"
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = Duration(DefaultDrainTimeout)
	}
	for i := range c.Listeners {
		l := &c.Listeners[i]
		if l.Mode == "" {
			l.Mode = "websocket"
		}
		if l.Name == "" {
			l.Name = l.Address
		}
		if l.Dataplane == "" {
			l.Dataplane = c.Dataplane
		}
		if l.HandshakeTimeout == 0 {
			l.HandshakeTimeout = Duration(DefaultHandshakeTimeout)
		}
		if l.IdleTimeout == 0 {
			l.IdleTimeout = Duration(DefaultIdleTimeout)
		}
		if l.MaxHeadBytes == 0 {
			l.MaxHeadBytes = DefaultMaxHeadBytes
		}
		if l.MaxHeaders == 0 {
			l.MaxHeaders = DefaultMaxHeaders
		}
		// A websocket listener with one pool and no routes routes everything there.
		if l.Mode == "websocket" && len(l.Routes) == 0 && l.Pool == "" && len(c.Pools) == 1 {
			l.Pool = c.Pools[0].Name
		}
		if (l.Mode == "tcp" || l.Mode == "tls_passthrough") && l.Pool == "" && len(c.Pools) == 1 {
			l.Pool = c.Pools[0].Name
		}
		l.setTLSDefaults()
	}
	for i := range c.Pools {
		p := &c.Pools[i]
		if p.Balance == "" {
			p.Balance = "round_robin"
		}
		if p.HashKey == "" {
			p.HashKey = "client_ip"
		}
		if p.HashFallback == "" {
			p.HashFallback = "round_robin"
		}
		if p.ConnectTimeout == 0 {
			p.ConnectTimeout = Duration(DefaultConnectTimeout)
		}
		if p.MaxTries == 0 {
			p.MaxTries = DefaultMaxTries
		}
		if p.Forward == "" {
			p.Forward = "headers"
		}
		for j := range p.Backends {
			if p.Backends[j].Weight == 0 {
				p.Backends[j].Weight = 1
			}
		}
		h := &p.Health
		if h.Type == "" {
			h.Type = "none"
		}
		if h.Interval == 0 {
			h.Interval = Duration(3 * time.Second)
		}
		if h.Timeout == 0 {
			h.Timeout = Duration(time.Second)
		}
		if h.Rise == 0 {
			h.Rise = 2
		}
		if h.Fall == 0 {
			h.Fall = 3
		}
		if h.Path == "" {
			h.Path = "/"
		}
		if len(h.Expect) == 0 {
			h.Expect = []string{"http_2xx", "http_3xx"}
		}
		if h.FailTimeout == 0 {
			h.FailTimeout = Duration(10 * time.Second)
		}
	}
	s := &c.Sockmap
	if s.MaxConns == 0 {
		s.MaxConns = DefaultSockmapMaxConns
	}
	if s.ParkedHighWater == 0 {
		s.ParkedHighWater = DefaultParkedHighWater
	}
	if s.PollInterval == 0 {
		s.PollInterval = Duration(DefaultPollInterval)
	}
	if s.RcvBuf == 0 {
		s.RcvBuf = DefaultRcvBuf
	}
	// The admin socket is on by default so the CLI finds the agent; "none"
	// turns it off (tests and the demo, which run several agents).
	switch c.Admin.Socket {
	case "":
		c.Admin.Socket = DefaultAdminSocket
	case "none":
		c.Admin.Socket = ""
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.Log.Format == "" {
		c.Log.Format = "text"
	}
	if c.Tune.Mode == "" {
		c.Tune.Mode = "check"
	}
	if c.Limits.MaxConns == 0 {
		c.Limits.MaxConns = DefaultMaxConns
	}
	if c.Limits.IPv6Prefix == 0 {
		c.Limits.IPv6Prefix = 64
	}
	if c.Limits.PerIPRate > 0 && c.Limits.PerIPBurst == 0 {
		c.Limits.PerIPBurst = int(c.Limits.PerIPRate) + 1
	}
	if c.Metrics.MaxSeries == 0 {
		c.Metrics.MaxSeries = 1000
	}
}
