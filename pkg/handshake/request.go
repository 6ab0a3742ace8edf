package handshake

import (
	"bytes"
	"fmt"
	"net/url"
	"strings"
)

// Header is one header field line, as received: Name as the peer spelled
// it, Value with the surrounding whitespace removed.
type Header struct{ Name, Value string }

// Request is a parsed request head. Every string is a substring of one copy
// of the head, so a Request does not alias the caller's buffer.
type Request struct {
	Method string // "GET"; a token, case-sensitive
	Target string // the request-target as received: "/ws/chat?x=1"
	Proto  string // "HTTP/1.1" or "HTTP/1.0"

	// Path and RawQuery are split from Target at the first '?', not
	// decoded or normalised: a backend may decode "%2F" or resolve "/../"
	// and so see another path than a prefix match on Path did. For an
	// absolute-form target ("http://h/p?q") they are the parts after the
	// authority (Path "/" when empty); for "*" (OPTIONS only) Path is "*".
	Path, RawQuery string

	// Host is the Host header, lower-cased, port kept ("example.com:8080");
	// for an absolute-form target it is the target's authority, which the
	// Host header (if any) must equal. It may be "" on HTTP/1.0.
	Host string

	// Headers holds every header line in the order received.
	Headers []Header

	// Upgrade reports a valid WebSocket upgrade (RFC 6455 §4.2.1): GET,
	// HTTP/1.1, Upgrade headers listing "websocket" and nothing else,
	// Connection headers listing "upgrade" and at most "keep-alive"
	// besides, one Sec-WebSocket-Key that decodes to 16 bytes, one
	// Sec-WebSocket-Version of 13, and no body. Those two headers reach
	// the backend as sent, so nothing else may ride in them.
	Upgrade bool
}

var crlfcrlf = []byte("\r\n\r\n")

