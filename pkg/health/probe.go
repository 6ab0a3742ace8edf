package health

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// CheckType is the kind of active check; the values are the config's
// health.type field.
type CheckType string

// The active checks.
const (
	// CheckNone runs no active check: only passive checks change a
	// backend's state.
	CheckNone CheckType = "none"
	// CheckTCP passes when a TCP connect succeeds within the timeout. A
	// process that is wedged but whose socket still listens passes it: the
	// kernel completes the handshake from the accept queue.
	CheckTCP CheckType = "tcp"
	// CheckHTTP sends GET Path and passes on a status in one of the
	// expected classes.
	CheckHTTP CheckType = "http"
	// CheckWebSocket sends a real upgrade request and passes on 101 with
	// the right Sec-WebSocket-Accept, then closes with a close frame.
	CheckWebSocket CheckType = "websocket"
)

// maxResponseHead bounds the response head a check reads. A backend that
// answers with more is broken for our purposes.
const maxResponseHead = 16 << 10

// closeWait bounds how long a passed WebSocket check waits for the
// server's answer to its close frame.
const closeWait = 100 * time.Millisecond

// userAgent identifies checks in backend access logs.
const userAgent = "wsplice-health/1"

// wsGUID is the fixed GUID of RFC 6455 §1.3 that the accept value hashes.
const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// statusMask is a set of status classes: bit c is set when cxx passes.
type statusMask uint8

// parseExpect turns ["http_2xx", "http_3xx"] into a mask. An empty list
// means 2xx and 3xx, nginx_upstream_check_module's usual
// check_http_expect_alive.
func parseExpect(list []string) (statusMask, error) {
	if len(list) == 0 {
		return 1<<2 | 1<<3, nil
	}
	var m statusMask
	for _, e := range list {
		if len(e) != 8 || !strings.HasPrefix(e, "http_") || !strings.HasSuffix(e, "xx") || e[5] < '1' || e[5] > '5' {
			return 0, fmt.Errorf("expect %q: use http_1xx … http_5xx", e)
		}
		m |= 1 << (e[5] - '0')
	}
	return m, nil
}

func (m statusMask) has(status int) bool {
	c := status / 100
	return c >= 1 && c <= 5 && m&(1<<c) != 0
}

func (m statusMask) String() string {
	var parts []string
	for c := 1; c <= 5; c++ {
		if m&(1<<c) != 0 {
			parts = append(parts, fmt.Sprintf("http_%dxx", c))
		}
	}
	return strings.Join(parts, ", ")
}

// prober runs one kind of active check against an address.
type prober struct {
	typ     CheckType
	timeout time.Duration
	path    string
	host    string // Host header; empty: the backend address
	expect  statusMask
}

// probe runs one check against addr and returns nil when it passed. It
// never takes longer than p.timeout (plus scheduling): the connect, the
// request and the response share one deadline.
func (p *prober) probe(ctx context.Context, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	d := net.Dialer{}
	// Multipath TCP would only add a subflow handshake to a check.
	d.SetMultipathTCP(false)
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("connect: %w", cleanErr(err))
	}
	defer c.Close()
	if p.typ == CheckTCP {
		return nil
	}
	dl, _ := ctx.Deadline()
	c.SetDeadline(dl)
	// Closing the connection when ctx ends makes Stop interrupt a check
	// that waits on a slow backend instead of waiting out the timeout.
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	host := p.host
	if host == "" {
		host = addr
	}
	switch p.typ {
	case CheckHTTP:
		return p.httpCheck(c, host)
	case CheckWebSocket:
		return p.wsCheck(c, host, dl)
	}
	return fmt.Errorf("unknown check type %q", p.typ)
}

// httpCheck sends GET and judges the status line; the body is not read.
func (p *prober) httpCheck(c net.Conn, host string) error {
	req := "GET " + p.path + " HTTP/1.1\r\nHost: " + host + "\r\nUser-Agent: " + userAgent +
		"\r\nAccept: */*\r\nConnection: close\r\n\r\n"
	if _, err := io.WriteString(c, req); err != nil {
		return fmt.Errorf("send request: %w", cleanErr(err))
	}
	resp, err := readResponse(c)
	if err != nil {
		return err
	}
	if !p.expect.has(resp.StatusCode) {
		return fmt.Errorf("status %d, want %s", resp.StatusCode, p.expect)
	}
	return nil
}

