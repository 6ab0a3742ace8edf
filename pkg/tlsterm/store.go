// Package tlsterm terminates TLS for the proxy: a certificate store that
// picks a certificate by SNI (exact and wildcard names), verifies client
// certificates against a CA, and reloads its files without dropping a
// connection (a file that does not load leaves the previous certificates
// serving); the client side of TLS to backends; and detection of kernel
// TLS. It uses crypto/tls only and knows nothing of HTTP or data planes.
package tlsterm

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// CertFiles names one PEM certificate chain (leaf first) and its key.
type CertFiles struct {
	Cert, Key string
}

// Options configure a Store.
type Options struct {
	// Certificates in order: the first is served when no name matches.
	Certificates []CertFiles
	// MinVersion is tls.VersionTLS12 (also the value used for 0) or
	// tls.VersionTLS13. Older versions are never accepted.
	MinVersion uint16
	// RejectUnknownSNI refuses a client whose server name no certificate
	// covers (alert unrecognized_name) instead of serving the first
	// certificate. A client that sends no name gets the first certificate.
	RejectUnknownSNI bool
	// ClientCA, when set, is a PEM bundle client certificates must chain to.
	ClientCA string
	// ClientCertOptional verifies a client certificate only if one is sent.
	ClientCertOptional bool
	// NextProtos is the ALPN list; nil means "http/1.1".
	NextProtos []string
}

// Equal reports whether o and p name the same files and settings, so a
// configuration reload can keep the Store (and its session ticket keys).
func (o Options) Equal(p Options) bool {
	return slices.Equal(o.Certificates, p.Certificates) && o.MinVersion == p.MinVersion &&
		o.RejectUnknownSNI == p.RejectUnknownSNI && o.ClientCA == p.ClientCA &&
		o.ClientCertOptional == p.ClientCertOptional && slices.Equal(o.NextProtos, p.NextProtos)
}

// CertInfo describes one loaded certificate.
type CertInfo struct {
	File     string
	Names    []string // DNS names of the leaf, as matched against SNI
	NotAfter time.Time
}

// Store serves the current certificates to TLS handshakes. Handshakes
// started before a reload finish with the certificates they started with;
// established connections are never touched. A Store is safe for
// concurrent use.
type Store struct {
	opts Options
	cur  atomic.Pointer[certSet]
	base *tls.Config // handed to tls.Server: picks the current set per hello

	mu        sync.Mutex // serialises reloads
	attempted []fileStamp
	lastErr   error
}

// certSet is one complete load of the files: immutable.
type certSet struct {
	certs   []*tls.Certificate
	infos   []CertInfo
	exact   map[string][]*tls.Certificate
	wild    map[string][]*tls.Certificate // "example.com" for "*.example.com"
	config  *tls.Config                   // served when the name is known or not required
	reject  *tls.Config                   // no certificate: crypto/tls answers unrecognized_name
	stamps  []fileStamp
	loaded  time.Time
	rejects bool
}

// New loads the files and returns a Store serving them. It fails, naming
// the file and the reason, if any file does not load.
func New(opts Options) (*Store, error) {
	if len(opts.Certificates) == 0 {
		return nil, errors.New("tls: no certificate configured")
	}
	if opts.MinVersion == 0 {
		opts.MinVersion = tls.VersionTLS12
	}
	if opts.MinVersion < tls.VersionTLS12 || opts.MinVersion > tls.VersionTLS13 {
		return nil, fmt.Errorf("tls: minimum version %#x: use TLS 1.2 or 1.3", opts.MinVersion)
	}
	if opts.NextProtos == nil {
		opts.NextProtos = []string{"http/1.1"}
	}
	s := &Store{opts: opts}
	set, err := s.load()
	s.attempted = stampsOf(s.files())
	if err != nil {
		return nil, err
	}
	s.cur.Store(set)
	s.base = &tls.Config{
		MinVersion: opts.MinVersion,
		MaxVersion: tls.VersionTLS13,
		NextProtos: opts.NextProtos,
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			return s.cur.Load().configFor(h), nil
		},
	}
	return s, nil
}

// Options returns the options the Store was made with (defaults filled).
func (s *Store) Options() Options { return s.opts }

// Config returns the tls.Config to hand to tls.Server. Its
// GetConfigForClient serves the certificates current at each ClientHello.
func (s *Store) Config() *tls.Config { return s.base }

// Certificates describes the certificates being served, in order.
func (s *Store) Certificates() []CertInfo { return slices.Clone(s.cur.Load().infos) }

// LastError is the error of the last reload attempt, nil if it succeeded.
func (s *Store) LastError() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr
}

// Reload reads every file again and serves the new certificates if all
// of them load. Otherwise the previous certificates stay and the error
// names the file and the reason.
func (s *Store) Reload() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reloadLocked()
}

func (s *Store) reloadLocked() error {
	s.attempted = stampsOf(s.files())
	set, err := s.load()
	s.lastErr = err
	if err != nil {
		return err
	}
	s.cur.Store(set)
	return nil
}

