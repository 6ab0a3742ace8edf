package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/wsplice/wsplice/pkg/balance"
	"github.com/wsplice/wsplice/pkg/dataplane"
	"github.com/wsplice/wsplice/pkg/handshake"
)

// handle is one connection's life from accept to the hand-off to a data
// plane. Every refusal is answered (HTTP status in websocket mode, a plain
// close in tcp mode), counted and logged.
func (s *Server) handle(l *listener, c *net.TCPConn) {
	start := time.Now()
	client := clientAddr(c)
	lim := s.lim.Load()
	limKey, reason := lim.admit(client.Addr(), start)
	if reason != "" {
		s.refuse(l, c, client, reason, statusFor(reason), nil)
		return
	}
	// The limiter slot is released exactly once: here if the connection
	// never reaches a data plane, else by the plane's Done.
	var once sync.Once
	release := func() { once.Do(func() { lim.release(limKey) }) }
	handedOff := false
	defer func() {
		if !handedOff {
			release()
		}
	}()

	setKeepalive(l.cfg.Keepalive.Client, c) // (keepalive.go)
	var cc clientConn = c                   // the client's stream: c, or TLS over it (tls.go)
	if l.tls != nil && l.tls.store != nil {
		if cc = s.terminate(l, c, client); cc == nil {
			return
		}
	}

	st := s.state.Load()
	conn := &Conn{Listener: l.cfg.Name, Client: client, Start: start, clientKey: limKey}
	var head []byte // what goes to the backend first (head rewritten, or nothing)
	var p *pool
	var key balance.Key

	switch l.cfg.Mode {
	case "tcp":
		p = st.pools[l.cfg.Pool]
		key = keyFor(p.key, nil, client)
		conn.Route = "tcp"
	case "tls_passthrough": // (tls.go)
		var ok bool
		if head, p, key, ok = s.readClientHello(l, c, client, conn); !ok {
			return
		}
	default:
		var r *route
		var ok bool
		head, r, key, ok = s.readRequest(l, st, cc, client, conn)
		if !ok {
			return
		}
		p = r.pool
	}
	conn.Pool = p.Name()

	be, b, connectTime, err := s.connect(p, key)
	if err != nil {
		reason := RefuseBackendFailed
		if errors.Is(err, balance.ErrNoBackend) {
			reason = RefuseNoBackend
		}
		s.refuse(l, cc, client, reason, statusFor(reason), err)
		return
	}
	setKeepalive(l.cfg.Keepalive.Backend, be) // (keepalive.go)
	conn.backend = b
	conn.Backend = b.Address()
	conn.Connect = connectTime
	conn.Local = tcpAddr(c.LocalAddr())
	conn.BackendTo = tcpAddr(be.RemoteAddr())
	conn.BackendFrom = tcpAddr(be.LocalAddr())
	ok := false
	defer func() {
		if !ok {
			be.Close()
			b.Release()
		}
	}()
	var bs net.Conn = be // the backend's stream: be, or TLS over it (tls.go)
	if l.tls != nil && l.tls.backend != nil {
		if bs, err = s.originate(l, p, be, conn.Backend); err != nil {
			s.tried(p, b, err)
			s.refuse(l, cc, client, RefuseBackendTLS, 502, err)
			return
		}
	}

	if err := s.sendHead(p, bs, c, client, head); err != nil {
		s.tried(p, b, err)
		s.log.Debug("backend write failed", "backend", conn.Backend, "err", err)
		s.refuse(l, cc, client, RefuseBackendFailed, 502, err)
		return
	}
	if l.cfg.Mode == "websocket" {
		resp, rest, err := s.readResponse(l, bs)
		if err != nil {
			s.tried(p, b, err)
			s.refuse(l, cc, client, RefuseBackendHead, 502, err)
			return
		}
		if resp.Status >= 500 {
			s.tried(p, b, fmt.Errorf("backend answered %d", resp.Status))
		} else {
			s.tried(p, b, nil)
		}
		conn.Status = resp.Status
		if conn.Upgrade && !resp.Upgrade {
			// The backend declined the upgrade: it still speaks HTTP on this
			// connection, so tunnelling would let the client send further
			// requests past every check here. Relay the answer and close.
			s.relayRefusedUpgrade(l, cc, bs, resp, rest, conn)
			return
		}
		if err := s.relay(l, cc, resp.raw, rest); err != nil {
			s.log.Debug("client write failed", "client", client.String(), "err", err)
			cc.Close()
			return
		}
	}
	if l.cfg.Mode != "websocket" {
		s.tried(p, b, nil)
	}
	conn.ID = s.ids.Add(1)
	conn.Handshake = time.Since(start)
	if !s.handOff(l, conn, c, be, cc, bs, release) { // (tls.go)
		return
	}
	ok = true
	handedOff = true
	if s.onEstab != nil {
		s.onEstab(conn)
	}
}

