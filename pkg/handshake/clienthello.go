package handshake

import (
	"errors"
	"fmt"
	"io"
	"strings"
)

// TLS record and handshake constants (RFC 8446 §5.1, §4).
const (
	recordHeaderLen    = 5
	recordTypeHS       = 22      // handshake
	maxPlaintextRecord = 1 << 14 // a record's fragment length limit
	hsTypeClientHello  = 1
	hsHeaderLen        = 4

	extServerName        = 0
	extALPN              = 16
	extSupportedVersions = 43
)

// Errors of ReadClientHello and ParseClientHello. Each error they return
// wraps exactly one of these (or is an I/O error), so errors.Is tells the
// caller what to count.
var (
	// ErrNotTLS: the first bytes are not a TLS handshake record (plain
	// HTTP, SSLv2, junk). It is known from the first byte.
	ErrNotTLS = errors.New("handshake: not a TLS handshake")
	// ErrMalformedHello: TLS records that do not hold a well-formed
	// ClientHello, or one that two TLS stacks could read differently
	// (duplicate extensions, several host names).
	ErrMalformedHello = errors.New("handshake: malformed ClientHello")
	// ErrHelloTooLarge: the ClientHello does not end within the limit.
	ErrHelloTooLarge = errors.New("handshake: ClientHello too large")
)

// ClientHello is what a balancer needs from a TLS ClientHello to route
// the connection without decrypting it.
type ClientHello struct {
	// ServerName is the SNI host name in lower case, "" when the client
	// sent none. It is a valid DNS name (letters, digits, '-', '_', dots;
	// no trailing dot).
	ServerName string
	// ALPN lists the protocols the client offers, in its order.
	ALPN []string
	// Versions are the TLS versions the client offers (supported_versions,
	// or the legacy version alone when that extension is absent), e.g.
	// 0x0304 for TLS 1.3.
	Versions []uint16
	// Len is the number of bytes, record headers included, from the start
	// of the stream to the end of the record that completes the ClientHello.
	Len int
}

// MaxVersion returns the highest version offered (0x0303 = TLS 1.2), or 0.
func (h *ClientHello) MaxVersion() uint16 {
	var v uint16
	for _, x := range h.Versions {
		// GREASE values (0x?a?a) are not versions.
		if x&0x0f0f == 0x0a0a {
			continue
		}
		v = max(v, x)
	}
	return v
}

// ReadClientHello reads from r until the ClientHello at the start of a TLS
// stream is complete, however the bytes are split into reads (records and
// TCP segments alike), and never reads more than maxBytes bytes in total.
// raw is everything read, which a passthrough proxy forwards before the rest
// of the stream: it is returned with every error except I/O errors before
// the first byte, so a malformed stream can still be passed on.
//
// A first byte that cannot start a TLS handshake record is ErrNotTLS at
// once, without waiting for more. EOF before the end of the hello is
// io.ErrUnexpectedEOF (io.EOF when nothing was read). Other read errors (the
// caller's deadline, a reset) are returned wrapped. ReadClientHello sets no
// deadline; the caller bounds the time.
func ReadClientHello(r io.Reader, maxBytes int) (hello *ClientHello, raw []byte, err error) {
	if maxBytes < recordHeaderLen+hsHeaderLen {
		maxBytes = recordHeaderLen + hsHeaderLen
	}
	buf := make([]byte, min(2048, maxBytes))
	n, need := 0, 1
	for empty := 0; ; {
		if n == len(buf) {
			grown := make([]byte, min(max(2*len(buf), need), maxBytes))
			copy(grown, buf[:n])
			buf = grown
		}
		m, rerr := r.Read(buf[n:])
		if m < 0 || m > len(buf)-n {
			return nil, buf[:n], errBadReader
		}
		n += m
		if n >= need {
			hello, need, err = parseHello(buf[:n], maxBytes)
			if err != nil || hello != nil {
				return hello, buf[:n], err
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				if n == 0 {
					return nil, nil, io.EOF
				}
				return nil, buf[:n], io.ErrUnexpectedEOF
			}
			return nil, buf[:n], fmt.Errorf("reading ClientHello: %w", rerr)
		}
		if m == 0 {
			if empty++; empty >= 100 {
				return nil, buf[:n], io.ErrNoProgress
			}
		} else {
			empty = 0
		}
	}
}

// ParseClientHello parses the ClientHello at the start of data, which
// holds TLS records as they came from the client. It returns
// io.ErrUnexpectedEOF when data ends before the hello does, and ErrNotTLS,
// ErrMalformedHello or ErrHelloTooLarge (beyond maxBytes) like
// ReadClientHello.
func ParseClientHello(data []byte, maxBytes int) (*ClientHello, error) {
	h, _, err := parseHello(data, maxBytes)
	if err == nil && h == nil {
		return nil, io.ErrUnexpectedEOF
	}
	return h, err
}