// ReloadIfChanged reloads when a file changed (size, modification time,
// inode or device) since the last attempt. A reload that failed is not
// retried until a file changes again, so a certificate renewal that
// replaces the chain and the key one after the other is picked up when
// the second file lands. changed reports whether a reload was attempted.
func (s *Store) ReloadIfChanged() (changed bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if slices.Equal(stampsOf(s.files()), s.attempted) {
		return false, nil
	}
	return true, s.reloadLocked()
}

func (s *Store) files() []string {
	var fs []string
	for _, c := range s.opts.Certificates {
		fs = append(fs, c.Cert, c.Key)
	}
	if s.opts.ClientCA != "" {
		fs = append(fs, s.opts.ClientCA)
	}
	return fs
}

// load reads every file into a new certSet.
func (s *Store) load() (*certSet, error) {
	set := &certSet{
		exact: map[string][]*tls.Certificate{}, wild: map[string][]*tls.Certificate{},
		stamps: stampsOf(s.files()), loaded: time.Now(), rejects: s.opts.RejectUnknownSNI,
	}
	for _, f := range s.opts.Certificates {
		cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
		if err != nil {
			return nil, fmt.Errorf("tls: loading certificate %s with key %s: %w", f.Cert, f.Key, err)
		}
		leaf := cert.Leaf
		if leaf == nil {
			if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
				return nil, fmt.Errorf("tls: parsing certificate %s: %w", f.Cert, err)
			}
			cert.Leaf = leaf
		}
		c := &cert
		info := CertInfo{File: f.Cert, NotAfter: leaf.NotAfter}
		for _, name := range leaf.DNSNames {
			name = strings.ToLower(strings.TrimSuffix(name, "."))
			info.Names = append(info.Names, name)
			if suffix, ok := strings.CutPrefix(name, "*."); ok {
				set.wild[suffix] = append(set.wild[suffix], c)
			} else {
				set.exact[name] = append(set.exact[name], c)
			}
		}
		set.certs = append(set.certs, c)
		set.infos = append(set.infos, info)
	}
	common := func(cfg *tls.Config) *tls.Config {
		cfg.MinVersion = s.opts.MinVersion
		cfg.MaxVersion = tls.VersionTLS13
		cfg.NextProtos = s.opts.NextProtos
		return cfg
	}
	set.config = common(&tls.Config{GetCertificate: set.getCertificate})
	set.reject = common(&tls.Config{})
	if s.opts.ClientCA != "" {
		pem, err := os.ReadFile(s.opts.ClientCA)
		if err != nil {
			return nil, fmt.Errorf("tls: reading client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls: client CA %s holds no PEM certificate", s.opts.ClientCA)
		}
		set.config.ClientCAs = pool
		set.config.ClientAuth = tls.RequireAndVerifyClientCert
		if s.opts.ClientCertOptional {
			set.config.ClientAuth = tls.VerifyClientCertIfGiven
		}
	}
	return set, nil
}

// lookup returns the certificates whose names cover name: exact names
// first, else a wildcard covering exactly one more label (RFC 6125: a
// client rejects *.example.com for a.b.example.com, so serving it is no use).
func (set *certSet) lookup(name string) []*tls.Certificate {
	if cs := set.exact[name]; cs != nil {
		return cs
	}
	if i := strings.IndexByte(name, '.'); i > 0 {
		return set.wild[name[i+1:]]
	}
	return nil
}

func (set *certSet) configFor(h *tls.ClientHelloInfo) *tls.Config {
	if rec, ok := h.Conn.(*ServerConn); ok {
		rec.noteHello(h)
	}
	name := strings.ToLower(h.ServerName)
	if set.rejects && name != "" && set.lookup(name) == nil {
		if rec, ok := h.Conn.(*ServerConn); ok {
			rec.unknownName = true
		}
		return set.reject
	}
	return set.config
}

// getCertificate picks, among the certificates for the name (or all of
// them when none matches), the first the client can use (key type,
// signature algorithms), so an RSA and an ECDSA certificate for the same
// name can be served side by side.
func (set *certSet) getCertificate(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
	cands := set.lookup(strings.ToLower(h.ServerName))
	if cands == nil {
		cands = set.certs
	}
	for _, c := range cands {
		if h.SupportsCertificate(c) == nil {
			return c, nil
		}
	}
	return cands[0], nil
}

// fileStamp identifies one version of a file.
type fileStamp struct {
	path       string
	size       int64
	mtime      time.Time
	ino, dev   uint64
	statFailed bool
}

func stampsOf(paths []string) []fileStamp {
	out := make([]fileStamp, len(paths))
	for i, p := range paths {
		out[i].path = p
		fi, err := os.Stat(p)
		if err != nil {
			out[i].statFailed = true
			continue
		}
		out[i].size, out[i].mtime = fi.Size(), fi.ModTime()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			out[i].ino, out[i].dev = st.Ino, uint64(st.Dev)
		}
	}
	return out
}
