package balance

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// KeyKind says what part of a connection a KeySpec hashes.
type KeyKind uint8

// The kinds of hash key, in the spelling of the config's hash_key field.
const (
	KeyClientIP   KeyKind = iota + 1 // client_ip, client_ip/N
	KeyClientPort                    // client_port: address and port, one key per connection
	KeyHeader                        // header:NAME
	KeyCookie                        // cookie:NAME
	KeyQuery                         // query:NAME
	KeyPath                          // path: the request-target without the query
	KeyURI                           // uri: the whole request-target
)

// KeySpec is a parsed hash_key: what to hash for a route. The zero KeySpec
// yields missing keys.
type KeySpec struct {
	Kind KeyKind
	// Name is the header, cookie or query parameter name (KeyHeader,
	// KeyCookie, KeyQuery).
	Name string
	// V4Prefix and V6Prefix mask the client address before hashing
	// (KeyClientIP); 0 means the whole address.
	V4Prefix, V6Prefix int
}

// DefaultV6Prefix is the IPv6 grouping used when client_ip/N is given with
// an IPv4-sized prefix (N ≤ 32): a /64 is what one subscriber usually gets,
// and privacy addresses rotate inside it. nginx ip_hash hashes the whole
// IPv6 address instead, which loses stickiness on every rotation.
const DefaultV6Prefix = 64

// ParseKeySpec parses a hash_key: client_ip, client_ip/N, client_port,
// header:NAME, cookie:NAME, query:NAME, path or uri.
//
// client_ip/N with N ≤ 32 groups IPv4 clients by /N (client_ip/24 is nginx
// ip_hash) and IPv6 clients by /64 (DefaultV6Prefix); with 32 < N ≤ 128 it
// groups IPv6 clients by /N and leaves IPv4 addresses whole.
func ParseKeySpec(s string) (KeySpec, error) {
	name, arg, hasArg := strings.Cut(s, ":")
	switch name {
	case "path", "uri", "client_port", "client_ip":
		if hasArg {
			return KeySpec{}, fmt.Errorf("hash key %q takes no argument: write %s", s, name)
		}
		switch name {
		case "path":
			return KeySpec{Kind: KeyPath}, nil
		case "uri":
			return KeySpec{Kind: KeyURI}, nil
		case "client_port":
			return KeySpec{Kind: KeyClientPort}, nil
		}
		return KeySpec{Kind: KeyClientIP}, nil
	case "header", "cookie", "query":
		if arg == "" {
			return KeySpec{}, fmt.Errorf("hash key %q needs a name: write %s:NAME", s, name)
		}
		k := map[string]KeyKind{"header": KeyHeader, "cookie": KeyCookie, "query": KeyQuery}[name]
		return KeySpec{Kind: k, Name: arg}, nil
	}
	if ip, prefix, ok := strings.Cut(s, "/"); ok && ip == "client_ip" {
		n, err := strconv.Atoi(prefix)
		if err != nil || n < 1 || n > 128 {
			return KeySpec{}, fmt.Errorf("hash key %q: the prefix must be 1 to 128, e.g. client_ip/24", s)
		}
		if n <= 32 {
			return KeySpec{Kind: KeyClientIP, V4Prefix: n, V6Prefix: DefaultV6Prefix}, nil
		}
		return KeySpec{Kind: KeyClientIP, V6Prefix: n}, nil
	}
	return KeySpec{}, fmt.Errorf("%q is not a hash key: use client_ip, client_ip/24, client_port, header:NAME, cookie:NAME, query:NAME, path or uri", s)
}

// String returns the spec in hash_key syntax.
func (k KeySpec) String() string {
	switch k.Kind {
	case KeyClientIP:
		switch {
		case k.V4Prefix > 0:
			return "client_ip/" + strconv.Itoa(k.V4Prefix)
		case k.V6Prefix > 0:
			return "client_ip/" + strconv.Itoa(k.V6Prefix)
		}
		return "client_ip"
	case KeyClientPort:
		return "client_port"
	case KeyHeader:
		return "header:" + k.Name
	case KeyCookie:
		return "cookie:" + k.Name
	case KeyQuery:
		return "query:" + k.Name
	case KeyPath:
		return "path"
	case KeyURI:
		return "uri"
	}
	return ""
}

