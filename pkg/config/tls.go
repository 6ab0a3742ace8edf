package config

import (
	"fmt"
	"strings"
	"time"
)

// Choices for the TLS fields; validateTLS names them in its errors.
var (
	TLSVersions   = []string{"1.2", "1.3"}
	UnknownSNIs   = []string{"default", "reject"}
	ClientAuths   = []string{"require", "optional"}
	SNIFallbacks  = []string{"pool", "close"}
	SNIHashPrefix = "sni" // hash key that hashes the ClientHello's server name
)

// Defaults for the TLS, SNI and Keepalive fields, applied by setTLSDefaults.
const (
	DefaultTLSWatchInterval = 5 * time.Second
	DefaultMaxHelloBytes    = 16 << 10
	// Keepalive: a first probe after 30 s of silence keeps NAT and cloud
	// balancer entries alive (common idle timeouts are 60 s to 350 s), and
	// a peer that answers none of 3 probes 10 s apart is dead after 60 s.
	DefaultKeepaliveIdle     = 30 * time.Second
	DefaultKeepaliveInterval = 10 * time.Second
	DefaultKeepaliveCount    = 3
)

// TLS terminates TLS on a websocket or tcp listener (nginx `listen 443
// ssl`), and optionally speaks TLS to the backends (nginx proxy_ssl).
// Terminated connections are moved by the userspace copy plane: the kernel
// here has no kTLS, so the bytes must pass through the agent to be
// decrypted.
type TLS struct {
	// Certificates are PEM certificate chains with their keys. The one
	// whose names (DNS subject alternative names, "*.example.com" covering
	// one label) match the client's SNI is served; the first one when the
	// client sends no SNI or an unknown one (see UnknownSNI). With none,
	// the listener does not terminate TLS and only Backend applies.
	Certificates []Certificate `yaml:"certificates"`
	// MinVersion is the lowest TLS version accepted: "1.2" (default) or
	// "1.3". TLS 1.0 and 1.1 are always refused.
	MinVersion string `yaml:"min_version"`
	// UnknownSNI is what a client asking for a name no certificate covers
	// gets: "default" (the first certificate) or "reject" (a handshake
	// failure, nginx ssl_reject_handshake).
	UnknownSNI string `yaml:"unknown_sni"`
	// ClientCA, when set, is a PEM bundle of CAs that client certificates
	// must chain to (nginx ssl_verify_client with ssl_client_certificate).
	ClientCA string `yaml:"client_ca"`
	// ClientAuth is "require" (default: no valid certificate, no
	// connection) or "optional" (a certificate that is sent must be valid).
	ClientAuth string `yaml:"client_auth"`
	// WatchInterval is how often the certificate and CA files are checked
	// for changes (size, time, inode); a change reloads them. A file that
	// does not load leaves the previous certificates serving. Default 5s.
	WatchInterval Duration `yaml:"watch_interval"`
	// Backend, when set, makes connections to the backends TLS.
	Backend *BackendTLS `yaml:"backend"`
}

