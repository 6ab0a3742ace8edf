package handshake

import "fmt"

// Default limits, used for the zero (or negative) fields of a Limits. They
// are what a browser's WebSocket handshake needs with room to spare (a
// typical one is under 2 KiB) and what nginx allows by default
// (large_client_header_buffers 4 8k).
const (
	DefaultMaxHeadBytes = 16 << 10
	DefaultMaxHeaders   = 100
	DefaultMaxLineBytes = 8 << 10
)

// Limits bound what a head may be. Zero or negative fields mean the
// defaults (DefaultMaxHeadBytes, DefaultMaxHeaders, DefaultMaxLineBytes).
//
// MaxHeadBytes counts the whole head including the final CRLF CRLF;
// MaxLineBytes counts one line without its CRLF (the request or status line
// included); MaxHeaders counts header lines.
type Limits struct {
	MaxHeadBytes, MaxHeaders, MaxLineBytes int
}

func (l Limits) withDefaults() Limits {
	if l.MaxHeadBytes <= 0 {
		l.MaxHeadBytes = DefaultMaxHeadBytes
	}
	if l.MaxHeaders <= 0 {
		l.MaxHeaders = DefaultMaxHeaders
	}
	if l.MaxLineBytes <= 0 {
		l.MaxLineBytes = DefaultMaxLineBytes
	}
	return l
}

// Reasons used in Error.Reason. They are metric label values: short, stable,
// lower case. New reasons may be added; existing ones do not change.
const (
	ReasonMalformed      = "malformed"        // 400: not HTTP/1.x syntax
	ReasonHeadTooLarge   = "head_too_large"   // 431: head over MaxHeadBytes
	ReasonTooManyHeaders = "too_many_headers" // 431: over MaxHeaders header lines
	ReasonLineTooLong    = "line_too_long"    // 431: a line over MaxLineBytes
	ReasonSmuggling      = "smuggling"        // 400: a shape parsers disagree on (see the package doc)
	ReasonHTTPVersion    = "http_version"     // 505: not HTTP/1.1 or HTTP/1.0
	ReasonMethod         = "method"           // 501: CONNECT (the balancer is not a forward proxy)
	ReasonHost           = "host"             // 400: Host missing on HTTP/1.1, repeated, invalid, or not the target's authority
	ReasonBadUpgrade     = "bad_upgrade"      // 400: asks for websocket but the handshake is invalid
	ReasonBadVersion     = "bad_version"      // 426: asks for websocket with Sec-WebSocket-Version other than 13
	// ReasonNotUpgrade is never returned by this package's parsers (a plain
	// request parses with Upgrade false); it is the label for callers that
	// refuse a request because it is not an upgrade.
	ReasonNotUpgrade = "not_upgrade"
)

// Error is a refusal: the HTTP status to answer (for a response head from a
// backend, always 502), a Reason from the Reason constants, and a Detail for
// logs. Detail may quote (escaped) input; it is never meant for the client,
// which gets only the status (see WriteError).
type Error struct {
	Status int
	Reason string
	Detail string
}

// Error returns "handshake: <status> <reason>: <detail>".
func (e *Error) Error() string {
	if e.Detail == "" {
		return fmt.Sprintf("handshake: %d %s", e.Status, e.Reason)
	}
	return fmt.Sprintf("handshake: %d %s: %s", e.Status, e.Reason, e.Detail)
}

func newError(status int, reason, detail string) *Error {
	return &Error{Status: status, Reason: reason, Detail: detail}
}

func errMalformed(detail string) *Error { return newError(400, ReasonMalformed, detail) }
func errSmuggling(detail string) *Error { return newError(400, ReasonSmuggling, detail) }
func errHeadTooLarge(max int) *Error {
	return newError(431, ReasonHeadTooLarge, fmt.Sprintf("head over %d bytes", max))
}
func errLineTooLong(max int) *Error {
	return newError(431, ReasonLineTooLong, fmt.Sprintf("line over %d bytes", max))
}