// KeyInput is what KeySpec.Key reads from one connection.
type KeyInput struct {
	// Client is the client's address and port.
	Client netip.AddrPort
	// Target is the request-target as sent ("/chat?room=1"); empty for a
	// tcp listener.
	Target string
	// Header returns the value of a request header field, matching its name
	// case-insensitively (nil for a tcp listener). For KeyCookie it is
	// called with "Cookie".
	Header func(name string) (string, bool)
}

// Key computes the balancing key for in. A key that is absent or empty (no
// such header, cookie or query parameter, or an empty value) is missing, as
// HAProxy's balance hdr() treats it: Pick then uses Options.Fallback. Key
// does not allocate unless in.Header does.
func (k KeySpec) Key(in *KeyInput) Key {
	switch k.Kind {
	case KeyClientIP:
		return HashAddr(in.Client.Addr(), k.V4Prefix, k.V6Prefix)
	case KeyClientPort:
		return HashAddrPort(in.Client)
	case KeyHeader:
		if in.Header == nil {
			return Key{}
		}
		v, ok := in.Header(k.Name)
		return present(strings.TrimSpace(v), ok)
	case KeyCookie:
		if in.Header == nil {
			return Key{}
		}
		h, ok := in.Header("Cookie")
		if !ok {
			return Key{}
		}
		return present(CookieValue(h, k.Name))
	case KeyQuery:
		return present(QueryValue(in.Target, k.Name))
	case KeyPath:
		return present(PathOf(in.Target), in.Target != "")
	case KeyURI:
		return present(in.Target, true)
	}
	return Key{}
}

func present(v string, ok bool) Key {
	if !ok || v == "" {
		return Key{}
	}
	return HashString(v)
}

// CookieValue returns the value of the first cookie called name in a Cookie
// header value ("a=1; b=2"), with surrounding double quotes removed.
// Names match exactly (cookie names are case-sensitive).
func CookieValue(header, name string) (string, bool) {
	for header != "" {
		var part string
		part, header, _ = strings.Cut(header, ";")
		part = strings.TrimSpace(part)
		n, v, ok := strings.Cut(part, "=")
		if !ok || strings.TrimSpace(n) != name {
			continue
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
			v = v[1 : len(v)-1]
		}
		return v, true
	}
	return "", false
}

// QueryValue returns the raw (still percent-encoded) value of the first
// query parameter called name in a request-target, or in a bare query
// string. A parameter without "=" has the empty value. Values are not
// decoded, so "a%20b" and "a+b" are different keys; clients send one
// spelling consistently, and decoding would allocate.
func QueryValue(target, name string) (string, bool) {
	_, q, ok := strings.Cut(target, "?")
	if !ok {
		return "", false
	}
	q, _, _ = strings.Cut(q, "#")
	for q != "" {
		var part string
		part, q, _ = strings.Cut(q, "&")
		n, v, _ := strings.Cut(part, "=")
		if n == name {
			return v, true
		}
	}
	return "", false
}

// PathOf returns the path of a request-target: everything before "?" for
// origin-form ("/a/b?x"), and the path after the authority for
// absolute-form ("http://h/a/b?x" → "/a/b").
func PathOf(target string) string {
	if i := strings.Index(target, "://"); i >= 0 && !strings.HasPrefix(target, "/") {
		rest := target[i+3:]
		j := strings.IndexAny(rest, "/?#")
		if j < 0 || rest[j] != '/' {
			return "/"
		}
		target = rest[j:]
	}
	p, _, _ := strings.Cut(target, "?")
	p, _, _ = strings.Cut(p, "#")
	return p
}
