package tlsterm

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"time"
)

// Handshake failure reasons: stable values used as metric labels and log
// fields.
const (
	ReasonTimeout    = "tls_timeout"     // no complete handshake within the deadline
	ReasonNotTLS     = "tls_not_tls"     // the client does not speak TLS (e.g. plain HTTP)
	ReasonVersion    = "tls_version"     // the client offers only versions below the minimum
	ReasonUnknownSNI = "tls_unknown_sni" // no certificate for the name, and unknown_sni: reject
	ReasonClientCert = "tls_client_cert" // missing or invalid client certificate
	ReasonHandshake  = "tls_handshake"   // any other handshake failure
)

// ServerConn is the client's TCP connection under a terminating tls.Conn.
// It embeds the *net.TCPConn, so its methods (CloseWrite, SetLinger,
// SyscallConn, keepalive) stay reachable through tls.Conn.NetConn, and it
// records what the ClientHello asked for.
type ServerConn struct {
	*net.TCPConn
	helloSeen   bool
	serverName  string
	maxVersion  uint16
	unknownName bool
}

func (c *ServerConn) noteHello(h *tls.ClientHelloInfo) {
	c.helloSeen = true
	c.serverName = h.ServerName
	for _, v := range h.SupportedVersions {
		if v&0x0f0f != 0x0a0a { // not GREASE
			c.maxVersion = max(c.maxVersion, v)
		}
	}
}

// ServerName is the SNI the client sent ("" if none or not yet read).
func (c *ServerConn) ServerName() string { return c.serverName }

// HandshakeError is a failed server handshake: a Reason constant and the
// error crypto/tls (or the connection) returned.
type HandshakeError struct {
	Reason     string
	ServerName string
	Err        error
}

func (e *HandshakeError) Error() string { return "tls handshake: " + e.Reason + ": " + e.Err.Error() }
func (e *HandshakeError) Unwrap() error { return e.Err }

// Handshake runs a server handshake on c with the store's certificates,
// bounded by timeout. On success the returned tls.Conn owns c (its
// NetConn is a *ServerConn) and no deadline is left set. On failure c is
// not closed and the error is a *HandshakeError, or io.EOF when the client
// closed before sending anything (not worth counting as a refusal).
func (s *Store) Handshake(c *net.TCPConn, timeout time.Duration) (*tls.Conn, error) {
	sc := &ServerConn{TCPConn: c}
	tc := tls.Server(sc, s.base)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c.SetDeadline(time.Now().Add(timeout))
	err := tc.HandshakeContext(ctx)
	c.SetDeadline(time.Time{})
	if err == nil {
		return tc, nil
	}
	if !sc.helloSeen && errors.Is(err, io.EOF) {
		return nil, io.EOF
	}
	return nil, &HandshakeError{Reason: s.classify(sc, err), ServerName: sc.serverName, Err: err}
}

func (s *Store) classify(sc *ServerConn, err error) string {
	var rh tls.RecordHeaderError
	var cv *tls.CertificateVerificationError
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded):
		return ReasonTimeout
	case !sc.helloSeen && errors.As(err, &rh):
		return ReasonNotTLS
	case sc.unknownName:
		return ReasonUnknownSNI
	case sc.helloSeen && sc.maxVersion != 0 && sc.maxVersion < s.opts.MinVersion:
		return ReasonVersion
	case errors.As(err, &cv), strings.Contains(err.Error(), "client didn't provide a certificate"):
		return ReasonClientCert
	}
	return ReasonHandshake
}