// parseHello returns the hello when data holds all of it, else need: the
// length data must reach before anything new can be learnt (so a reader fed
// one byte at a time does not re-parse on every byte).
func parseHello(data []byte, maxBytes int) (*ClientHello, int, error) {
	msg, wire, need, err := assembleHello(data, maxBytes)
	if err != nil || msg == nil {
		return nil, need, err
	}
	h, err := parseHelloBody(msg[hsHeaderLen:])
	if err != nil {
		return nil, 0, err
	}
	h.Len = wire
	return h, 0, nil
}

// assembleHello walks the handshake records at the start of data and
// joins their fragments until the ClientHello message is whole. A hello
// may span several records (RFC 8446 §5.1); other record types may not
// come between them.
func assembleHello(data []byte, maxBytes int) (msg []byte, wire, need int, err error) {
	if len(data) > 0 && data[0] != recordTypeHS {
		return nil, 0, 0, fmt.Errorf("%w: first byte 0x%02x", ErrNotTLS, data[0])
	}
	var joined []byte // only when the hello spans records
	off := 0
	for {
		if len(data)-off < recordHeaderLen {
			need, err := checkNeed(off+recordHeaderLen, maxBytes)
			return nil, 0, need, err
		}
		hdr := data[off : off+recordHeaderLen]
		if hdr[0] != recordTypeHS {
			return nil, 0, 0, fmt.Errorf("%w: record type %d inside the hello", ErrMalformedHello, hdr[0])
		}
		if hdr[1] != 3 {
			if off == 0 {
				return nil, 0, 0, fmt.Errorf("%w: record version %d.%d", ErrNotTLS, hdr[1], hdr[2])
			}
			return nil, 0, 0, fmt.Errorf("%w: record version %d.%d", ErrMalformedHello, hdr[1], hdr[2])
		}
		rl := int(hdr[3])<<8 | int(hdr[4])
		if rl == 0 || rl > maxPlaintextRecord {
			return nil, 0, 0, fmt.Errorf("%w: record length %d", ErrMalformedHello, rl)
		}
		end := off + recordHeaderLen + rl
		if len(data) < end {
			need, err := checkNeed(end, maxBytes)
			return nil, 0, need, err
		}
		frag := data[off+recordHeaderLen : end]
		if off == 0 {
			msg = frag
		} else {
			if joined == nil {
				joined = append(make([]byte, 0, 2*len(msg)+len(frag)), msg...)
			}
			joined = append(joined, frag...)
			msg = joined
		}
		off = end
		if len(msg) < hsHeaderLen {
			continue
		}
		if msg[0] != hsTypeClientHello {
			return nil, 0, 0, fmt.Errorf("%w: handshake type %d, not ClientHello", ErrMalformedHello, msg[0])
		}
		total := hsHeaderLen + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]))
		// The records carrying total bytes need at least one header per
		// 16 KiB: if even that cannot fit, stop now.
		if minWire := total + recordHeaderLen*((total+maxPlaintextRecord-1)/maxPlaintextRecord); minWire > maxBytes {
			return nil, 0, 0, fmt.Errorf("%w: %d bytes, limit %d", ErrHelloTooLarge, total, maxBytes)
		}
		if len(msg) >= total {
			// Bytes after the hello in its last record would be a second
			// handshake message, which a client never sends before the
			// server answers.
			if len(msg) > total {
				return nil, 0, 0, fmt.Errorf("%w: %d bytes after the ClientHello in its record", ErrMalformedHello, len(msg)-total)
			}
			return msg, off, 0, nil
		}
	}
}

func checkNeed(need, maxBytes int) (int, error) {
	if need > maxBytes {
		return 0, fmt.Errorf("%w: needs more than %d bytes", ErrHelloTooLarge, maxBytes)
	}
	return need, nil
}

