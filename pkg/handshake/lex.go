package handshake

import "strings"

// tchar is RFC 9110 §5.6.2's token alphabet.
var tchar = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !tchar[s[i]] {
			return false
		}
	}
	return true
}

// isOWS reports optional whitespace (SP or HTAB).
func isOWS(c byte) bool { return c == ' ' || c == '\t' }

func trimOWS(s string) string {
	for s != "" && isOWS(s[0]) {
		s = s[1:]
	}
	for s != "" && isOWS(s[len(s)-1]) {
		s = s[:len(s)-1]
	}
	return s
}

// nextElement splits the first element off a comma-separated list (RFC 9110
// §5.6.1), trimmed of OWS. Empty elements are returned as "".
func nextElement(list string) (elem, rest string, ok bool) {
	if list == "" {
		return "", "", false
	}
	elem, rest, _ = strings.Cut(list, ",")
	return trimOWS(elem), rest, true
}

// listHas reports whether a comma-separated list has the element want,
// compared case-insensitively (token comparison is case-insensitive for
// Connection options and Upgrade protocol names).
func listHas(list, want string) bool {
	for {
		e, rest, ok := nextElement(list)
		if !ok {
			return false
		}
		if strings.EqualFold(e, want) {
			return true
		}
		list = rest
	}
}

// lowerASCII lower-cases ASCII letters, allocating only if there is one.
func lowerASCII(s string) string {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if 'A' <= b[j] && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}

// validHost reports whether s is uri-host [":" port] (RFC 3986 §3.2.2):
// an IP-literal in brackets or a reg-name (without percent-encoding) or
// IPv4 address, and an optional port of digits. The empty string is valid
// (RFC 9112 §3.2 allows an empty Host when the target has no authority). Anything else — userinfo, a path,
// spaces, a second colon outside brackets — could make the balancer and the
// backend read a different host, so it is refused.
func validHost(s string) bool {
	if s == "" {
		return true
	}
	host, port := s, ""
	if s[0] == '[' {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return false
		}
		host, port = s[1:end], s[end+1:]
		if host == "" {
			return false
		}
		for i := 0; i < len(host); i++ {
			c := host[i]
			if !(isHex(c) || c == ':' || c == '.') {
				return false
			}
		}
		if port != "" {
			if port[0] != ':' {
				return false
			}
			port = port[1:]
		}
	} else {
		if i := strings.IndexByte(s, ':'); i >= 0 {
			host, port = s[:i], s[i+1:]
		}
		if host == "" {
			return false
		}
		for i := 0; i < len(host); i++ {
			if !regNameChar[host[i]] {
				return false
			}
		}
	}
	for i := 0; i < len(port); i++ {
		if port[i] < '0' || port[i] > '9' {
			return false
		}
	}
	return len(port) <= 5
}

// regNameChar is unreserved / sub-delims of RFC 3986. Pct-encoded names are
// refused: no client sends them (IDNs travel as punycode) and parsers
// disagree on what they decode to.
var regNameChar = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "-._~!$&'()*+,;=" {
		t[c] = true
	}
	return t
}()

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// nameIs compares a header name with a canonical name, case-insensitively,
// without allocating.
func nameIs(name, canon string) bool {
	return len(name) == len(canon) && strings.EqualFold(name, canon)
}