// ParseRequest parses a request head as returned by ReadHead (it must end
// with CRLF CRLF and contain nothing after that) and validates it. Errors
// are always *Error. A plain request (no "Upgrade: websocket") parses with
// Upgrade false; a request that asks for websocket but gets the handshake
// wrong is an error, so Upgrade true means the whole handshake is valid.
//
// The rules, with their status and Reason:
//   - head over lim.MaxHeadBytes: 431 head_too_large; more than
//     lim.MaxHeaders header lines: 431 too_many_headers; a line over
//     lim.MaxLineBytes: 431 line_too_long;
//   - request line not exactly METHOD SP target SP HTTP/x.y, a method that
//     is not a token, a target with bytes outside 0x21–0x7E, a '#' or a
//     '%' not followed by two hex digits, a
//     target that is not origin-form, absolute-form (http, https, ws, wss)
//     or "*" for OPTIONS: 400 malformed;
//   - a version other than HTTP/1.1 and HTTP/1.0: 505 http_version;
//   - CONNECT: 501 method;
//   - bare CR or LF, obs-fold, whitespace before a colon, duplicate or
//     non-digit Content-Length, Transfer-Encoding with Content-Length, on
//     HTTP/1.0, repeated, or not ending in chunked: 400 smuggling;
//   - a header name that is not a token, no colon, a control character
//     other than HTAB in a value, a repeated Origin: 400 malformed;
//   - no Host on HTTP/1.1, two Hosts, an invalid Host, or a Host that is
//     not the absolute-form target's authority: 400 host;
//   - "Upgrade: websocket" with Transfer-Encoding or a non-zero
//     Content-Length: 400 smuggling; with a method other than GET, on
//     HTTP/1.0, without "Connection: upgrade", with another protocol in
//     Upgrade or an option other than upgrade and keep-alive in
//     Connection, without exactly one
//     valid Sec-WebSocket-Key, or with two Sec-WebSocket-Version headers:
//     400 bad_upgrade; with a Sec-WebSocket-Version that is missing or not
//     13: 426 bad_version (answer with WriteError(w, 426), which lists 13).
//
// The cost is one pass over the head and three allocations (the string
// copy, the Request, the Headers slice), plus one if Host has upper case.
func ParseRequest(head []byte, lim Limits) (*Request, error) {
	lim = lim.withDefaults()
	if err := checkHead(head, lim); err != nil {
		return nil, err
	}
	// Count the lines before allocating anything that depends on them, so
	// a hostile head costs no allocation.
	nHeaders := bytes.Count(head, []byte{'\n'}) - 2
	if nHeaders > lim.MaxHeaders {
		return nil, newError(431, ReasonTooManyHeaders, fmt.Sprintf("more than %d header lines", lim.MaxHeaders))
	}
	s := string(head)
	line, p, err := nextLine(s, 0, lim)
	if err != nil {
		return nil, err
	}
	r := &Request{}
	if err := r.parseRequestLine(line); err != nil {
		return nil, err
	}
	r.Headers = make([]Header, 0, nHeaders)
	var (
		hosts, contentLengths, transferEncodings int
		keys, versions, origins                  int
		host, key, version, te                   string
		contentLength                            int64
		wantsWebSocket, connUpgrade              bool
		upgradeOther, connOther                  string // first option other than websocket / upgrade, keep-alive
	)
	for {
		line, p, err = nextLine(s, p, lim)
		if err != nil {
			return nil, err
		}
		if line == "" {
			break
		}
		h, err := parseField(line)
		if err != nil {
			return nil, err
		}
		r.Headers = append(r.Headers, h)
		switch len(h.Name) {
		case 4:
			if nameIs(h.Name, "Host") {
				hosts++
				host = h.Value
			}
		case 6:
			if nameIs(h.Name, "Origin") {
				origins++
			}
		case 7:
			if nameIs(h.Name, "Upgrade") {
				wantsWebSocket = wantsWebSocket || listHas(h.Value, "websocket")
				if upgradeOther == "" {
					upgradeOther = firstOther(h.Value, "websocket", "")
				}
			}
		case 10:
			if nameIs(h.Name, "Connection") {
				connUpgrade = connUpgrade || listHas(h.Value, "upgrade")
				if connOther == "" {
					connOther = firstOther(h.Value, "upgrade", "keep-alive")
				}
			}
		case 14:
			if nameIs(h.Name, "Content-Length") {
				contentLengths++
				n, ok := parseContentLength(h.Value)
				if !ok {
					return nil, errSmuggling(fmt.Sprintf("Content-Length %.32q is not a decimal number", h.Value))
				}
				contentLength = n
			}
		case 17:
			if nameIs(h.Name, "Transfer-Encoding") {
				transferEncodings++
				te = h.Value
			} else if nameIs(h.Name, "Sec-WebSocket-Key") {
				keys++
				key = h.Value
			}
		case 21:
			if nameIs(h.Name, "Sec-WebSocket-Version") {
				versions++
				version = h.Value
			}
		}
	}
	if p != len(s) {
		return nil, errMalformed("bytes after the end of the head")
	}

	// Framing first: these are the shapes that let a backend see a
	// different request than the one routed.
	switch {
	case contentLengths > 1:
		return nil, errSmuggling("more than one Content-Length")
	case transferEncodings > 0 && contentLengths > 0:
		return nil, errSmuggling("Transfer-Encoding with Content-Length")
	case transferEncodings > 1:
		return nil, errSmuggling("more than one Transfer-Encoding")
	case transferEncodings > 0 && r.Proto == "HTTP/1.0":
		// RFC 9112 §6.1: faulty framing in HTTP/1.0.
		return nil, errSmuggling("Transfer-Encoding on HTTP/1.0")
	case transferEncodings > 0 && !chunkedLast(te):
		// RFC 9112 §6.3: the length of such a request cannot be known.
		return nil, errSmuggling(fmt.Sprintf("Transfer-Encoding %.32q does not end in chunked", te))
	case wantsWebSocket && transferEncodings > 0:
		return nil, errSmuggling("Transfer-Encoding on a websocket upgrade")
	case wantsWebSocket && contentLength > 0:
		// A GET body is ignored by some servers and read by others; on an
		// upgrade the bytes after the head are frames. Either way one side
		// would take frames for a body or a body for frames.
		return nil, errSmuggling("body on a websocket upgrade")
	}

	if err := r.setHost(hosts, host); err != nil {
		return nil, err
	}
	if origins > 1 {
		// The allow-list would check the first and the backend might use
		// the last.
		return nil, errMalformed("more than one Origin")
	}

	if !wantsWebSocket {
		return r, nil
	}
	switch {
	case r.Method != "GET":
		return nil, newError(400, ReasonBadUpgrade, fmt.Sprintf("websocket upgrade with method %.16q", r.Method))
	case r.Proto != "HTTP/1.1":
		// RFC 6455 §4.1 needs HTTP/1.1; RFC 9110 §7.8 has servers ignore
		// Upgrade on 1.0, but a client that asked for a websocket is
		// better told plainly.
		return nil, newError(400, ReasonBadUpgrade, "websocket upgrade on HTTP/1.0")
	case !connUpgrade:
		return nil, newError(400, ReasonBadUpgrade, "websocket upgrade without Connection: upgrade")
	case upgradeOther != "":
		// The head is forwarded with Upgrade as sent: a backend offered
		// "websocket, h2c" may pick h2c and speak HTTP/2 behind the
		// balancer's checks.
		return nil, newError(400, ReasonBadUpgrade, fmt.Sprintf("Upgrade offers %.32q besides websocket", upgradeOther))
	case connOther != "":
		// Connection is forwarded as sent, and a proxy in front of the
		// backend removes the headers it lists — "Connection: upgrade,
		// X-Forwarded-For" would strip the balancer's X-Forwarded-For.
		return nil, newError(400, ReasonBadUpgrade, fmt.Sprintf("Connection lists %.32q on a websocket upgrade", connOther))
	case versions > 1:
		return nil, newError(400, ReasonBadUpgrade, "more than one Sec-WebSocket-Version")
	case versions == 0:
		return nil, newError(426, ReasonBadVersion, "no Sec-WebSocket-Version")
	case version != "13":
		return nil, newError(426, ReasonBadVersion, fmt.Sprintf("Sec-WebSocket-Version %.16q", version))
	case keys != 1:
		return nil, newError(400, ReasonBadUpgrade, fmt.Sprintf("%d Sec-WebSocket-Key headers", keys))
	case !validKey(key):
		return nil, newError(400, ReasonBadUpgrade, fmt.Sprintf("Sec-WebSocket-Key %.32q is not 16 bytes in base64", key))
	}
	r.Upgrade = true
	return r, nil
}

