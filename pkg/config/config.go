// Package config turns a YAML file or command-line flags into one validated
// Config. Decoding is strict (an unknown field is an error) and every error
// names the field and says how to fix it, so a bad config never reaches the
// kernel.
package config

import (
	"time"
)

// Config is the whole agent configuration.
type Config struct {
	Listeners []Listener `yaml:"listeners"`
	Pools     []Pool     `yaml:"pools"`

	// Dataplane is the default data plane for listeners that do not set
	// one: auto (sockmap when the kernel allows, else splice), sockmap, or
	// splice.
	Dataplane string `yaml:"dataplane"`
	// Sockmap tunes the in-kernel data plane.
	Sockmap Sockmap `yaml:"sockmap"`

	// DrainTimeout is how long established connections get to finish after
	// SIGTERM before they are closed (gradually).
	DrainTimeout Duration `yaml:"drain_timeout"`

	Admin   Admin   `yaml:"admin"`
	Metrics Metrics `yaml:"metrics"`
	Log     Log     `yaml:"log"`
	Tune    Tune    `yaml:"tune"`
	Limits  Limits  `yaml:"limits"`
}

// Listener is one listening socket and how its connections are handled.
type Listener struct {
	// Name identifies the listener in logs and metrics; defaults to Address.
	Name string `yaml:"name"`
	// Address is host:port to listen on (":8080", "[::]:443").
	Address string `yaml:"address"`
	// Mode is "websocket" (read the HTTP/1.1 upgrade head) or "tcp" (pure L4).
	Mode string `yaml:"mode"`
	// Dataplane overrides Config.Dataplane for this listener.
	Dataplane string `yaml:"dataplane"`
	// Routes map Host and path prefix to a pool (websocket mode). The first
	// match wins, in order.
	Routes []Route `yaml:"routes"`
	// Pool is the pool for tcp mode, and the fallback route for websocket
	// mode when no route matches (empty: unmatched requests get 404).
	Pool string `yaml:"pool"`
	// Backlog is the listen(2) backlog; 0 follows net.core.somaxconn.
	Backlog int `yaml:"backlog"`
	// HandshakeTimeout bounds reading the request head and the backend's
	// response head (nginx client_header_timeout).
	HandshakeTimeout Duration `yaml:"handshake_timeout"`
	// IdleTimeout closes a connection with no bytes either way for this long
	// (nginx proxy_read_timeout). 0 = never.
	IdleTimeout Duration `yaml:"idle_timeout"`
	// MaxHeadBytes bounds the request head (nginx large_client_header_buffers).
	MaxHeadBytes int `yaml:"max_head_bytes"`
	// MaxHeaders bounds the number of request header fields.
	MaxHeaders int `yaml:"max_headers"`
	// TLS terminates TLS on a websocket listener (see tls.go).
	TLS *TLS `yaml:"tls"`
	// SNI configures a tls_passthrough listener (see tls.go).
	SNI *SNI `yaml:"sni"`
	// Keepalive sets TCP keepalive and TCP_USER_TIMEOUT on both sockets.
	Keepalive Keepalive `yaml:"keepalive"`
}

// Route sends matching requests to a pool.
type Route struct {
	// Host matches the Host header: exact ("ws.example.com"), wildcard
	// ("*.example.com"), or empty for any.
	Host string `yaml:"host"`
	// Path is a prefix ("/ws/"), or an exact match when it starts with "="
	// ("=/ws"), like nginx location. Empty matches every path.
	Path string `yaml:"path"`
	// Pool is the name of the pool that serves the route.
	Pool string `yaml:"pool"`
	// UpgradeOnly answers 426 to requests that are not WebSocket upgrades;
	// otherwise they are forwarded with Connection: close.
	UpgradeOnly bool `yaml:"upgrade_only"`
	// AllowedOrigins, when set, is the Origin allow-list (exact or
	// "*.example.com"); others get 403.
	AllowedOrigins []string `yaml:"allowed_origins"`
	// HashKey overrides the pool's hash key for this route.
	HashKey string `yaml:"hash_key"`
}

// Pool is a set of backends and how to choose among them (nginx upstream).
type Pool struct {
	Name     string    `yaml:"name"`
	Backends []Backend `yaml:"backends"`
	// Balance is the algorithm: round_robin, least_conn, maglev (consistent
	// hash), random_two (power of two choices), first.
	Balance string `yaml:"balance"`
	// HashKey is what maglev hashes: client_ip, client_ip/24 (prefix),
	// header:NAME, cookie:NAME, query:NAME, path, uri.
	HashKey string `yaml:"hash_key"`
	// HashFallback is the algorithm used when the key is missing from a
	// request: round_robin (default), least_conn, random_two, first.
	HashFallback string `yaml:"hash_fallback"`
	// MaglevTableSize is the Maglev lookup table size: a prime ≥ 100 × the
	// number of backends. 0 picks one.
	MaglevTableSize int `yaml:"maglev_table_size"`
	// BalanceFactor is ε of consistent hashing with bounded loads (HAProxy
	// hash-balance-factor as a fraction: 0.25 = 125%). 0 = off.
	BalanceFactor float64 `yaml:"balance_factor"`
	// ConnectTimeout bounds the TCP connect to a backend (nginx
	// proxy_connect_timeout).
	ConnectTimeout Duration `yaml:"connect_timeout"`
	// MaxTries bounds backends tried for one connection (nginx
	// proxy_next_upstream_tries).
	MaxTries int `yaml:"max_tries"`
	// Forward says how the client address reaches the backend: headers
	// (X-Forwarded-For, X-Real-IP, X-Forwarded-Proto), proxy_v1, proxy_v2,
	// or none.
	Forward string `yaml:"forward"`
	// Health configures active and passive checks.
	Health Health `yaml:"health"`
}

