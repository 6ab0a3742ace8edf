package handshake

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Response is a parsed response head from a backend.
type Response struct {
	Proto   string   // "HTTP/1.1" or "HTTP/1.0"
	Status  int      // 100–999
	Reason  string   // the reason phrase, possibly ""
	Headers []Header // in the order received

	// Upgrade reports a switch to WebSocket: status 101, Upgrade headers
	// listing "websocket" and no other protocol, and a Connection header
	// listing "upgrade". A
	// balancer must not pass raw bytes both ways after a response that is
	// not one: the backend still speaks HTTP on that connection, or
	// (a 101 to another protocol such as h2c) not WebSocket.
	Upgrade bool
}

// ParseResponse parses a response head as returned by ReadHead. It applies
// the same line and header syntax rules as ParseRequest (bare CR/LF,
// obs-fold, whitespace before a colon, duplicate Content-Length,
// Transfer-Encoding with Content-Length) and the same limits. Errors are
// *Error with Status 502, the answer a client gets for a broken backend.
//
// A 1xx status other than 101 is an interim response (100 Continue, 103
// Early Hints); the final one follows it and must be read as well.
func ParseResponse(head []byte, lim Limits) (*Response, error) {
	resp, err := parseResponse(head, lim)
	if err != nil {
		err.Status = 502
		return nil, err
	}
	return resp, nil
}

func parseResponse(head []byte, lim Limits) (*Response, *Error) {
	lim = lim.withDefaults()
	if err := checkHead(head, lim); err != nil {
		return nil, err
	}
	nHeaders := bytes.Count(head, []byte{'\n'}) - 2
	if nHeaders > lim.MaxHeaders {
		return nil, newError(431, ReasonTooManyHeaders, fmt.Sprintf("more than %d header lines", lim.MaxHeaders))
	}
	s := string(head)
	line, p, err := nextLine(s, 0, lim)
	if err != nil {
		return nil, err
	}
	resp := &Response{}
	if err := resp.parseStatusLine(line); err != nil {
		return nil, err
	}
	resp.Headers = make([]Header, 0, nHeaders)
	var contentLengths, transferEncodings int
	var wantsWebSocket, otherProtocol, connUpgrade bool
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
		resp.Headers = append(resp.Headers, h)
		switch {
		case nameIs(h.Name, "Upgrade"):
			wantsWebSocket = wantsWebSocket || listHas(h.Value, "websocket")
			otherProtocol = otherProtocol || firstOther(h.Value, "websocket", "") != ""
		case nameIs(h.Name, "Connection"):
			connUpgrade = connUpgrade || listHas(h.Value, "upgrade")
		case nameIs(h.Name, "Content-Length"):
			contentLengths++
			if _, ok := parseContentLength(h.Value); !ok {
				return nil, errSmuggling(fmt.Sprintf("Content-Length %.32q is not a decimal number", h.Value))
			}
		case nameIs(h.Name, "Transfer-Encoding"):
			transferEncodings++
		}
	}
	switch {
	case p != len(s):
		return nil, errMalformed("bytes after the end of the head")
	case contentLengths > 1:
		return nil, errSmuggling("more than one Content-Length")
	case transferEncodings > 0 && contentLengths > 0:
		return nil, errSmuggling("Transfer-Encoding with Content-Length")
	}
	resp.Upgrade = resp.Status == 101 && wantsWebSocket && !otherProtocol && connUpgrade
	return resp, nil
}

// parseStatusLine parses HTTP-version SP 3DIGIT SP reason-phrase. A
// missing SP after the code is accepted (RFC 9112 §4 asks recipients to).
func (resp *Response) parseStatusLine(line string) *Error {
	proto, rest, ok := strings.Cut(line, " ")
	if !ok {
		return errMalformed("status line without a status code")
	}
	if err := checkVersion(proto); err != nil {
		return err
	}
	if len(rest) < 3 || !isDigit(rest[0]) || !isDigit(rest[1]) || !isDigit(rest[2]) || rest[0] == '0' {
		return errMalformed(fmt.Sprintf("status code %.8q", rest))
	}
	code, reason := rest[:3], rest[3:]
	if reason != "" {
		if reason[0] != ' ' {
			return errMalformed(fmt.Sprintf("status code %.8q", rest))
		}
		reason = reason[1:]
	}
	for i := 0; i < len(reason); i++ {
		if c := reason[i]; c < ' ' && c != '\t' || c == 0x7f {
			return errMalformed(fmt.Sprintf("control character %#02x in the reason phrase", c))
		}
	}
	resp.Proto = proto
	resp.Status = int(code[0]-'0')*100 + int(code[1]-'0')*10 + int(code[2]-'0')
	resp.Reason = reason
	return nil
}

