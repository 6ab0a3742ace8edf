package handshake

import (
	"errors"
	"fmt"
	"io"
)

// firstReadSize is the first buffer ReadHead allocates: a browser's
// WebSocket handshake, cookies included, fits in it, so the common case is
// one allocation and one read.
const firstReadSize = 4 << 10

// errBadReader reports an io.Reader that returned an impossible count.
var errBadReader = errors.New("handshake: reader returned an invalid count")

// ReadHead reads an HTTP/1.x head (request or response) from r, up to and
// including the CRLF CRLF that ends it.
//
// It reads in chunks into a buffer that starts at 4 KiB and grows up to
// lim.MaxHeadBytes, and never reads more than lim.MaxHeadBytes bytes from r
// in total, so bytes beyond the limit stay in the socket. head is the head
// including its final CRLF CRLF; rest holds whatever was read after the head
// (pipelined bytes, or the first WebSocket frames): the caller MUST forward
// rest, or those bytes are lost. head and rest share one buffer and neither
// may grow into the other.
//
// It checks framing while it reads, so hostile input fails fast instead of
// holding a connection until the deadline:
//   - the first byte must be a token character (a method or "HTTP"): a TLS
//     ClientHello or binary junk is *Error{400, "malformed"} at once; a
//     leading empty line is refused too;
//   - a bare LF or a CR not followed by LF is *Error{400, "smuggling"};
//   - a line longer than lim.MaxLineBytes is *Error{431, "line_too_long"};
//   - no end within lim.MaxHeadBytes is *Error{431, "head_too_large"}.
//
// EOF before the end of the head returns io.ErrUnexpectedEOF, or io.EOF if
// nothing at all was read (both unwrapped, so == works). Other read errors
// (a deadline set by the caller, a reset) are returned wrapped with %w. A
// read that returns bytes and an error together is used first: if the head
// is complete it is returned without error, and the error recurs on the
// caller's next read. ReadHead sets no deadline itself.
func ReadHead(r io.Reader, lim Limits) (head, rest []byte, err error) {
	lim = lim.withDefaults()
	buf := make([]byte, min(firstReadSize, lim.MaxHeadBytes))
	var s headScanner
	n := 0
	for empty := 0; ; {
		if n == len(buf) {
			if n >= lim.MaxHeadBytes {
				return nil, nil, errHeadTooLarge(lim.MaxHeadBytes)
			}
			grown := make([]byte, min(2*len(buf), lim.MaxHeadBytes))
			copy(grown, buf[:n])
			buf = grown
		}
		m, rerr := r.Read(buf[n:])
		if m < 0 || m > len(buf)-n {
			return nil, nil, errBadReader
		}
		n += m
		end, perr := s.scan(buf[:n], lim.MaxLineBytes)
		if perr != nil {
			return nil, nil, perr
		}
		if end > 0 {
			head = buf[:end:end]
			if end < n {
				rest = buf[end:n:n]
			}
			return head, rest, nil
		}
		if rerr != nil {
			if rerr == io.EOF {
				if n == 0 {
					return nil, nil, io.EOF
				}
				return nil, nil, io.ErrUnexpectedEOF
			}
			return nil, nil, fmt.Errorf("reading head: %w", rerr)
		}
		if m == 0 {
			// io.Reader allows (0, nil) but discourages it; a reader that
			// keeps doing it would spin forever.
			if empty++; empty >= 100 {
				return nil, nil, io.ErrNoProgress
			}
		} else {
			empty = 0
		}
	}
}

// headScanner finds the end of a head incrementally, so bytes are looked at
// once however the reads are split.
type headScanner struct {
	next      int // first index not yet examined
	lineStart int // index where the current line starts
}

// scan examines buf[s.next:] and returns the index just after the head's
// final CRLF CRLF, or 0 if the head has not ended yet.
func (s *headScanner) scan(buf []byte, maxLine int) (int, error) {
	if s.next == 0 && len(buf) > 0 && !tchar[buf[0]] {
		return 0, errMalformed("head does not start with a token")
	}
	for i := s.next; i < len(buf); i++ {
		switch buf[i] {
		case '\n':
			if i == 0 || buf[i-1] != '\r' {
				return 0, errSmuggling("bare LF")
			}
			if i == s.lineStart+1 {
				// An empty line ends the head. (It cannot be the first
				// line: the first byte was checked above.)
				return i + 1, nil
			}
			s.lineStart = i + 1
		case '\r':
			if i+1 == len(buf) {
				// Cannot tell a bare CR yet: look at it again after the
				// next read.
				s.next = i
				return 0, nil
			}
			if buf[i+1] != '\n' {
				return 0, errSmuggling("bare CR")
			}
		default:
			if i-s.lineStart >= maxLine {
				return 0, errLineTooLong(maxLine)
			}
		}
	}
	s.next = len(buf)
	return 0, nil
}