// firstOther returns the first element of a comma-separated list that is
// neither a nor b (case-insensitive), or "" if there is none. Empty
// elements are ignored, as RFC 9110 §5.6.1 requires of recipients.
func firstOther(list, a, b string) string {
	for {
		e, rest, ok := nextElement(list)
		if !ok {
			return ""
		}
		if e != "" && !strings.EqualFold(e, a) && (b == "" || !strings.EqualFold(e, b)) {
			return e
		}
		list = rest
	}
}

// checkHead checks the bounds shared by requests and responses.
func checkHead(head []byte, lim Limits) *Error {
	if len(head) > lim.MaxHeadBytes {
		return errHeadTooLarge(lim.MaxHeadBytes)
	}
	if !bytes.HasSuffix(head, crlfcrlf) {
		return errMalformed("head does not end with CRLF CRLF")
	}
	return nil
}

// nextLine returns the line starting at s[p:] without its CRLF, and the
// index of the next line.
func nextLine(s string, p int, lim Limits) (string, int, *Error) {
	i := strings.IndexByte(s[p:], '\n')
	if i < 0 {
		return "", 0, errMalformed("unterminated line")
	}
	end := p + i
	if end == p || s[end-1] != '\r' {
		return "", 0, errSmuggling("bare LF")
	}
	line := s[p : end-1]
	if strings.IndexByte(line, '\r') >= 0 {
		return "", 0, errSmuggling("bare CR")
	}
	if len(line) > lim.MaxLineBytes {
		return "", 0, errLineTooLong(lim.MaxLineBytes)
	}
	return line, end + 1, nil
}

// parseField parses one header line (no CR or LF in it).
func parseField(line string) (Header, *Error) {
	if isOWS(line[0]) {
		// obs-fold: RFC 9112 §5.2 lets a server reject it, and a parser
		// that unfolds and one that does not disagree about the header.
		return Header{}, errSmuggling("obs-fold line")
	}
	colon := strings.IndexByte(line, ':')
	if colon < 0 {
		return Header{}, errMalformed("header line without a colon")
	}
	name := line[:colon]
	if name == "" {
		return Header{}, errMalformed("empty header name")
	}
	if isOWS(name[len(name)-1]) {
		// RFC 9112 §5.1: MUST reject; "Content-Length : 5" is read as
		// Content-Length by some and as an unknown header by others.
		return Header{}, errSmuggling("whitespace before a colon")
	}
	if !isToken(name) {
		return Header{}, errMalformed(fmt.Sprintf("header name %.32q is not a token", name))
	}
	value := trimOWS(line[colon+1:])
	for i := 0; i < len(value); i++ {
		if c := value[i]; c < ' ' && c != '\t' || c == 0x7f {
			return Header{}, errMalformed(fmt.Sprintf("control character %#02x in %.32s", c, name))
		}
	}
	return Header{Name: name, Value: value}, nil
}

