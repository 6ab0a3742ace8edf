// Package handshake parses and rewrites the HTTP/1.1 head of a connection
// for the balancer: the client's request head (usually a WebSocket Upgrade),
// the backend's response head, the head sent to the backend, PROXY protocol
// headers, and the small responses used to refuse a connection.
//
// It does no I/O beyond the io.Reader or io.Writer it is handed and knows
// nothing of backends or BPF.
//
// The parser faces the public internet and sits in front of backends whose
// own HTTP parsers differ from it and from each other. Every rule is strict
// where a lenient reading could let two parsers disagree about where a
// header, a request or a body ends (request smuggling), and every refusal is
// an *Error carrying the HTTP status to answer and a short, stable Reason
// (one of the Reason constants) for metrics:
//
//   - lines end with CRLF; a bare CR or bare LF anywhere is "smuggling";
//   - obs-fold (a line starting with SP or HTAB), whitespace before a
//     header's colon, a duplicate Content-Length (even an equal one), a
//     Content-Length that is not plain digits, Transfer-Encoding with
//     Content-Length, Transfer-Encoding not ending in chunked or sent twice,
//     and a body or Transfer-Encoding on a WebSocket upgrade are "smuggling";
//   - only HTTP/1.1 and HTTP/1.0 are spoken; any other version (including
//     the HTTP/2 preface "PRI * HTTP/2.0") is 505 "http_version";
//   - limits (Limits) are enforced while reading, before any allocation that
//     depends on the input: 431 "head_too_large", "too_many_headers",
//     "line_too_long".
//
// The rewritten head (Request.AppendRewritten) is built only from what
// ParseRequest accepted, in a normalised form, so the backend reads the
// same request line, Host and framing that the balancer routed on.
package handshake