// Backend is one upstream server.
type Backend struct {
	// Address is host:port, or a DNS SRV name such as
	// "_ws._tcp.chat.default.svc.cluster.local" (a Kubernetes headless
	// Service; ports come from the records). Names are resolved at start and
	// re-resolved every few seconds; every A/AAAA address becomes a backend.
	Address string `yaml:"address"`
	// Weight is the relative share of new connections (default 1).
	Weight int `yaml:"weight"`
	// Backup backends take traffic only when no primary is healthy.
	Backup bool `yaml:"backup"`
	// Down marks the backend as permanently unavailable (nginx "down").
	Down bool `yaml:"down"`
	// MaxConns caps concurrent connections to this backend (0 = no cap).
	MaxConns int `yaml:"max_conns"`
}

// Health configures backend health checking (see package health).
type Health struct {
	// Type is the active check: none, tcp, http, websocket.
	Type     string   `yaml:"type"`
	Interval Duration `yaml:"interval"`
	Timeout  Duration `yaml:"timeout"`
	Rise     int      `yaml:"rise"`
	Fall     int      `yaml:"fall"`
	// Path and Host are used by the http and websocket checks.
	Path string `yaml:"path"`
	Host string `yaml:"host"`
	// Expect lists accepted status classes for http: http_2xx, http_3xx…
	Expect []string `yaml:"expect"`
	// MaxFails within FailTimeout marks a backend down for FailTimeout
	// (passive checks; nginx max_fails / fail_timeout). 0 disables.
	MaxFails    int      `yaml:"max_fails"`
	FailTimeout Duration `yaml:"fail_timeout"`
	// SlowStart ramps a recovered backend's share over this time.
	SlowStart Duration `yaml:"slow_start"`
}

// Sockmap tunes the kernel data plane and its demotion to splice.
type Sockmap struct {
	// MaxConns sizes the BPF maps (connections on the kernel path at once).
	MaxConns int `yaml:"max_conns"`
	// ParkedHighWater demotes a connection to splice when the bytes parked
	// in the kernel for one direction pass it (bytes).
	ParkedHighWater int64 `yaml:"parked_high_water"`
	// RateLimit demotes a connection whose rate passes this many bytes per
	// second in one direction (0 = off): a bulk flow, better on splice.
	RateLimit int64 `yaml:"rate_limit"`
	// PollInterval is how often parked bytes are checked.
	PollInterval Duration `yaml:"poll_interval"`
	// RcvBuf is SO_RCVBUF set on both sockets at insertion (bytes).
	RcvBuf int `yaml:"rcvbuf"`
}

// Admin is the control API on a Unix socket.
type Admin struct {
	// Socket is the Unix socket path (default /run/wsplice/admin.sock);
	// "none" disables the admin API.
	Socket string `yaml:"socket"`
	// TakeoverSocket is where the agent waits for a new agent started with
	// `wsplice run --take-over` to hand it everything (the next pod of a
	// DaemonSet rolling update, in a directory both pods mount). Empty
	// (the default) disables it; `wsplice upgrade` does not need it.
	TakeoverSocket string `yaml:"takeover_socket"`
}

// Metrics is the Prometheus endpoint.
type Metrics struct {
	// Address is host:port for /metrics and /healthz, /readyz; empty disables.
	Address string `yaml:"address"`
	// PerConnection enables per-connection series, at most MaxSeries.
	PerConnection bool `yaml:"per_connection"`
	MaxSeries     int  `yaml:"max_series"`
}

// Log configures the agent log and the access log.
type Log struct {
	// Level is debug, info, warn or error.
	Level string `yaml:"level"`
	// Format is text or json, for both logs.
	Format string `yaml:"format"`
	// Access is where access-log lines go: "" (off), "stdout", "stderr" or
	// a file path.
	Access string `yaml:"access"`
	// AccessInterval, when set, also logs long-lived connections periodically.
	AccessInterval Duration `yaml:"access_interval"`
}

// Tune says what the agent does with host settings at start.
type Tune struct {
	// Mode is off, check (warn only) or apply.
	Mode string `yaml:"mode"`
}

// Limits protect the agent from hostile or broken clients.
type Limits struct {
	// MaxConns is the global cap on client connections.
	MaxConns int `yaml:"max_conns"`
	// PerIPConns caps concurrent connections per client address (nginx
	// limit_conn). 0 = off.
	PerIPConns int `yaml:"per_ip_conns"`
	// PerIPRate and PerIPBurst bound new connections per second per client
	// address (nginx limit_req). 0 = off.
	PerIPRate  float64 `yaml:"per_ip_rate"`
	PerIPBurst int     `yaml:"per_ip_burst"`
	// IPv6Prefix groups IPv6 clients for per-IP limits (default 64).
	IPv6Prefix int `yaml:"ipv6_prefix"`
}

// Duration is a time.Duration written as "30s", "1h", "7d".
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }
