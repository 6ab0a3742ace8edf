package health

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/config"
)

// Resolver is what discovery needs from DNS. *net.Resolver implements it;
// NewResolver returns one that asks a given server.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
	LookupSRV(ctx context.Context, service, proto, name string) (string, []*net.SRV, error)
}

// NewResolver returns a Resolver that sends every query to server
// ("127.0.0.1:5353", "[fd00::10]:53") over UDP, and over TCP when an
// answer is truncated, instead of the servers in /etc/resolv.conf. The
// search list and ndots of /etc/resolv.conf still apply to names without a
// trailing dot; write names fully qualified ("chat.example.com.") to skip
// them. An empty server returns net.DefaultResolver.
func NewResolver(server string) Resolver {
	if server == "" {
		return net.DefaultResolver
	}
	return &serverResolver{server: server, r: &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, server)
		},
	}}
}

// serverResolver asks one server. Go's resolver names the resolv.conf
// server in its errors even when Dial sends the query elsewhere; the
// errors are corrected so a log points at the server that was asked.
type serverResolver struct {
	server string
	r      *net.Resolver
}

func (s *serverResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	ips, err := s.r.LookupNetIP(ctx, network, host)
	return ips, s.fix(err)
}

func (s *serverResolver) LookupSRV(ctx context.Context, service, proto, name string) (string, []*net.SRV, error) {
	cname, recs, err := s.r.LookupSRV(ctx, service, proto, name)
	return cname, recs, s.fix(err)
}

func (s *serverResolver) fix(err error) error {
	var de *net.DNSError
	if errors.As(err, &de) {
		c := *de
		c.Server = s.server
		return &c
	}
	return err
}

// targetKind says how a configured backend address becomes backends.
type targetKind uint8

const (
	targetStatic targetKind = iota // IP:port, used as is
	targetHost                     // name:port, A and AAAA
	targetSRV                      // _service._proto.name, SRV then A/AAAA
)

// target is one configured backend and how to expand it.
type target struct {
	cfg  config.Backend
	kind targetKind
	host string // targetHost: the name; targetSRV: the SRV name
	port uint16 // targetHost
}

// IsSRV reports whether a backend address names an SRV record set: its
// first two labels start with an underscore, as in RFC 2782 and the names
// Kubernetes gives a headless Service's named ports
// ("_ws._tcp.chat.default.svc.cluster.local"). Such an address has no
// port: every SRV record brings its own.
func IsSRV(addr string) bool { return config.IsSRVName(addr) }

// parseTarget classifies a configured backend address.
func parseTarget(b config.Backend) (target, error) {
	t := target{cfg: b}
	if IsSRV(b.Address) {
		t.kind, t.host = targetSRV, b.Address
		return t, nil
	}
	if _, err := netip.ParseAddrPort(b.Address); err == nil {
		t.kind = targetStatic
		return t, nil
	}
	host, port, err := net.SplitHostPort(b.Address)
	if err != nil {
		return t, fmt.Errorf("backend %q: not host:port, IP:port or an SRV name (_service._proto.name)", b.Address)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return t, fmt.Errorf("backend %q: port must be 1 to 65535", b.Address)
	}
	if host == "" {
		return t, fmt.Errorf("backend %q has no host", b.Address)
	}
	t.kind, t.host, t.port = targetHost, host, uint16(n)
	return t, nil
}

// endpoint is one resolved backend of a target.
type endpoint struct {
	addr   string // host:port as the pool sees it
	backup bool   // an SRV record of a less preferred priority
}

// resolveTargets expands every target, the DNS ones concurrently, each
// bounded by timeout (a resolv.conf server that does not answer would
// otherwise hold a round for its timeout × attempts × servers).
func resolveTargets(ctx context.Context, r Resolver, timeout time.Duration, targets []target) ([][]endpoint, []error) {
	eps := make([][]endpoint, len(targets))
	errs := make([]error, len(targets))
	var wg sync.WaitGroup
	for i, t := range targets {
		if t.kind == targetStatic {
			eps[i] = []endpoint{{addr: t.cfg.Address}}
			continue
		}
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			eps[i], errs[i] = resolve(ctx, r, t)
		})
	}
	wg.Wait()
	return eps, errs
}

// resolve expands t. A static target expands to itself without I/O.
func resolve(ctx context.Context, r Resolver, t target) ([]endpoint, error) {
	switch t.kind {
	case targetStatic:
		return []endpoint{{addr: t.cfg.Address}}, nil
	case targetHost:
		ips, err := r.LookupNetIP(ctx, "ip", t.host)
		if err != nil {
			return nil, err
		}
		return hostEndpoints(ips, t.port, false), nil
	}
	_, recs, err := r.LookupSRV(ctx, "", "", t.host)
	if err != nil && len(recs) == 0 {
		return nil, err
	}
	if len(recs) == 0 {
		return nil, fmt.Errorf("lookup %s: no SRV records", t.host)
	}
	// The lowest priority value is preferred (RFC 2782); records of other
	// priorities become backups. SRV weights are ignored: the configured
	// weight applies to every target (Kubernetes gives all the same).
	best := slices.MinFunc(recs, func(a, b *net.SRV) int { return cmp.Compare(a.Priority, b.Priority) }).Priority
	type result struct {
		eps []endpoint
		err error
	}
	res := make([]result, len(recs))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i, rec := range recs {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			ips, err := r.LookupNetIP(ctx, "ip", rec.Target)
			if err != nil {
				res[i].err = err
				return
			}
			res[i].eps = hostEndpoints(ips, rec.Port, rec.Priority != best)
		})
	}
	wg.Wait()
	var out []endpoint
	for _, x := range res {
		if x.err != nil {
			// One target that does not resolve fails the round for the
			// whole name, so the last good set is kept rather than
			// shrunk by a transient error.
			return nil, x.err
		}
		out = append(out, x.eps...)
	}
	return out, nil
}

// hostEndpoints turns addresses into sorted, unique host:port endpoints,
// so the same answer in a different order is the same set.
func hostEndpoints(ips []netip.Addr, port uint16, backup bool) []endpoint {
	out := make([]endpoint, 0, len(ips))
	for _, ip := range ips {
		out = append(out, endpoint{addr: netip.AddrPortFrom(ip.Unmap(), port).String(), backup: backup})
	}
	slices.SortFunc(out, func(a, b endpoint) int { return strings.Compare(a.addr, b.addr) })
	return slices.CompactFunc(out, func(a, b endpoint) bool { return a.addr == b.addr })
}

// buildSpecs turns expanded targets into the pool's backend specs, in
// config order then address order. An address reached through two targets
// is kept once, from the first. scale multiplies the weights (see
// weightScale).
func buildSpecs(targets []target, eps [][]endpoint, scale int) (specs []balance.BackendSpec, source map[string]string) {
	source = map[string]string{}
	for i, t := range targets {
		w := t.cfg.Weight
		if w <= 0 {
			w = 1
		}
		for _, e := range eps[i] {
			if _, dup := source[e.addr]; dup {
				continue
			}
			source[e.addr] = t.cfg.Address
			specs = append(specs, balance.BackendSpec{
				Address:  e.addr,
				Weight:   w * scale,
				Backup:   t.cfg.Backup || e.backup,
				Down:     t.cfg.Down,
				MaxConns: t.cfg.MaxConns,
			})
		}
	}
	return specs, source
}
