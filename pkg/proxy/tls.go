package proxy

// TLS on listeners (issue 13): termination with certificates chosen by SNI
// (the connection then moves on the userspace copy plane), TLS to the
// backends, and tls_passthrough listeners that route by the ClientHello's
// server name without decrypting (the encrypted stream then moves on
// sockmap or splice like a tcp listener's). The hooks into the rest of the
// proxy are marked "(tls.go)" where they are called.

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/dataplane"
	"github.com/wsplice/wsplice/pkg/handshake"
	"github.com/wsplice/wsplice/pkg/tlsterm"
)

// Refusal reasons of tls_passthrough listeners and backend TLS. Those of a
// failed termination handshake are tlsterm's Reason constants
// (tls_timeout, tls_not_tls, tls_version, tls_unknown_sni, tls_client_cert,
// tls_handshake).
const (
	RefuseTLSNoSNI        = "tls_no_sni"             // ClientHello without a server name, no_sni: close
	RefuseTLSUnknownSNI   = tlsterm.ReasonUnknownSNI // no route for the name and no default pool
	RefuseTLSMalformed    = "tls_malformed_hello"    // not a valid ClientHello, malformed: close
	RefuseTLSHelloTooBig  = "tls_hello_too_large"    // no ClientHello within sni.max_hello_bytes
	RefuseTLSHelloTimeout = "tls_hello_timeout"      // no ClientHello within handshake_timeout
	RefuseBackendTLS      = "backend_tls"            // the TLS handshake with the backend failed
)

// clientConn is the client's byte stream as the handshake code uses it:
// the *net.TCPConn itself, or the *tls.Conn terminated over it.
type clientConn interface {
	net.Conn
	CloseWrite() error
}

// tlsListener is the TLS part of a compiled listener.
type tlsListener struct {
	store   *tlsterm.Store   // terminate TLS (nil: clients speak plain TCP)
	backend *tlsterm.Backend // TLS to backends (nil: plain)
	sni     *sniTable        // tls_passthrough routing (nil otherwise)
}

// sniTable routes a passthrough listener by server name.
type sniTable struct {
	routes    []sniRoute
	noSNI     string // "pool" or "close"
	malformed string
	maxHello  int
}

type sniRoute struct {
	name string // exact or "*.suffix"
	pool *pool
	key  sniKey
}

// sniKey is a passthrough hash key: the server name, or a client key.
type sniKey struct {
	sni  bool
	spec balance.KeySpec
}

func (k sniKey) compute(name string, client netip.AddrPort) balance.Key {
	if k.sni {
		if name == "" {
			return balance.Key{}
		}
		return balance.HashString(name)
	}
	return keyFor(k.spec, nil, client)
}

// tlsState is the Server's TLS bookkeeping.
type tlsState struct {
	mu       sync.Mutex
	stores   map[string]*tlsterm.Store   // by listener address
	backends map[string]*tlsterm.Backend // by listener address
	copy     *dataplane.Copy
	watching bool

	// Counters, read by TLSStats.
	handshakes  atomic.Uint64 // terminated handshakes completed
	fallbacks   sync.Map      // "no_sni", "unknown_sni", "malformed" → *atomic.Uint64: passthrough hellos sent to the listener's pool
	reloads     atomic.Uint64 // certificate reloads that succeeded
	reloadFails atomic.Uint64 // certificate reloads refused (old certificates kept)
}

// TLSStats are the proxy's TLS counters.
type TLSStats struct {
	Handshakes uint64 // TLS handshakes completed on terminating listeners
	// PassthroughFallbacks counts ClientHellos a tls_passthrough listener
	// sent to its pool instead of a route: by "no_sni", "unknown_sni",
	// "malformed". Those closed instead are refusals (Counters).
	PassthroughFallbacks map[string]uint64
	Reloads              uint64 // certificate reloads that succeeded
	ReloadFailures       uint64 // reloads refused, the previous certificates kept
}

// TLSStats returns the TLS counters.
func (s *Server) TLSStats() TLSStats {
	t := &s.tls
	out := TLSStats{Handshakes: t.handshakes.Load(), Reloads: t.reloads.Load(), ReloadFailures: t.reloadFails.Load(),
		PassthroughFallbacks: map[string]uint64{}}
	t.fallbacks.Range(func(k, v any) bool {
		out.PassthroughFallbacks[k.(string)] = v.(*atomic.Uint64).Load()
		return true
	})
	return out
}

func (t *tlsState) fallback(why string) {
	v, _ := t.fallbacks.LoadOrStore(why, new(atomic.Uint64))
	v.(*atomic.Uint64).Add(1)
}