// readRequest reads, parses and routes the client's request head. It
// returns the head to send to the backend (rewritten, plus any bytes the
// client pipelined behind it), the route and the hash key. On failure it
// has already answered the client.
func (s *Server) readRequest(l *listener, st *state, c clientConn, client netip.AddrPort, conn *Conn) ([]byte, *route, balance.Key, bool) {
	lim := handshake.Limits{MaxHeadBytes: l.cfg.MaxHeadBytes, MaxHeaders: l.cfg.MaxHeaders}
	c.SetReadDeadline(time.Now().Add(l.cfg.HandshakeTimeout.D()))
	raw, rest, err := handshake.ReadHead(c, lim)
	if err != nil {
		var he *handshake.Error
		switch {
		case errors.As(err, &he):
			s.refuse(l, c, client, he.Reason, he.Status, err)
		case errors.Is(err, os.ErrDeadlineExceeded):
			s.refuse(l, c, client, RefuseHeadTimeout, 408, err)
		case errors.Is(err, io.EOF):
			// The client went away before sending anything: not a refusal.
			c.Close()
		default:
			s.refuse(l, c, client, RefuseMalformed, 0, err)
		}
		return nil, nil, balance.Key{}, false
	}
	c.SetReadDeadline(time.Time{})
	req, err := handshake.ParseRequest(raw, lim)
	if err != nil {
		var he *handshake.Error
		if errors.As(err, &he) {
			s.refuse(l, c, client, he.Reason, he.Status, err)
		} else {
			s.refuse(l, c, client, RefuseMalformed, 400, err)
		}
		return nil, nil, balance.Key{}, false
	}
	var r *route
	for _, cand := range l.routes {
		if cand.match(req.Host, req.Path) {
			r = cand
			break
		}
	}
	if r == nil && l.pool != nil {
		r = &route{name: "default", pool: l.pool, key: l.pool.key}
	}
	if r == nil {
		s.refuse(l, c, client, RefuseNoRoute, 404, nil)
		return nil, nil, balance.Key{}, false
	}
	conn.Route = r.name
	conn.Upgrade = req.Upgrade
	if !r.originAllowed(req.Origin()) {
		s.refuse(l, c, client, RefuseOrigin, 403, nil)
		return nil, nil, balance.Key{}, false
	}
	if !req.Upgrade && r.upgradeOnly {
		s.refuse(l, c, client, RefuseNotUpgrade, 426, nil)
		return nil, nil, balance.Key{}, false
	}
	fw := handshake.Forwarding{ClientAddr: client, Proto: l.proto(), Headers: r.pool.cfg.Forward == "headers", Close: !req.Upgrade}
	out := req.AppendRewritten(make([]byte, 0, len(raw)+128+len(rest)), fw)
	out = append(out, rest...)
	return out, r, keyFor(r.key, req, client), true
}

// connect picks a backend and dials it, trying the next one on failure
// (nginx proxy_next_upstream error timeout) up to the pool's max_tries.
func (s *Server) connect(p *pool, key balance.Key) (*net.TCPConn, *balance.Backend, time.Duration, error) {
	var tried []*balance.Backend
	skip := func(b *balance.Backend) bool {
		for _, t := range tried {
			if t == b {
				return true
			}
		}
		return false
	}
	var lastErr error
	for try := 0; try < p.cfg.MaxTries; try++ {
		b, err := p.Pick(key, skip)
		if err != nil {
			if lastErr != nil {
				return nil, nil, 0, lastErr
			}
			return nil, nil, 0, err
		}
		tried = append(tried, b)
		d := net.Dialer{Timeout: p.cfg.ConnectTimeout.D(), KeepAlive: -1} // setKeepalive sets it (keepalive.go)
		d.SetMultipathTCP(false)
		t0 := time.Now()
		nc, err := d.DialContext(context.Background(), "tcp", b.Address())
		if err != nil {
			b.Release()
			if !localFailure(err) {
				s.tried(p, b, err)
			}
			s.Counters.ConnectFails.Add(1)
			s.log.Debug("backend connect failed", "pool", p.Name(), "backend", b.Address(), "try", try+1, "err", err)
			lastErr = err
			continue
		}
		return nc.(*net.TCPConn), b, time.Since(t0), nil
	}
	return nil, nil, 0, lastErr
}