// StatusText returns the reason phrase for the statuses the balancer
// answers with, and "Client Error" or "Server Error" for other 4xx and
// 5xx codes.
func StatusText(status int) string {
	switch status {
	case 400:
		return "Bad Request"
	case 403:
		return "Forbidden"
	case 404:
		return "Not Found"
	case 405:
		return "Method Not Allowed"
	case 408:
		return "Request Timeout"
	case 413:
		return "Content Too Large"
	case 414:
		return "URI Too Long"
	case 421:
		return "Misdirected Request"
	case 426:
		return "Upgrade Required"
	case 429:
		return "Too Many Requests"
	case 431:
		return "Request Header Fields Too Large"
	case 500:
		return "Internal Server Error"
	case 501:
		return "Not Implemented"
	case 502:
		return "Bad Gateway"
	case 503:
		return "Service Unavailable"
	case 504:
		return "Gateway Timeout"
	case 505:
		return "HTTP Version Not Supported"
	}
	if status < 500 {
		return "Client Error"
	}
	return "Server Error"
}

// WriteError writes, in one Write, a complete HTTP/1.1 response refusing
// the request: the status line, "Content-Type: text/plain; charset=utf-8",
// Content-Length, "Connection: close", the extra headers in order, and the
// body "<status text>\n". It never echoes anything from the request.
//
// For 426 it also sends "Upgrade: websocket" and "Sec-WebSocket-Version: 13"
// (RFC 6455 §4.4: a server refusing a client's version lists the versions
// it supports) and the Connection header becomes "Upgrade, close", since a
// sender of Upgrade must list it in Connection (RFC 9110 §7.8).
//
// status must be 400–599. extra may add headers such as Retry-After for
// 429 and 503; names must be tokens, values free of control characters
// other than HTAB, and they may not be the headers WriteError writes
// itself (Content-Length, Content-Type, Connection, Transfer-Encoding,
// Upgrade, Sec-WebSocket-Version). Otherwise nothing is written and an
// error returned.
func WriteError(w io.Writer, status int, extra ...Header) error {
	if status < 400 || status > 599 {
		return fmt.Errorf("handshake: status %d is not an error status", status)
	}
	for _, h := range extra {
		if err := checkExtra(h); err != nil {
			return err
		}
	}
	text := StatusText(status)
	var arr [512]byte
	b := append(arr[:0], "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(status), 10)
	b = append(b, ' ')
	b = append(b, text...)
	b = append(b, "\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: "...)
	b = strconv.AppendInt(b, int64(len(text)+1), 10)
	if status == 426 {
		b = append(b, "\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"...)
	} else {
		b = append(b, "\r\nConnection: close\r\n"...)
	}
	for _, h := range extra {
		b = appendField(b, h.Name, h.Value)
	}
	b = append(b, "\r\n"...)
	b = append(b, text...)
	b = append(b, '\n')
	n, err := w.Write(b)
	if err == nil && n < len(b) {
		err = io.ErrShortWrite
	}
	return err
}

var errExtraHeader = errors.New("handshake: invalid extra header for WriteError")

func checkExtra(h Header) error {
	if !isToken(h.Name) {
		return fmt.Errorf("%w: name %q", errExtraHeader, h.Name)
	}
	for i := 0; i < len(h.Value); i++ {
		if c := h.Value[i]; c < ' ' && c != '\t' || c == 0x7f {
			return fmt.Errorf("%w: control character in %s", errExtraHeader, h.Name)
		}
	}
	for _, own := range [...]string{"Content-Length", "Content-Type", "Connection", "Transfer-Encoding", "Upgrade", "Sec-WebSocket-Version"} {
		if nameIs(h.Name, own) {
			return fmt.Errorf("%w: %s is written by WriteError", errExtraHeader, h.Name)
		}
	}
	return nil
}