// CopyPlane returns the plane that moves TLS-terminated and TLS-originated
// connections (nil until a listener needs it).
func (s *Server) CopyPlane() *dataplane.Copy {
	s.tls.mu.Lock()
	defer s.tls.mu.Unlock()
	return s.tls.copy
}

func storeOptions(t *config.TLS) tlsterm.Options {
	o := tlsterm.Options{
		RejectUnknownSNI:   t.UnknownSNI == "reject",
		ClientCA:           t.ClientCA,
		ClientCertOptional: t.ClientAuth == "optional",
		MinVersion:         tls.VersionTLS12,
		NextProtos:         []string{"http/1.1"},
	}
	if t.MinVersion == "1.3" {
		o.MinVersion = tls.VersionTLS13
	}
	for _, c := range t.Certificates {
		o.Certificates = append(o.Certificates, tlsterm.CertFiles{Cert: c.Cert, Key: c.Key})
	}
	return o
}

func backendOptions(l config.Listener) tlsterm.BackendOptions {
	b := l.TLS.Backend
	o := tlsterm.BackendOptions{CA: b.CA, ServerName: b.ServerName, InsecureSkipVerify: b.InsecureSkipVerify, Cert: b.Cert, Key: b.Key}
	if l.Mode == "websocket" {
		o.NextProtos = []string{"http/1.1"}
	}
	return o
}

