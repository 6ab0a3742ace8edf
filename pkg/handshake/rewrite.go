package handshake

import (
	"net/netip"
	"slices"
)

// Forwarding says what AppendRewritten adds to the head it sends to the
// backend.
type Forwarding struct {
	// ClientAddr is the TCP peer. A v4-mapped IPv6 address is written as
	// IPv4 and a zone is dropped. If it is not valid, X-Forwarded-For and
	// X-Real-IP are not added (client-sent X-Real-IP is still removed).
	ClientAddr netip.AddrPort

	// Proto is "http" or "https", sent as X-Forwarded-Proto. If it is not
	// a token it is not sent (client-sent X-Forwarded-Proto is still
	// removed).
	Proto string

	// Headers adds X-Forwarded-For (the client's own X-Forwarded-For
	// values, then ", " and the client address, as one header),
	// X-Real-IP and X-Forwarded-Proto, after the other headers. Client-sent
	// X-Real-IP and X-Forwarded-Proto are removed so a client cannot spoof
	// them; its X-Forwarded-For is kept as the start of the chain, which
	// backends must read from the right.
	Headers bool

	// Close is for a request that is not an upgrade: it removes the
	// hop-by-hop headers (Connection, Keep-Alive, Proxy-Connection, TE,
	// Upgrade, Proxy-Authorization, and the names listed in Connection)
	// and sends "Connection: close", the nginx
	// "map $http_upgrade $connection_upgrade" idiom. Removing Upgrade also
	// stops "Upgrade: h2c" from turning the connection into HTTP/2 behind
	// the balancer's back. Host, Content-Length and Transfer-Encoding are
	// never removed, even if Connection lists them: the body follows the
	// head unchanged and its framing must reach the backend. Close on an
	// upgrade request turns it into a plain request.
	Close bool
}

// AppendRewritten appends to dst the head to send to the backend and
// returns the extended slice: the same request line, the same headers in
// the same order (Host kept, names as received, values trimmed, one
// "Name: value" per line), minus what fw removes, plus what fw adds, and
// the final CRLF CRLF. Without Close it keeps Upgrade and Connection as the
// client sent them.
//
// r must come from ParseRequest (unmodified): the output is built only from
// what it accepted, so ParseRequest of the output accepts it (given room
// for the added headers in the limits) with the same Method, Target, Host,
// framing headers, and — unless Close — the same Upgrade.
//
// It allocates only if dst lacks room; with a reused dst it does not
// allocate.
func (r *Request) AppendRewritten(dst []byte, fw Forwarding) []byte {
	dst = slices.Grow(dst, r.rewrittenSizeHint())
	dst = append(dst, r.Method...)
	dst = append(dst, ' ')
	dst = append(dst, r.Target...)
	dst = append(dst, ' ')
	dst = append(dst, r.Proto...)
	dst = append(dst, "\r\n"...)
	hasXFF := false
	for _, h := range r.Headers {
		if fw.Close && r.hopByHop(h.Name) {
			continue
		}
		if fw.Headers {
			if nameIs(h.Name, "X-Forwarded-For") {
				hasXFF = true
				continue
			}
			if nameIs(h.Name, "X-Real-IP") || nameIs(h.Name, "X-Forwarded-Proto") {
				continue
			}
		}
		dst = appendField(dst, h.Name, h.Value)
	}
	if fw.Close {
		dst = append(dst, "Connection: close\r\n"...)
	}
	if fw.Headers {
		ip := fw.ClientAddr.Addr().Unmap().WithZone("")
		if ip.IsValid() {
			dst = append(dst, "X-Forwarded-For: "...)
			if hasXFF {
				// Several client X-Forwarded-For lines are one list
				// (RFC 9110 §5.3); send it as one line so a backend
				// that reads only the last line still sees the chain.
				for _, h := range r.Headers {
					if h.Value == "" || !nameIs(h.Name, "X-Forwarded-For") || fw.Close && r.hopByHop(h.Name) {
						continue
					}
					dst = append(dst, h.Value...)
					dst = append(dst, ", "...)
				}
			}
			dst = ip.AppendTo(dst)
			dst = append(dst, "\r\nX-Real-IP: "...)
			dst = ip.AppendTo(dst)
			dst = append(dst, "\r\n"...)
		} else if hasXFF {
			for _, h := range r.Headers {
				if nameIs(h.Name, "X-Forwarded-For") && !(fw.Close && r.hopByHop(h.Name)) {
					dst = appendField(dst, h.Name, h.Value)
				}
			}
		}
		if isToken(fw.Proto) {
			dst = appendField(dst, "X-Forwarded-Proto", fw.Proto)
		}
	}
	return append(dst, "\r\n"...)
}

func appendField(dst []byte, name, value string) []byte {
	dst = append(dst, name...)
	dst = append(dst, ": "...)
	dst = append(dst, value...)
	return append(dst, "\r\n"...)
}

// rewrittenSizeHint is the size of the head as parsed plus room for the
// forwarding headers, so AppendRewritten grows dst at most once.
func (r *Request) rewrittenSizeHint() int {
	n := len(r.Method) + len(r.Target) + len(r.Proto) + 4 + 2
	for _, h := range r.Headers {
		n += len(h.Name) + len(h.Value) + 4
	}
	return n + 160
}

// hopByHop reports whether Close mode removes the header name: the
// hop-by-hop headers of RFC 9110 §7.6.1 and RFC 2616 §13.5.1 and whatever
// the client's Connection headers list, except the headers that carry the
// request's identity and framing.
func (r *Request) hopByHop(name string) bool {
	switch len(name) {
	case 2:
		return nameIs(name, "TE")
	case 7:
		return nameIs(name, "Upgrade") || r.listedInConnection(name)
	case 10:
		return nameIs(name, "Connection") || nameIs(name, "Keep-Alive") || r.listedInConnection(name)
	case 16:
		return nameIs(name, "Proxy-Connection") || r.listedInConnection(name)
	case 19:
		return nameIs(name, "Proxy-Authorization") || r.listedInConnection(name)
	case 4, 14, 17:
		if nameIs(name, "Host") || nameIs(name, "Content-Length") || nameIs(name, "Transfer-Encoding") {
			return false
		}
	}
	return r.listedInConnection(name)
}

// listedInConnection reports whether a Connection header lists name.
func (r *Request) listedInConnection(name string) bool {
	for _, h := range r.Headers {
		if nameIs(h.Name, "Connection") && listHas(h.Value, name) {
			return true
		}
	}
	return false
}
