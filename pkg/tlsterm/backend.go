package tlsterm

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

// BackendOptions configure TLS from the agent to backends (nginx
// proxy_ssl_*).
type BackendOptions struct {
	// CA is a PEM bundle backend certificates must chain to; empty uses the
	// system roots.
	CA string
	// ServerName is sent as SNI and verified; empty uses each backend's host.
	ServerName string
	// InsecureSkipVerify accepts any certificate (tests only).
	InsecureSkipVerify bool
	// Cert and Key are an optional client certificate.
	Cert, Key string
	// NextProtos is the ALPN list offered; nil offers none.
	NextProtos []string
}

// Backend makes TLS client connections to backends. Safe for concurrent use.
type Backend struct {
	opts  BackendOptions
	base  *tls.Config
	mu    sync.Mutex
	byKey map[string]*tls.Config // per server name: ServerName differs
}

// NewBackend loads the files named in o.
func NewBackend(o BackendOptions) (*Backend, error) {
	base := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		NextProtos:         o.NextProtos,
		InsecureSkipVerify: o.InsecureSkipVerify,
		// Resumption makes reconnect storms after a backend restart cheaper.
		ClientSessionCache: tls.NewLRUClientSessionCache(1024),
	}
	if o.CA != "" {
		pem, err := os.ReadFile(o.CA)
		if err != nil {
			return nil, fmt.Errorf("backend tls: reading CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("backend tls: CA %s holds no PEM certificate", o.CA)
		}
		base.RootCAs = pool
	}
	if o.Cert != "" {
		c, err := tls.LoadX509KeyPair(o.Cert, o.Key)
		if err != nil {
			return nil, fmt.Errorf("backend tls: loading client certificate %s with key %s: %w", o.Cert, o.Key, err)
		}
		base.Certificates = []tls.Certificate{c}
	}
	return &Backend{opts: o, base: base, byKey: map[string]*tls.Config{}}, nil
}

// Options returns the options b was made with.
func (b *Backend) Options() BackendOptions { return b.opts }

// configFor returns the client config for a backend at addr (host:port).
func (b *Backend) configFor(addr string) *tls.Config {
	name := b.opts.ServerName
	if name == "" {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		name = host
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	cfg := b.byKey[name]
	if cfg == nil {
		// crypto/tls verifies an IP address against the certificate's IP
		// SANs and sends no SNI for it.
		cfg = b.base.Clone()
		cfg.ServerName = name
		if len(b.byKey) < 4096 {
			b.byKey[name] = cfg
		}
	}
	return cfg
}

// Handshake runs a client handshake over c to the backend at addr within
// timeout. On error c is not closed.
func (b *Backend) Handshake(c net.Conn, addr string, timeout time.Duration) (*tls.Conn, error) {
	tc := tls.Client(c, b.configFor(addr))
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c.SetDeadline(time.Now().Add(timeout))
	err := tc.HandshakeContext(ctx)
	c.SetDeadline(time.Time{})
	if err != nil {
		return nil, fmt.Errorf("backend tls handshake with %s: %w", addr, err)
	}
	return tc, nil
}