// wsCheck performs an RFC 6455 opening handshake with a fresh random key,
// checks the 101 and its accept value, then closes the WebSocket with a
// masked close frame (1001 going away) and waits, within the deadline, for
// the server to end the connection, so a backend sees a clean close rather
// than an abnormal one.
func (p *prober) wsCheck(c net.Conn, host string, deadline time.Time) error {
	var raw [16]byte
	rand.Read(raw[:])
	key := base64.StdEncoding.EncodeToString(raw[:])
	req := "GET " + p.path + " HTTP/1.1\r\nHost: " + host + "\r\nUser-Agent: " + userAgent +
		"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key +
		"\r\nSec-WebSocket-Version: 13\r\n\r\n"
	if _, err := io.WriteString(c, req); err != nil {
		return fmt.Errorf("send upgrade: %w", cleanErr(err))
	}
	resp, err := readResponse(c)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return fmt.Errorf("status %d, want 101 Switching Protocols", resp.StatusCode)
	}
	if !strings.EqualFold(resp.Header.Get("Upgrade"), "websocket") {
		return fmt.Errorf("101 without Upgrade: websocket (got %q)", resp.Header.Get("Upgrade"))
	}
	if !headerHasToken(resp.Header, "Connection", "upgrade") {
		return errors.New("101 without Connection: Upgrade")
	}
	if got, want := resp.Header.Get("Sec-WebSocket-Accept"), acceptKey(key); got != want {
		return fmt.Errorf("wrong Sec-WebSocket-Accept %q, want %q", got, want)
	}
	// The handshake passed; what follows is courtesy and cannot fail the
	// check: send a close frame and give the server a moment to answer it
	// and hang up, so it logs a clean close rather than an abnormal one.
	c.Write(closeFrame(1001, "health check"))
	if dl := time.Now().Add(closeWait); dl.Before(deadline) {
		c.SetReadDeadline(dl)
	}
	io.Copy(io.Discard, io.LimitReader(c, 64<<10))
	return nil
}

// readResponse reads and parses a response head of at most maxResponseHead
// bytes.
func readResponse(c net.Conn) (*http.Response, error) {
	br := bufio.NewReaderSize(io.LimitReader(c, maxResponseHead), 4096)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, errors.New("read response: connection closed before a response")
		}
		return nil, fmt.Errorf("read response: %w", cleanErr(err))
	}
	return resp, nil
}

// acceptKey is the Sec-WebSocket-Accept value a server must send for key.
func acceptKey(key string) string {
	h := sha1.Sum([]byte(key + wsGUID))
	return base64.StdEncoding.EncodeToString(h[:])
}

// closeFrame is a client close frame: FIN + opcode 8, masked as RFC 6455
// §5.3 requires of every client frame.
func closeFrame(code uint16, reason string) []byte {
	payload := binary.BigEndian.AppendUint16(nil, code)
	payload = append(payload, reason...)
	if len(payload) > 125 {
		payload = payload[:125]
	}
	var mask [4]byte
	rand.Read(mask[:])
	f := []byte{0x88, 0x80 | byte(len(payload))}
	f = append(f, mask[:]...)
	for i, b := range payload {
		f = append(f, b^mask[i%4])
	}
	return f
}

// headerHasToken reports whether a comma-separated header contains token,
// case-insensitively ("Connection: keep-alive, Upgrade").
func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// cleanErr shortens a net error for logs and history: "dial tcp
// 127.0.0.1:1: connect: connection refused" becomes "connection refused",
// and a deadline becomes "timeout".
func cleanErr(err error) error {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, errTimeout{}) {
		return errTimeout{}
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return errTimeout{}
	}
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		inner := oe.Err
		for u := errors.Unwrap(inner); u != nil; u = errors.Unwrap(inner) {
			inner = u
		}
		return inner
	}
	return err
}

// errTimeout is a check that did not finish within its timeout.
type errTimeout struct{}

func (errTimeout) Error() string   { return "timeout" }
func (errTimeout) Timeout() bool   { return true }
func (errTimeout) Temporary() bool { return true }
