package admin

import (
	"net"
	"net/netip"
	"strings"
)

// MatchBackend reports whether the backend addr of pool matches spec, the
// way the CLI names backends: "host:port" (in any pool), "host" (every port
// of that host), or "pool/host:port" and "pool/host" (in that pool only).
func MatchBackend(spec, pool, addr string) bool {
	if p, rest, ok := strings.Cut(spec, "/"); ok {
		if p != pool {
			return false
		}
		spec = rest
	}
	if spec == "" {
		return false
	}
	if spec == addr {
		return true
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	return strings.TrimSuffix(strings.TrimPrefix(spec, "["), "]") == host
}

// ClientFilter matches client addresses; see ParseClientFilter.
type ClientFilter func(netip.AddrPort) bool

// ParseClientFilter parses an address ("192.0.2.7", "2001:db8::1"), an
// address and port ("192.0.2.7:41000", "[2001:db8::1]:41000") or a prefix
// ("192.0.2.0/24"). IPv4 clients of a dual-stack listener (::ffff:a.b.c.d)
// match their IPv4 form. An empty spec matches every client.
func ParseClientFilter(spec string) (ClientFilter, error) {
	if spec == "" {
		return func(netip.AddrPort) bool { return true }, nil
	}
	if ap, err := netip.ParseAddrPort(spec); err == nil {
		ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		return func(c netip.AddrPort) bool { return c.Addr().Unmap() == ap.Addr() && c.Port() == ap.Port() }, nil
	}
	if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(spec, "["), "]")); err == nil {
		a = a.Unmap()
		return func(c netip.AddrPort) bool { return c.Addr().Unmap() == a }, nil
	}
	if p, err := netip.ParsePrefix(spec); err == nil {
		p = p.Masked()
		return func(c netip.AddrPort) bool { return p.Contains(c.Addr().Unmap()) }, nil
	}
	return nil, Invalidf("client %q: give an address, address:port or prefix (192.0.2.7, 192.0.2.7:41000, 192.0.2.0/24)", spec)
}
