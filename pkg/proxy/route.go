package proxy

import (
	"net/netip"
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
	key         balance.KeySpec
}

// pool is a balance.Pool with the proxy's per-pool settings.
type pool struct {
	*balance.Pool
	cfg config.Pool
	key balance.KeySpec
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

// parseHashKey compiles a validated hash_key expression.
func parseHashKey(s string) balance.KeySpec {
	k, _ := balance.ParseKeySpec(s) // config.Validate already checked it
	return k
}

// keyFor derives a connection's hash key; req is nil in tcp mode.
func keyFor(k balance.KeySpec, req *handshake.Request, client netip.AddrPort) balance.Key {
	in := balance.KeyInput{Client: client}
	if req != nil {
		in.Target = req.Target
		in.Header = func(name string) (string, bool) {
			v := req.Header(name)
			return v, v != ""
		}
	}
	return k.Key(&in)
}