// parseHelloBody reads a ClientHello body (RFC 8446 §4.1.2, RFC 5246
// §7.4.1.2). It is strict wherever a lenient reading could let the backend's
// TLS stack see a different server name than the balancer routed on.
func parseHelloBody(b []byte) (*ClientHello, error) {
	bad := func(what string) (*ClientHello, error) {
		return nil, fmt.Errorf("%w: %s", ErrMalformedHello, what)
	}
	s := cursor(b)
	legacy, ok := s.u16()
	if !ok || !s.skip(32) {
		return bad("short version or random")
	}
	if legacy>>8 != 3 {
		return bad(fmt.Sprintf("legacy version 0x%04x", legacy))
	}
	sid, ok := s.vec8()
	if !ok || len(sid) > 32 {
		return bad("session id")
	}
	suites, ok := s.vec16()
	if !ok || len(suites) < 2 || len(suites)%2 != 0 {
		return bad("cipher suites")
	}
	comp, ok := s.vec8()
	if !ok || len(comp) < 1 {
		return bad("compression methods")
	}
	h := &ClientHello{Versions: []uint16{legacy}}
	if len(s) == 0 {
		return h, nil // no extensions (TLS 1.2 and older allow it)
	}
	exts, ok := s.vec16()
	if !ok || len(s) != 0 {
		return bad("extensions block length")
	}
	seen := map[uint16]bool{}
	for len(exts) > 0 {
		typ, ok := exts.u16()
		if !ok {
			return bad("extension type")
		}
		data, ok := exts.vec16()
		if !ok {
			return bad(fmt.Sprintf("extension %d length", typ))
		}
		if seen[typ] {
			return bad(fmt.Sprintf("extension %d repeated", typ))
		}
		seen[typ] = true
		switch typ {
		case extServerName:
			name, err := parseSNI(data)
			if err != nil {
				return nil, err
			}
			h.ServerName = name
		case extALPN:
			list, ok := data.vec16()
			if !ok || len(data) != 0 || len(list) == 0 {
				return bad("alpn")
			}
			for len(list) > 0 {
				p, ok := list.vec8()
				if !ok || len(p) == 0 {
					return bad("alpn protocol")
				}
				h.ALPN = append(h.ALPN, string(p))
			}
		case extSupportedVersions:
			list, ok := data.vec8()
			if !ok || len(data) != 0 || len(list) < 2 || len(list)%2 != 0 {
				return bad("supported_versions")
			}
			h.Versions = h.Versions[:0]
			for len(list) > 0 {
				v, _ := list.u16()
				h.Versions = append(h.Versions, v)
			}
		}
	}
	return h, nil
}

// parseSNI reads the server_name extension (RFC 6066 §3): exactly one
// host_name entry (other name types are skipped, as TLS stacks do), a valid
// DNS name, returned in lower case.
func parseSNI(data cursor) (string, error) {
	bad := func(what string) (string, error) {
		return "", fmt.Errorf("%w: server_name %s", ErrMalformedHello, what)
	}
	list, ok := data.vec16()
	if !ok || len(data) != 0 || len(list) == 0 {
		return bad("list length")
	}
	name := ""
	found := false
	for len(list) > 0 {
		typ, ok := list.u8()
		if !ok {
			return bad("entry")
		}
		v, ok := list.vec16()
		if !ok {
			return bad("entry length")
		}
		if typ != 0 {
			continue
		}
		if found {
			return bad("holds two host names")
		}
		found = true
		if !validHostName(v) {
			return bad(fmt.Sprintf("%q is not a host name", truncate(string(v), 64)))
		}
		name = strings.ToLower(string(v))
	}
	return name, nil
}

// validHostName: 1 to 253 bytes of letters, digits, '-', '_' and dots,
// labels 1 to 63 bytes, no trailing dot (RFC 6066 forbids it).
func validHostName(b []byte) bool {
	if len(b) == 0 || len(b) > 253 {
		return false
	}
	label := 0
	for _, c := range b {
		switch {
		case c == '.':
			if label == 0 {
				return false
			}
			label = 0
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_':
			if label++; label > 63 {
				return false
			}
		default:
			return false
		}
	}
	return label > 0
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// cursor reads big-endian TLS vectors from a byte slice.
type cursor []byte

func (c *cursor) u8() (uint8, bool) {
	if len(*c) < 1 {
		return 0, false
	}
	v := (*c)[0]
	*c = (*c)[1:]
	return v, true
}

func (c *cursor) u16() (uint16, bool) {
	if len(*c) < 2 {
		return 0, false
	}
	v := uint16((*c)[0])<<8 | uint16((*c)[1])
	*c = (*c)[2:]
	return v, true
}

func (c *cursor) skip(n int) bool {
	if len(*c) < n {
		return false
	}
	*c = (*c)[n:]
	return true
}

func (c *cursor) vec8() (cursor, bool) {
	n, ok := c.u8()
	if !ok || len(*c) < int(n) {
		return nil, false
	}
	v := (*c)[:n]
	*c = (*c)[n:]
	return v, true
}

func (c *cursor) vec16() (cursor, bool) {
	n, ok := c.u16()
	if !ok || len(*c) < int(n) {
		return nil, false
	}
	v := (*c)[:n]
	*c = (*c)[n:]
	return v, true
}