// parseRequestLine parses METHOD SP request-target SP HTTP-version.
func (r *Request) parseRequestLine(line string) *Error {
	method, rest, ok := strings.Cut(line, " ")
	if !ok {
		return errMalformed("request line without a target")
	}
	target, proto, ok := strings.Cut(rest, " ")
	if !ok {
		return errMalformed("request line without a version")
	}
	// The version is checked before the rest so the HTTP/2 preface
	// ("PRI * HTTP/2.0") gets 505 rather than a complaint about "*".
	if err := checkVersion(proto); err != nil {
		return err
	}
	if !isToken(method) {
		return errMalformed(fmt.Sprintf("method %.16q is not a token", method))
	}
	if method == "CONNECT" {
		// Authority-form tunnels are for forward proxies.
		return newError(501, ReasonMethod, "CONNECT")
	}
	if target == "" {
		return errMalformed("empty target")
	}
	for i := 0; i < len(target); i++ {
		// RFC 9112 §3.2: a URI: visible ASCII, no fragment, and '%' only
		// as a percent-encoding. A backend that decodes the path would
		// otherwise guess what "/%zz" means.
		c := target[i]
		if c <= ' ' || c >= 0x7f || c == '#' {
			return errMalformed(fmt.Sprintf("byte %#02x in the target", c))
		}
		if c == '%' && (i+2 >= len(target) || !isHex(target[i+1]) || !isHex(target[i+2])) {
			return errMalformed("bad percent-encoding in the target")
		}
	}
	r.Method, r.Target, r.Proto = method, target, proto
	switch {
	case target[0] == '/':
		r.Path, r.RawQuery, _ = strings.Cut(target, "?")
	case target == "*":
		if method != "OPTIONS" {
			return errMalformed("target * with a method other than OPTIONS")
		}
		r.Path = "*"
	default:
		return r.parseAbsolute(target)
	}
	return nil
}

// parseAbsolute parses an absolute-form target (RFC 9112 §3.2.2) into
// Host, Path and RawQuery.
func (r *Request) parseAbsolute(target string) *Error {
	scheme, rest, ok := strings.Cut(target, "://")
	if !ok {
		return errMalformed("target is neither origin-form nor absolute-form")
	}
	switch strings.ToLower(scheme) {
	case "http", "https", "ws", "wss":
	default:
		return errMalformed(fmt.Sprintf("target scheme %.16q", scheme))
	}
	end := strings.IndexAny(rest, "/?")
	if end < 0 {
		end = len(rest)
	}
	authority := rest[:end]
	if authority == "" || strings.IndexByte(authority, '@') >= 0 || !validHost(authority) {
		// Userinfo is deprecated (RFC 9110 §4.2.4) and a classic way to
		// make two URL parsers disagree about the host.
		return newError(400, ReasonHost, fmt.Sprintf("target authority %.64q", authority))
	}
	r.Host = lowerASCII(authority)
	r.Path, r.RawQuery, _ = strings.Cut(rest[end:], "?")
	if r.Path == "" {
		r.Path = "/"
	}
	return nil
}

// setHost applies the Host rules once all headers are known.
func (r *Request) setHost(hosts int, host string) *Error {
	switch {
	case hosts > 1:
		return newError(400, ReasonHost, "more than one Host")
	case hosts == 0 && r.Proto == "HTTP/1.1":
		return newError(400, ReasonHost, "no Host on HTTP/1.1")
	case hosts == 1 && !validHost(host):
		return newError(400, ReasonHost, fmt.Sprintf("invalid Host %.64q", host))
	}
	if r.Host != "" {
		// Absolute form. RFC 9112 §3.2.2 has a server use the target and
		// ignore Host, but backends differ here, so both must agree.
		if hosts == 1 && !strings.EqualFold(host, r.Host) {
			return newError(400, ReasonHost, fmt.Sprintf("Host %.64q is not the target's authority", host))
		}
		return nil
	}
	if hosts == 1 {
		r.Host = lowerASCII(host)
	}
	return nil
}