// tried reports one backend try to the passive health checks.
func (s *Server) tried(p *pool, b *balance.Backend, err error) {
	if s.onTry != nil {
		s.onTry(p.Name(), b, err)
	}
}

// socketDied: err says a socket of the pair failed (reset, broken pipe,
// peer timed out), as opposed to the plane declining it.
func socketDied(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ETIMEDOUT)
}

// localFailure: the dial failed for a reason of this host (out of fds,
// ports or memory), not the backend's.
func localFailure(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

// sendHead writes the PROXY header (if the pool asks for one) and the
// rewritten head with the client's pipelined bytes.
func (s *Server) sendHead(p *pool, be net.Conn, c *net.TCPConn, client netip.AddrPort, head []byte) error {
	var pre []byte
	local := netip.AddrPort{}
	if a, ok := c.LocalAddr().(*net.TCPAddr); ok {
		local = a.AddrPort()
	}
	switch p.cfg.Forward {
	case "proxy_v1":
		pre = handshake.AppendProxyV1(nil, client, local)
	case "proxy_v2":
		pre = handshake.AppendProxyV2(nil, client, local)
	}
	if len(pre) == 0 && len(head) == 0 {
		return nil
	}
	be.SetWriteDeadline(time.Now().Add(p.cfg.ConnectTimeout.D()))
	defer be.SetWriteDeadline(time.Time{})
	_, err := be.Write(append(pre, head...))
	return err
}

// response is the backend's parsed response head and its bytes.
type response struct {
	*handshake.Response
	raw []byte
}

// readResponse reads the backend's response head, bounded and with the
// listener's handshake deadline. rest holds what the backend sent behind it.
func (s *Server) readResponse(l *listener, be net.Conn) (response, []byte, error) {
	lim := handshake.Limits{MaxHeadBytes: l.cfg.MaxHeadBytes, MaxHeaders: l.cfg.MaxHeaders}
	be.SetReadDeadline(time.Now().Add(l.cfg.HandshakeTimeout.D()))
	raw, rest, err := handshake.ReadHead(be, lim)
	be.SetReadDeadline(time.Time{})
	if err != nil {
		return response{}, nil, err
	}
	resp, err := handshake.ParseResponse(raw, lim)
	if err != nil {
		return response{}, nil, err
	}
	return response{Response: resp, raw: raw}, rest, nil
}

// relay writes the response head and what followed it to the client.
func (s *Server) relay(l *listener, c clientConn, head, rest []byte) error {
	c.SetWriteDeadline(time.Now().Add(l.cfg.HandshakeTimeout.D()))
	defer c.SetWriteDeadline(time.Time{})
	_, err := c.Write(append(head, rest...))
	return err
}

// maxRefusalBody bounds the body of a declined upgrade that is relayed.
const maxRefusalBody = 64 << 10

// relayRefusedUpgrade passes a backend's non-101 answer to an upgrade
// request to the client — head and a body of known length up to 64 KiB —
// and closes both connections.
func (s *Server) relayRefusedUpgrade(l *listener, c clientConn, be net.Conn, resp response, rest []byte, conn *Conn) {
	// handle's deferred cleanup closes be and releases the backend.
	defer c.Close()
	body := rest
	if n, err := strconv.ParseInt(headerValue(resp.Headers, "Content-Length"), 10, 64); err == nil && n >= 0 && n <= maxRefusalBody {
		if int64(len(body)) > n {
			body = body[:n]
		}
		if int64(len(body)) < n {
			be.SetReadDeadline(time.Now().Add(l.cfg.HandshakeTimeout.D()))
			more := make([]byte, n-int64(len(body)))
			k, _ := io.ReadFull(be, more)
			body = append(body, more[:k]...)
		}
	}
	s.Counters.UpgradeDeclined.Add(1)
	s.log.Info("backend declined the upgrade", "listener", l.cfg.Name, "client", conn.Client.String(), "backend", conn.Backend, "status", resp.Status)
	if s.relay(l, c, resp.raw, body) == nil {
		c.CloseWrite()
	}
}

func headerValue(hs []handshake.Header, name string) string {
	for _, h := range hs {
		if strings.EqualFold(h.Name, name) {
			return h.Value
		}
	}
	return ""
}

// startPlane hands the pair to the listener's data plane. With "auto" a
// connection the kernel path refuses (e.g. it already got FIN) goes to
// splice instead.
func (s *Server) startPlane(l *listener, conn *Conn, c, be *net.TCPConn, release func()) bool {
	dc := &dataplane.Conn{
		ID: conn.ID, Client: c, Backend: be, IdleTimeout: l.cfg.IdleTimeout.D(),
		Done: func(r dataplane.Result) { s.closed(conn, r, release) },
	}
	if sm := s.planes.Sockmap; l.plane != "splice" && sm != nil {
		err := s.enter(conn, sm, func() error { return sm.Start(dc) })
		if err == nil {
			return true
		}
		if socketDied(err) {
			// A socket was reset while joining (the error is consumed by the
			// read that saw it): splice would read a clean EOF and pass on a
			// FIN. The other side must see the reset.
			s.log.Debug("a socket was reset while joining the sockmap", "id", conn.ID, "err", err)
			c.SetLinger(0)
			be.SetLinger(0)
			c.Close()
			return false
		}
		s.Counters.PlaneFallbacks.Add(1)
		s.log.Debug("sockmap refused connection, using splice", "id", conn.ID, "err", err)
	}
	sp := s.planes.Splice
	if err := s.enter(conn, sp, func() error { return sp.Start(dc) }); err != nil {
		s.log.Warn("data plane failed", "id", conn.ID, "err", err)
		c.Close()
		return false
	}
	return true
}

// enter puts conn in the table on plane p, then runs start (the plane's
// Start): the entry exists before any byte moves, so a Done, however
// soon, finds it. On error the entry goes again; on success the
// connection counts as established.
func (s *Server) enter(conn *Conn, p dataplane.Plane, start func() error) error {
	conn.Plane = p
	s.table.add(conn)
	if err := start(); err != nil {
		s.table.remove(conn.ID)
		return err
	}
	s.Counters.Established.Add(1)
	return nil
}

// closed runs when the data plane is done with a connection.
func (s *Server) closed(conn *Conn, r dataplane.Result, release func()) {
	// Free the limits before the table entry, so a client that sees the
	// connection gone can connect again at once.
	release()
	conn.backend.Release()
	s.table.remove(conn.ID)
	if s.onClose != nil {
		s.onClose(conn, r)
	}
}

// refuse answers and closes a connection that will not be proxied.
func (s *Server) refuse(l *listener, c clientConn, client netip.AddrPort, reason string, status int, err error) {
	s.Counters.Refused(reason)
	attrs := []any{"listener", l.cfg.Name, "client", client.String(), "reason", reason}
	if status != 0 {
		attrs = append(attrs, "status", status)
	}
	if err != nil {
		attrs = append(attrs, "err", err)
	}
	s.log.Info("refused", attrs...)
	if l.answersHTTP(c) && status != 0 { // (tls.go)
		c.SetWriteDeadline(time.Now().Add(time.Second))
		var extra []handshake.Header
		if status == 429 || status == 503 {
			extra = append(extra, handshake.Header{Name: "Retry-After", Value: "1"})
		}
		var buf bytes.Buffer
		handshake.WriteError(&buf, status, extra...)
		c.Write(buf.Bytes())
		// Lingering close: let the client read the answer instead of an RST
		// caused by unread request bytes.
		c.CloseWrite()
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		io.Copy(io.Discard, io.LimitReader(c, 64<<10))
	}
	c.Close()
}

// statusFor maps a refusal reason to its HTTP status.
func statusFor(reason string) int {
	switch reason {
	case RefuseMaxConns, RefuseNoBackend:
		return 503
	case RefusePerIPConns, RefusePerIPRate:
		return 429
	case RefuseBackendFailed, RefuseBackendHead:
		return 502
	}
	return 400
}

func tcpAddr(a net.Addr) netip.AddrPort {
	if t, ok := a.(*net.TCPAddr); ok {
		return t.AddrPort()
	}
	return netip.AddrPort{}
}