// Certificate is one PEM certificate chain (leaf first) and its key.
type Certificate struct {
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// BackendTLS is TLS from the agent to the backends (nginx proxy_ssl on,
// proxy_ssl_verify on, proxy_ssl_trusted_certificate, proxy_ssl_name,
// proxy_ssl_certificate).
type BackendTLS struct {
	// CA is a PEM bundle the backends' certificates must chain to; empty
	// uses the system roots.
	CA string `yaml:"ca"`
	// ServerName is sent as SNI and is the name the backend's certificate
	// must hold; empty uses each backend's host (an IP address is then
	// checked against the certificate's IP addresses and no SNI is sent).
	ServerName string `yaml:"server_name"`
	// InsecureSkipVerify accepts any backend certificate. Only for tests.
	InsecureSkipVerify bool `yaml:"insecure_skip_verify"`
	// Cert and Key are a client certificate presented to the backends.
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// SNI routes a tls_passthrough listener by the ClientHello's server name
// without decrypting (nginx stream ssl_preread, HAProxy req.ssl_sni). Only
// the ClientHello is read (bounded by MaxHelloBytes and the listener's
// handshake_timeout); it is forwarded to the chosen backend and the rest of
// the stream goes to the data plane like a tcp listener's.
type SNI struct {
	// Routes map server names to pools, first match wins. A name is exact
	// ("chat.example.com") or a wildcard ("*.example.com", which covers
	// every name ending in .example.com, like nginx server_name).
	// A name no route matches goes to the listener's pool, or is closed
	// when the listener has none.
	Routes []SNIRoute `yaml:"routes"`
	// HashKey is the default hash key: "sni" (the server name), or any
	// client_ip form; empty uses the pool's hash_key.
	HashKey string `yaml:"hash_key"`
	// NoSNI is what happens to a valid ClientHello without a server name:
	// "pool" (the listener's pool; closed if it has none; the default) or
	// "close".
	NoSNI string `yaml:"no_sni"`
	// Malformed is what happens to a connection whose first bytes are not
	// a valid TLS ClientHello: "close" (default) or "pool".
	Malformed string `yaml:"malformed"`
	// MaxHelloBytes bounds the bytes read to find the ClientHello
	// (default 16384; 1024 to 262144).
	MaxHelloBytes int `yaml:"max_hello_bytes"`
}

// SNIRoute sends ClientHellos with a matching server name to a pool.
type SNIRoute struct {
	ServerName string `yaml:"server_name"`
	Pool       string `yaml:"pool"`
	// HashKey overrides SNI.HashKey for this route.
	HashKey string `yaml:"hash_key"`
}

// Keepalive keeps NAT and cloud-balancer state alive on idle connections
// and detects dead peers (nginx so_keepalive, HAProxy clitcpka-*/srvtcpka-*),
// separately for the client and the backend socket.
type Keepalive struct {
	Client  KeepaliveSide `yaml:"client"`
	Backend KeepaliveSide `yaml:"backend"`
}

// KeepaliveSide is TCP keepalive and TCP_USER_TIMEOUT for one socket of
// each connection.
type KeepaliveSide struct {
	// Enabled turns keepalive probes on (default true). Off, the socket
	// has neither keepalive nor a user timeout.
	Enabled *bool `yaml:"enabled"`
	// Idle is the silence before the first probe (TCP_KEEPIDLE, whole
	// seconds). Default 30s.
	Idle Duration `yaml:"idle"`
	// Interval is the time between unanswered probes (TCP_KEEPINTVL).
	// Default 10s.
	Interval Duration `yaml:"interval"`
	// Count is how many unanswered probes mean the peer is dead
	// (TCP_KEEPCNT). Default 3.
	Count int `yaml:"count"`
	// UserTimeout is TCP_USER_TIMEOUT: how long sent data (or a probe) may
	// stay unacknowledged before the kernel gives up on the peer. Default
	// idle + interval × count. It also bounds how long a peer may keep a
	// zero window: a reader stalled for longer is closed.
	UserTimeout Duration `yaml:"user_timeout"`
}

// On reports whether keepalive is enabled for this side.
func (k KeepaliveSide) On() bool { return k.Enabled == nil || *k.Enabled }

// setTLSDefaults fills the unset TLS, SNI and Keepalive fields of l.
func (l *Listener) setTLSDefaults() {
	if t := l.TLS; t != nil {
		if t.MinVersion == "" {
			t.MinVersion = "1.2"
		}
		if t.UnknownSNI == "" {
			t.UnknownSNI = "default"
		}
		if t.ClientAuth == "" && t.ClientCA != "" {
			t.ClientAuth = "require"
		}
		if t.WatchInterval == 0 {
			t.WatchInterval = Duration(DefaultTLSWatchInterval)
		}
	}
	if l.Mode == "tls_passthrough" && l.SNI == nil {
		l.SNI = &SNI{}
	}
	if s := l.SNI; s != nil {
		if s.NoSNI == "" {
			s.NoSNI = "pool"
		}
		if s.Malformed == "" {
			s.Malformed = "close"
		}
		if s.MaxHelloBytes == 0 {
			s.MaxHelloBytes = DefaultMaxHelloBytes
		}
	}
	for _, k := range []*KeepaliveSide{&l.Keepalive.Client, &l.Keepalive.Backend} {
		if k.Enabled == nil {
			on := true
			k.Enabled = &on
		}
		if k.Idle == 0 {
			k.Idle = Duration(DefaultKeepaliveIdle)
		}
		if k.Interval == 0 {
			k.Interval = Duration(DefaultKeepaliveInterval)
		}
		if k.Count == 0 {
			k.Count = DefaultKeepaliveCount
		}
		if k.UserTimeout == 0 {
			k.UserTimeout = k.Idle + k.Interval*Duration(k.Count)
		}
	}
}

// validateTLS checks a listener's TLS, SNI and Keepalive settings; field is
// the listener's path ("listeners[0]"). It fills their defaults first
// (idempotent), so a config validated without SetDefaults is judged on the
// values that will run.
func validateTLS(l *Listener, field string, bad func(field, format string, args ...any)) {
	l.setTLSDefaults()
	oneOf := func(f, v string, choices []string) {
		for _, c := range choices {
			if v == c {
				return
			}
		}
		bad(f, "%q is not one of %s", v, strings.Join(choices, ", "))
	}
	if t := l.TLS; t != nil {
		f := field + ".tls"
		if l.Mode == "tls_passthrough" {
			bad(f, "a tls_passthrough listener never decrypts: remove tls, or use mode websocket to terminate TLS here")
		}
		if len(t.Certificates) == 0 && t.Backend == nil {
			bad(f+".certificates", "no certificate: add {cert: FILE, key: FILE} (PEM), or remove tls")
		}
		for i, c := range t.Certificates {
			cf := fmt.Sprintf("%s.certificates[%d]", f, i)
			if c.Cert == "" {
				bad(cf+".cert", "empty: the path of a PEM certificate chain, leaf first")
			}
			if c.Key == "" {
				bad(cf+".key", "empty: the path of the PEM private key of %s", c.Cert)
			}
		}
		oneOf(f+".min_version", t.MinVersion, TLSVersions)
		oneOf(f+".unknown_sni", t.UnknownSNI, UnknownSNIs)
		if t.ClientCA != "" {
			oneOf(f+".client_auth", t.ClientAuth, ClientAuths)
		} else if t.ClientAuth != "" {
			bad(f+".client_auth", "set without client_ca: give the PEM bundle of CAs that client certificates must chain to")
		}
		if (t.ClientCA != "" || t.UnknownSNI == "reject") && len(t.Certificates) == 0 {
			bad(f+".certificates", "client_ca and unknown_sni need a terminating listener: add a certificate")
		}
		if t.WatchInterval.D() < time.Second {
			bad(f+".watch_interval", "%s is too short: use at least 1s (default 5s)", t.WatchInterval.D())
		}
		if b := t.Backend; b != nil {
			if (b.Cert == "") != (b.Key == "") {
				bad(f+".backend", "cert and key go together: set both for a client certificate, or neither")
			}
			if b.ServerName != "" && !validServerName(b.ServerName) {
				bad(f+".backend.server_name", "%q is not a host name", b.ServerName)
			}
			if b.InsecureSkipVerify && b.CA != "" {
				bad(f+".backend.insecure_skip_verify", "set together with ca: the CA would never be used; remove one")
			}
		}
	}

	if s := l.SNI; s != nil {
		f := field + ".sni"
		if l.Mode != "tls_passthrough" {
			bad(f, "sni routing needs mode tls_passthrough (a terminating listener routes by Host with routes)")
		}
		if l.Mode == "tls_passthrough" && len(s.Routes) == 0 && l.Pool == "" {
			bad(f+".routes", "no route and no pool: add sni.routes or set pool")
		}
		for j, r := range s.Routes {
			rf := fmt.Sprintf("%s.routes[%d]", f, j)
			name := strings.TrimPrefix(r.ServerName, "*.")
			if r.ServerName == "" {
				bad(rf+".server_name", "empty: write a name (chat.example.com) or a wildcard (*.example.com); unmatched names go to the listener's pool")
			} else if strings.Contains(name, "*") || !validServerName(name) {
				bad(rf+".server_name", "%q: write a host name, with a wildcard only as the whole first label (*.example.com)", r.ServerName)
			}
			if r.Pool == "" {
				bad(rf+".pool", "empty: name the pool that serves this name")
			}
			if r.HashKey != "" {
				if err := checkSNIHashKey(r.HashKey); err != nil {
					bad(rf+".hash_key", "%v", err)
				}
			}
		}
		if s.HashKey != "" {
			if err := checkSNIHashKey(s.HashKey); err != nil {
				bad(f+".hash_key", "%v", err)
			}
		}
		oneOf(f+".no_sni", s.NoSNI, SNIFallbacks)
		oneOf(f+".malformed", s.Malformed, SNIFallbacks)
		if s.MaxHelloBytes < 1024 || s.MaxHelloBytes > 256<<10 {
			bad(f+".max_hello_bytes", "%d is out of range: use 1024 to 262144", s.MaxHelloBytes)
		}
	}
	if l.Mode == "tls_passthrough" && len(l.Routes) > 0 {
		bad(field+".routes", "a tls_passthrough listener cannot read HTTP: route by server name with sni.routes")
	}

	for _, side := range []struct {
		name string
		k    KeepaliveSide
	}{{"client", l.Keepalive.Client}, {"backend", l.Keepalive.Backend}} {
		f := field + ".keepalive." + side.name
		k := side.k
		if !k.On() {
			continue
		}
		// The kernel takes whole seconds, at most 32767, for idle and interval.
		if k.Idle.D() < time.Second || k.Idle.D() > 32767*time.Second || k.Idle.D()%time.Second != 0 {
			bad(f+".idle", "%s: use whole seconds from 1s to 32767s (below 60s keeps NAT state alive)", k.Idle.D())
		}
		if k.Interval.D() < time.Second || k.Interval.D() > 32767*time.Second || k.Interval.D()%time.Second != 0 {
			bad(f+".interval", "%s: use whole seconds from 1s to 32767s", k.Interval.D())
		}
		if k.Count < 1 || k.Count > 127 {
			bad(f+".count", "%d is out of range: use 1 to 127", k.Count)
		}
		if k.UserTimeout.D() < time.Second || k.UserTimeout.D() > 24*time.Hour {
			bad(f+".user_timeout", "%s is out of range: use 1s to 24h (default idle + interval × count)", k.UserTimeout.D())
		}
	}
}

// checkSNIHashKey accepts the hash keys that make sense without HTTP.
func checkSNIHashKey(k string) error {
	if k == SNIHashPrefix || k == "client_port" {
		return nil
	}
	if k == "client_ip" || strings.HasPrefix(k, "client_ip/") {
		return CheckHashKey(k)
	}
	return fmt.Errorf("%q is not a passthrough hash key: use sni, client_ip or client_ip/N", k)
}

// validServerName reports whether s is a DNS host name as SNI carries it:
// letters, digits, '-', '_' and dots, labels of 1 to 63 bytes, at most 253
// bytes, no trailing dot.
func validServerName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}