// prepareTLS loads the certificate and key files of every listener of cfg,
// before anything is swapped, so a file that does not load refuses the
// whole start or reload and the running certificates stay. A listener
// whose TLS settings did not change keeps its store (and its session
// ticket keys), its files read again. It also checks what Validate cannot:
// that every sni route names a pool. Called by New and Reload (tls.go).
func (s *Server) prepareTLS(cfg *config.Config) error {
	t := &s.tls
	t.mu.Lock()
	defer t.mu.Unlock()
	pools := map[string]bool{}
	for _, p := range cfg.Pools {
		pools[p.Name] = true
	}
	stores := map[string]*tlsterm.Store{}
	backends := map[string]*tlsterm.Backend{}
	var errs []error
	for i, l := range cfg.Listeners {
		f := fmt.Sprintf("listeners[%d]", i)
		if l.SNI != nil {
			for j, r := range l.SNI.Routes {
				if !pools[r.Pool] {
					errs = append(errs, &config.FieldError{Field: fmt.Sprintf("%s.sni.routes[%d].pool", f, j),
						Msg: fmt.Sprintf("no pool named %q: define it under pools or fix the name", r.Pool)})
				}
			}
		}
		if l.TLS == nil {
			continue
		}
		if len(l.TLS.Certificates) > 0 {
			opts := storeOptions(l.TLS)
			if old := t.stores[l.Address]; old != nil && old.Options().Equal(opts) {
				if err := old.Reload(); err != nil {
					t.reloadFails.Add(1)
					errs = append(errs, fmt.Errorf("%s.tls: %w (the previous certificates stay in use)", f, err))
					continue
				}
				t.reloads.Add(1)
				stores[l.Address] = old
			} else {
				st, err := tlsterm.New(opts)
				if err != nil {
					errs = append(errs, fmt.Errorf("%s.tls: %w", f, err))
					continue
				}
				stores[l.Address] = st
			}
			for _, c := range stores[l.Address].Certificates() {
				if time.Now().After(c.NotAfter) {
					s.log.Warn("certificate has expired", "listener", l.Name, "file", c.File, "not_after", c.NotAfter)
				}
			}
		}
		if l.TLS.Backend != nil {
			b, err := tlsterm.NewBackend(backendOptions(l))
			if err != nil {
				errs = append(errs, fmt.Errorf("%s.tls.backend: %w", f, err))
				continue
			}
			backends[l.Address] = b
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	t.stores, t.backends = stores, backends
	if t.copy == nil && (len(stores) > 0 || len(backends) > 0) {
		t.copy = dataplane.NewCopy(dataplane.CopyOptions{Logger: s.log})
	}
	return nil
}

// compileTLS builds a listener's TLS part from what prepareTLS loaded
// (tls.go hook in compileListener).
func (s *Server) compileTLS(lc config.Listener, st *state) *tlsListener {
	t := &s.tls
	t.mu.Lock()
	tl := &tlsListener{store: t.stores[lc.Address], backend: t.backends[lc.Address]}
	t.mu.Unlock()
	if lc.Mode == "tls_passthrough" && lc.SNI != nil {
		sn := lc.SNI
		tab := &sniTable{noSNI: sn.NoSNI, malformed: sn.Malformed, maxHello: sn.MaxHelloBytes}
		for _, r := range sn.Routes {
			p := st.pools[r.Pool]
			if p == nil {
				continue // prepareTLS refused such a config
			}
			k := sniKeyOf(sn.HashKey, p)
			if r.HashKey != "" {
				k = sniKeyOf(r.HashKey, p)
			}
			tab.routes = append(tab.routes, sniRoute{name: strings.ToLower(r.ServerName), pool: p, key: k})
		}
		tl.sni = tab
	}
	if tl.store == nil && tl.backend == nil && tl.sni == nil {
		return nil
	}
	return tl
}

// sniKeyOf compiles a passthrough hash key; "" uses the pool's own key.
func sniKeyOf(expr string, p *pool) sniKey {
	switch {
	case expr == config.SNIHashPrefix:
		return sniKey{sni: true}
	case expr != "":
		return sniKey{spec: parseHashKey(expr)}
	case p != nil:
		return sniKey{spec: p.key}
	}
	return sniKey{spec: parseHashKey("client_ip")}
}

// proto is the X-Forwarded-Proto a listener's requests carry (tls.go).
func (l *listener) proto() string {
	if l.tls != nil && l.tls.store != nil {
		return "https"
	}
	return "http"
}

// answersHTTP says whether a refusal on c may be answered with an HTTP
// status: only on a websocket listener, and on a terminating one only once
// TLS is up (an HTTP answer in clear text means nothing to a TLS client).
func (l *listener) answersHTTP(c clientConn) bool {
	if l.cfg.Mode != "websocket" {
		return false
	}
	if l.tls != nil && l.tls.store != nil {
		_, isTLS := c.(*tls.Conn)
		return isTLS
	}
	return true
}

// terminate runs the TLS handshake on a terminating listener (tls.go hook
// in handle). On failure it has counted, logged and closed c, and returns
// nil.
func (s *Server) terminate(l *listener, c *net.TCPConn, client netip.AddrPort) clientConn {
	tc, err := l.tls.store.Handshake(c, l.cfg.HandshakeTimeout.D())
	if err == nil {
		s.tls.handshakes.Add(1)
		return tc
	}
	if errors.Is(err, io.EOF) {
		c.Close() // gone before a ClientHello: not a refusal
		return nil
	}
	reason := tlsterm.ReasonHandshake
	var he *tlsterm.HandshakeError
	if errors.As(err, &he) {
		reason = he.Reason
	}
	s.refuse(l, c, client, reason, 0, err)
	return nil
}

// originate starts TLS to the backend (tls.go hook in handle). On error be
// is left open for the caller to close.
func (s *Server) originate(l *listener, p *pool, be *net.TCPConn, addr string) (net.Conn, error) {
	return l.tls.backend.Handshake(be, addr, p.cfg.ConnectTimeout.D())
}

// readClientHello reads and routes the ClientHello of a tls_passthrough
// connection: the bytes read go to the backend first, untouched. On
// failure it has refused c and returns false (tls.go hook in handle).
func (s *Server) readClientHello(l *listener, c *net.TCPConn, client netip.AddrPort, conn *Conn) ([]byte, *pool, balance.Key, bool) {
	tab := l.tls.sni
	c.SetReadDeadline(time.Now().Add(l.cfg.HandshakeTimeout.D()))
	hello, raw, err := handshake.ReadClientHello(c, tab.maxHello)
	c.SetReadDeadline(time.Time{})
	refuse := func(reason string, err error) ([]byte, *pool, balance.Key, bool) {
		s.refuse(l, c, client, reason, 0, err)
		return nil, nil, balance.Key{}, false
	}
	toPool := func(why string, name string) ([]byte, *pool, balance.Key, bool) {
		s.tls.fallback(why)
		conn.Route = "sni:" + why
		return raw, l.pool, sniKeyOf(l.cfg.SNI.HashKey, l.pool).compute(name, client), true
	}
	switch {
	case err == nil && hello.ServerName != "":
		for i := range tab.routes {
			r := &tab.routes[i]
			if matchHost(r.name, hello.ServerName) {
				conn.Route = "sni:" + r.name
				return raw, r.pool, r.key.compute(hello.ServerName, client), true
			}
		}
		if l.pool == nil {
			return refuse(RefuseTLSUnknownSNI, fmt.Errorf("no sni route for %q", hello.ServerName))
		}
		return toPool("unknown_sni", hello.ServerName)
	case err == nil:
		if tab.noSNI == "close" || l.pool == nil {
			return refuse(RefuseTLSNoSNI, nil)
		}
		return toPool("no_sni", "")
	case errors.Is(err, io.EOF):
		c.Close() // gone before sending anything: not a refusal
		return nil, nil, balance.Key{}, false
	case errors.Is(err, os.ErrDeadlineExceeded):
		return refuse(RefuseTLSHelloTimeout, err)
	case errors.Is(err, handshake.ErrHelloTooLarge):
		return refuse(RefuseTLSHelloTooBig, err)
	case errors.Is(err, handshake.ErrNotTLS), errors.Is(err, handshake.ErrMalformedHello):
		if tab.malformed == "pool" && l.pool != nil {
			return toPool("malformed", "")
		}
		return refuse(RefuseTLSMalformed, err)
	}
	// A reset or an EOF in the middle of the hello.
	return refuse(RefuseMalformed, err)
}

// handOff gives an established pair to its data plane: a plain TCP pair to
// the listener's plane (sockmap or splice), a pair with a TLS side to the
// copy plane (tls.go hook in handle).
func (s *Server) handOff(l *listener, conn *Conn, c *net.TCPConn, be *net.TCPConn, cs clientConn, bs net.Conn, release func()) bool {
	if cs == clientConn(c) && bs == net.Conn(be) {
		return s.startPlane(l, conn, c, be, release)
	}
	p := s.CopyPlane()
	cc := &dataplane.CopyConn{
		ID: conn.ID, Client: cs, Backend: bs, IdleTimeout: l.cfg.IdleTimeout.D(),
		Done: func(r dataplane.Result) { s.closed(conn, r, release) },
	}
	if err := s.enter(conn, p, func() error { return p.StartStreams(cc) }); err != nil {
		s.log.Warn("data plane failed", "id", conn.ID, "err", err)
		cs.Close()
		return false
	}
	return true
}

// startTLS starts the certificate file watcher and reports kernel TLS
// (tls.go hook in Start).
func (s *Server) startTLS() {
	t := &s.tls
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.watching || len(t.stores) == 0 {
		return
	}
	t.watching = true
	if ok, err := tlsterm.KTLS(); ok {
		s.log.Info("kernel TLS is available; terminated connections are still copied in userspace (crypto/tls does not hand its keys to the kernel)")
	} else {
		s.log.Info("kernel TLS unavailable: terminated connections are copied in userspace", "why", err)
	}
	s.wg.Add(1)
	go s.watchCertificates()
}

// liveStore is a certificate store serving an open listener.
type liveStore struct {
	store    *tlsterm.Store
	listener string
	interval time.Duration
}

// liveStores returns the stores of the open listeners: the ones serving,
// whatever a reload that failed half-way may have prepared.
func (s *Server) liveStores() []liveStore {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []liveStore
	for _, sk := range s.listeners {
		l := sk.cur.Load()
		if l.tls == nil || l.tls.store == nil || l.cfg.TLS == nil {
			continue
		}
		out = append(out, liveStore{l.tls.store, l.cfg.Name, l.cfg.TLS.WatchInterval.D()})
	}
	return out
}

// watchCertificates reloads a listener's certificates when its files
// change. A file that does not load leaves the previous certificates
// serving and is logged; it is tried again when a file changes again.
func (s *Server) watchCertificates() {
	defer s.wg.Done()
	last := map[*tlsterm.Store]time.Time{}
	for !s.draining.Load() {
		time.Sleep(time.Second) // short, so Shutdown's wait ends soon
		now := time.Now()
		for _, ls := range s.liveStores() {
			if now.Sub(last[ls.store]) < ls.interval {
				continue
			}
			last[ls.store] = now
			changed, err := ls.store.ReloadIfChanged()
			switch {
			case !changed:
			case err != nil:
				s.tls.reloadFails.Add(1)
				s.log.Error("certificate files changed but do not load; the previous certificates stay in use", "listener", ls.listener, "err", err)
			default:
				s.tls.reloads.Add(1)
				s.log.Info("certificates reloaded", "listener", ls.listener, "certificates", len(ls.store.Certificates()))
			}
		}
	}
}

// ReloadCertificates reads every listener's certificate files again (what
// SIGHUP does when the configuration came from flags and there is no file
// to reload). A listener whose files do not load keeps its certificates;
// the error names each one.
func (s *Server) ReloadCertificates() error {
	var errs []error
	for _, ls := range s.liveStores() {
		if err := ls.store.Reload(); err != nil {
			s.tls.reloadFails.Add(1)
			errs = append(errs, fmt.Errorf("listener %s: %w (the previous certificates stay in use)", ls.listener, err))
			continue
		}
		s.tls.reloads.Add(1)
		s.log.Info("certificates reloaded", "listener", ls.listener, "certificates", len(ls.store.Certificates()))
	}
	return errors.Join(errs...)
}