// checkVersion accepts HTTP/1.1 and HTTP/1.0; any other well-formed
// version is 505, anything else 400.
func checkVersion(proto string) *Error {
	switch proto {
	case "HTTP/1.1", "HTTP/1.0":
		return nil
	}
	if len(proto) == 8 && strings.HasPrefix(proto, "HTTP/") && isDigit(proto[5]) && proto[6] == '.' && isDigit(proto[7]) {
		return newError(505, ReasonHTTPVersion, fmt.Sprintf("version %q", proto))
	}
	return errMalformed(fmt.Sprintf("version %.16q", proto))
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// parseContentLength accepts 1*DIGIT (RFC 9110 §8.6), nothing else: no
// sign, no spaces, no list ("5, 5" is a duplicate in disguise), and at most
// 18 digits so it cannot overflow.
func parseContentLength(v string) (int64, bool) {
	if v == "" || len(v) > 18 {
		return 0, false
	}
	var n int64
	for i := 0; i < len(v); i++ {
		if !isDigit(v[i]) {
			return 0, false
		}
		n = n*10 + int64(v[i]-'0')
	}
	return n, true
}

// chunkedLast reports whether a Transfer-Encoding value is a list of
// tokens with "chunked" last and only there.
func chunkedLast(v string) bool {
	last := ""
	for list := v; ; {
		e, rest, ok := nextElement(list)
		if !ok {
			break
		}
		if !isToken(e) || (last != "" && strings.EqualFold(last, "chunked")) {
			return false
		}
		last, list = e, rest
	}
	return strings.EqualFold(last, "chunked")
}

// validKey reports whether a Sec-WebSocket-Key is the base64 (standard
// alphabet, padded) of 16 bytes: 22 alphabet characters and "==". Like
// encoding/base64's non-strict decoder it does not insist that the unused
// low bits of the last character are zero.
func validKey(k string) bool {
	if len(k) != 24 || k[22] != '=' || k[23] != '=' {
		return false
	}
	for i := 0; i < 22; i++ {
		c := k[i]
		if !('A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || isDigit(c) || c == '+' || c == '/') {
			return false
		}
	}
	return true
}

// Header returns the value of the first header named name (compared
// case-insensitively), or "". Host, Content-Length, Transfer-Encoding,
// Origin, Sec-WebSocket-Key and Sec-WebSocket-Version cannot be repeated in
// an accepted request; for other names, a decision made on the first value
// may differ from one a backend makes on the last.
func (r *Request) Header(name string) string {
	for _, h := range r.Headers {
		if nameIs(h.Name, name) {
			return h.Value
		}
	}
	return ""
}

// Cookie returns the value of the first cookie named name (case-sensitive,
// RFC 6265) across all Cookie headers, with surrounding double quotes
// removed, or "".
func (r *Request) Cookie(name string) string {
	if name == "" {
		return ""
	}
	for _, h := range r.Headers {
		if !nameIs(h.Name, "Cookie") {
			continue
		}
		for list := h.Value; list != ""; {
			var pair string
			pair, list, _ = strings.Cut(list, ";")
			k, v, ok := strings.Cut(trimOWS(pair), "=")
			if !ok || trimOWS(k) != name {
				continue
			}
			v = trimOWS(v)
			if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
				v = v[1 : len(v)-1]
			}
			return v
		}
	}
	return ""
}

// Query returns the first value of the query parameter name, decoded as
// application/x-www-form-urlencoded ('+' is a space), or "" if there is
// none or it does not decode. Parameters are separated by '&' only.
func (r *Request) Query(name string) string {
	for q := r.RawQuery; q != ""; {
		var kv string
		kv, q, _ = strings.Cut(q, "&")
		k, v, _ := strings.Cut(kv, "=")
		if k != name {
			if !strings.ContainsAny(k, "%+") {
				continue
			}
			if dk, err := url.QueryUnescape(k); err != nil || dk != name {
				continue
			}
		}
		if !strings.ContainsAny(v, "%+") {
			return v
		}
		dv, err := url.QueryUnescape(v)
		if err != nil {
			return ""
		}
		return dv
	}
	return ""
}

// Origin returns the Origin header (at most one is accepted), or "". A
// browser always sends it on a WebSocket handshake; other clients may not.
func (r *Request) Origin() string { return r.Header("Origin") }
