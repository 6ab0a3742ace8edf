package proxy

import (
	"net/netip"
	"strconv"
	"strings"

	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/handshake"
)

// route is a compiled config.Route.
type route struct {
	name        string // "host/path" for logs and metrics
	host        string // exact, "*.suffix" or ""
	path        string // prefix, or exact when exact is set
	exact       bool
	pool        *pool
	upgradeOnly bool
	origins     []string
	key         hashKey
}

// pool is a balance.Pool with the proxy's per-pool settings.
type pool struct {
	*balance.Pool
	cfg config.Pool
	key hashKey
}

// match reports whether the route serves host and path. Host comparison is
// case-insensitive and ignores the port.
func (r *route) match(host, path string) bool {
	if r.host != "" && !matchHost(r.host, stripPort(host)) {
		return false
	}
	if r.exact {
		return path == r.path
	}
	return strings.HasPrefix(path, r.path)
}

// matchHost matches an exact name or a "*.example.com" wildcard, which like
// nginx's server_name covers sub.example.com but not example.com.
func matchHost(pattern, host string) bool {
	if suffix, ok := strings.CutPrefix(pattern, "*"); ok {
		return len(host) > len(suffix) && strings.HasSuffix(strings.ToLower(host), strings.ToLower(suffix))
	}
	return strings.EqualFold(pattern, host)
}

func stripPort(host string) string {
	if strings.HasPrefix(host, "[") {
		if i := strings.IndexByte(host, ']'); i > 0 {
			return host[1:i]
		}
		return host
	}
	if i := strings.LastIndexByte(host, ':'); i >= 0 {
		return host[:i]
	}
	return host
}

// originAllowed checks the Origin header against the route's allow-list.
// Browsers always send Origin on a WebSocket upgrade; a request without one
// is not from a browser and is allowed only when no list is configured.
func (r *route) originAllowed(origin string) bool {
	if len(r.origins) == 0 {
		return true
	}
	// Origin is scheme://host[:port]; patterns may name the host only.
	host := origin
	if i := strings.Index(host, "://"); i >= 0 {
		host = host[i+3:]
	}
	for _, o := range r.origins {
		if strings.EqualFold(o, origin) || matchHost(o, stripPort(host)) || strings.EqualFold(o, host) {
			return true
		}
	}
	return false
}

// hashKey says what a pool's consistent hash reads from a connection.
type hashKey struct {
	kind   string // client_ip, header, cookie, query, path, uri, client_port
	name   string
	prefix int // for client_ip: bits kept (IPv4); -1 = all
}

func parseHashKey(s string) hashKey {
	kind, name, _ := strings.Cut(s, ":")
	k := hashKey{kind: kind, name: name, prefix: -1}
	if ip, p, ok := strings.Cut(s, "/"); ok && ip == "client_ip" {
		k.kind = "client_ip"
		k.prefix, _ = strconv.Atoi(p)
	}
	return k
}

// compute derives the key for one connection; req is nil in tcp mode.
func (k hashKey) compute(req *handshake.Request, client netip.Addr) balance.Key {
	switch k.kind {
	case "client_ip":
		// client_ip/N: N ≤ 32 is an IPv4 prefix (nginx ip_hash keeps /24)
		// and IPv6 clients are grouped by /64, their usual subnet; N > 32
		// is an IPv6 prefix and IPv4 keeps the whole address.
		v4, v6 := 32, 128
		switch {
		case k.prefix > 32:
			v6 = k.prefix
		case k.prefix > 0:
			v4, v6 = k.prefix, 64
		}
		return balance.HashAddr(client, v4, v6)
	}
	if req == nil {
		return balance.Key{}
	}
	var v string
	switch k.kind {
	case "header":
		v = req.Header(k.name)
	case "cookie":
		v = req.Cookie(k.name)
	case "query":
		v = req.Query(k.name)
	case "path":
		v = req.Path
	case "uri":
		v = req.Target
	}
	if v == "" {
		return balance.Key{}
	}
	return balance.HashString(v)
}
