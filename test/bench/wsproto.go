package main

// A lean RFC 6455 implementation for the load generator and the echo
// backends: raw frames over a net.Conn, preallocated buffers, no allocation
// per message, so the generator is not what the benchmark measures. It
// implements only what the benchmark sends: unfragmented binary frames,
// close, ping/pong.

import (
	"bufio"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

const (
	opBinary = 0x2
	opClose  = 0x8
	opPing   = 0x9
	opPong   = 0xA

	wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
)

// acceptKey is Sec-WebSocket-Accept for a Sec-WebSocket-Key.
func acceptKey(key string) string {
	h := sha1.Sum([]byte(key + wsGUID))
	return base64.StdEncoding.EncodeToString(h[:])
}

// newKey returns a fresh Sec-WebSocket-Key.
func newKey() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

// upgradeRequest is the client's opening handshake for path on host.
func upgradeRequest(host, path, key string) []byte {
	return []byte("GET " + path + " HTTP/1.1\r\n" +
		"Host: " + host + "\r\n" +
		"Upgrade: websocket\r\n" +
		"Connection: Upgrade\r\n" +
		"Sec-WebSocket-Key: " + key + "\r\n" +
		"Sec-WebSocket-Version: 13\r\n\r\n")
}

// readHead reads an HTTP head (up to the empty line) and returns its lines.
func readHead(br *bufio.Reader) ([]string, error) {
	var lines []string
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return nil, fmt.Errorf("reading head: %w", err)
		}
		s := strings.TrimRight(string(line), "\r\n")
		if s == "" {
			return lines, nil
		}
		lines = append(lines, s)
		if len(lines) > 100 {
			return nil, errors.New("head too long")
		}
	}
}

// header returns the value of header name in head lines ("" if absent).
func header(lines []string, name string) string {
	for _, l := range lines[1:] {
		k, v, ok := strings.Cut(l, ":")
		if ok && strings.EqualFold(strings.TrimSpace(k), name) {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// wsDial connects to addr, upgrades on path and returns the connection with
// the reader that holds any bytes read past the response head. hsTime is
// the time from the start of connect to the complete 101 response.
func wsDial(addr, path string, timeout time.Duration) (net.Conn, *bufio.Reader, time.Duration, error) {
	return wsDialTLS(addr, path, timeout, false)
}

// wsDialTLS is wsDial, over TLS when useTLS (the benchmark's self-signed
// certificate is not verified). The handshake time includes the TLS
// handshake.
func wsDialTLS(addr, path string, timeout time.Duration, useTLS bool) (net.Conn, *bufio.Reader, time.Duration, error) {
	t0 := time.Now()
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, nil, 0, err
	}
	_ = c.SetDeadline(time.Now().Add(timeout))
	if useTLS {
		tc := tls.Client(c, &tls.Config{ServerName: "localhost", InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
		if err := tc.Handshake(); err != nil {
			c.Close()
			return nil, nil, 0, fmt.Errorf("tls handshake: %w", err)
		}
		c = tc
	}
	key := newKey()
	if _, err := c.Write(upgradeRequest(addr, path, key)); err != nil {
		c.Close()
		return nil, nil, 0, err
	}
	br := bufio.NewReaderSize(c, 4096)
	lines, err := readHead(br)
	if err != nil {
		c.Close()
		return nil, nil, 0, err
	}
	hs := time.Since(t0)
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "HTTP/1.1 101") {
		c.Close()
		return nil, nil, 0, fmt.Errorf("upgrade refused: %q", strings.Join(lines, " | "))
	}
	if got := header(lines, "Sec-WebSocket-Accept"); got != acceptKey(key) {
		c.Close()
		return nil, nil, 0, fmt.Errorf("bad Sec-WebSocket-Accept %q", got)
	}
	_ = c.SetDeadline(time.Time{})
	return c, br, hs, nil
}

// frameHeader writes a frame header into b (at least 14 bytes) and returns
// its length. mask, when non-nil, sets the mask bit and appends the key.
func frameHeader(b []byte, op byte, n int, mask []byte) int {
	b[0] = 0x80 | op
	var m byte
	if mask != nil {
		m = 0x80
	}
	i := 2
	switch {
	case n < 126:
		b[1] = m | byte(n)
	case n <= 0xFFFF:
		b[1] = m | 126
		binary.BigEndian.PutUint16(b[2:], uint16(n))
		i = 4
	default:
		b[1] = m | 127
		binary.BigEndian.PutUint64(b[2:], uint64(n))
		i = 10
	}
	if mask != nil {
		copy(b[i:], mask[:4])
		i += 4
	}
	return i
}

// maskBytes XORs p with key, starting at key offset 0 (RFC 6455 5.3).
func maskBytes(p, key []byte) {
	var k [8]byte
	for i := range 8 {
		k[i] = key[i&3]
	}
	k64 := binary.LittleEndian.Uint64(k[:])
	i := 0
	for ; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], binary.LittleEndian.Uint64(p[i:])^k64)
	}
	for ; i < len(p); i++ {
		p[i] ^= key[i&3]
	}
}

// clientFrame builds a complete masked client frame carrying payload.
func clientFrame(op byte, payload []byte) []byte {
	var key [4]byte
	_, _ = rand.Read(key[:])
	b := make([]byte, 14+len(payload))
	h := frameHeader(b, op, len(payload), key[:])
	copy(b[h:], payload)
	maskBytes(b[h:], key[:])
	return b[:h+len(payload)]
}

// frame is one parsed frame header.
type frame struct {
	op     byte
	n      int
	masked bool
	key    [4]byte
}

// readFrameHeader reads a frame header from br.
func readFrameHeader(br *bufio.Reader) (frame, error) {
	var f frame
	var h [8]byte
	if _, err := io.ReadFull(br, h[:2]); err != nil {
		return f, err
	}
	if h[0]&0x80 == 0 {
		return f, errors.New("fragmented frames are not used by the benchmark")
	}
	f.op = h[0] & 0x0F
	f.masked = h[1]&0x80 != 0
	n := int(h[1] & 0x7F)
	switch n {
	case 126:
		if _, err := io.ReadFull(br, h[:2]); err != nil {
			return f, err
		}
		n = int(binary.BigEndian.Uint16(h[:2]))
	case 127:
		if _, err := io.ReadFull(br, h[:8]); err != nil {
			return f, err
		}
		u := binary.BigEndian.Uint64(h[:8])
		if u > 1<<30 {
			return f, fmt.Errorf("frame of %d bytes is too large", u)
		}
		n = int(u)
	}
	f.n = n
	if f.masked {
		if _, err := io.ReadFull(br, f.key[:]); err != nil {
			return f, err
		}
	}
	return f, nil
}

// closeFrame is a close frame with status 1000; masked when from a client.
func closeFrame(client bool) []byte {
	payload := []byte{0x03, 0xE8}
	if client {
		return clientFrame(opClose, payload)
	}
	b := make([]byte, 4)
	frameHeader(b, opClose, 2, nil)
	copy(b[2:], payload)
	return b
}
