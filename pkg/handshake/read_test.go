package handshake

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

// countingReader counts the bytes taken from the underlying reader, to
// check that ReadHead never reads past its limit.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// chunkReader returns at most size bytes per Read.
type chunkReader struct {
	data []byte
	size int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), c.size, len(c.data))
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

func TestReadHeadPipelined(t *testing.T) {
	h := ws(nil)
	pipelined := []byte("\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58 and the next frame")
	input := append(bytes.Clone(h), pipelined...)
	readers := map[string]func() io.Reader{
		"all at once":       func() io.Reader { return bytes.NewReader(input) },
		"one byte":          func() io.Reader { return iotest.OneByteReader(bytes.NewReader(input)) },
		"half":              func() io.Reader { return iotest.HalfReader(bytes.NewReader(input)) },
		"data with EOF":     func() io.Reader { return iotest.DataErrReader(bytes.NewReader(input)) },
		"chunks of 7":       func() io.Reader { return &chunkReader{input, 7} },
		"split inside crlf": func() io.Reader { return &chunkReader{input, len(h) - 1} },
	}
	for name, mk := range readers {
		t.Run(name, func(t *testing.T) {
			r := mk()
			got, rest, err := ReadHead(r, Limits{})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, h) {
				t.Errorf("head = %q, want %q", got, h)
			}
			// Whatever ReadHead did not return must still be in the
			// reader: nothing lost, nothing duplicated.
			after, _ := io.ReadAll(r)
			if all := append(bytes.Clone(rest), after...); !bytes.Equal(all, pipelined) {
				t.Errorf("rest %q + unread %q, want %q", rest, after, pipelined)
			}
			if name == "all at once" && !bytes.Equal(rest, pipelined) {
				t.Errorf("rest = %q, want all of %q", rest, pipelined)
			}
			// head must not be able to grow over rest.
			if cap(got) != len(got) {
				t.Errorf("cap(head) = %d, want %d", cap(got), len(got))
			}
		})
	}
}

func TestReadHeadNoRest(t *testing.T) {
	h := head("GET / HTTP/1.1", "Host: a")
	got, rest, err := ReadHead(bytes.NewReader(h), Limits{})
	if err != nil || !bytes.Equal(got, h) || rest != nil {
		t.Errorf("got %q, %q, %v", got, rest, err)
	}
}

func TestReadHeadExactlyAtLimit(t *testing.T) {
	h := "GET / HTTP/1.1\r\n" + strings.Repeat("X: 012345678\r\n", 3) + "Y:\r\n\r\n"
	if len(h) != 64 {
		t.Fatalf("test head is %d bytes", len(h))
	}
	got, rest, err := ReadHead(iotest.OneByteReader(strings.NewReader(h+"more")), Limits{MaxHeadBytes: 64})
	if err != nil || string(got) != h || rest != nil {
		t.Errorf("got %q, %q, %v", got, rest, err)
	}
	if _, err := ParseRequest(got, Limits{MaxHeadBytes: 64}); err == nil || err.(*Error).Reason != ReasonHost {
		t.Errorf("ParseRequest: %v, want only the missing Host refused", err)
	}
}

func TestReadHeadGrowsBuffer(t *testing.T) {
	h := head("GET / HTTP/1.1", "Host: a", "Cookie: "+strings.Repeat("c", 7000), "X: "+strings.Repeat("x", 5000))
	got, rest, err := ReadHead(&chunkReader{append(bytes.Clone(h), "tail"...), 1000}, Limits{})
	if err != nil || !bytes.Equal(got, h) || string(rest) != "tail" {
		t.Errorf("got %d bytes, rest %q, err %v", len(got), rest, err)
	}
}

func TestReadHeadRefuses(t *testing.T) {
	lim := Limits{MaxHeadBytes: 64, MaxLineBytes: 32}
	tests := []struct {
		name    string
		input   string
		status  int
		reason  string
		maxRead int // bytes ReadHead may take from the reader
	}{
		{"too large", "GET / HTTP/1.1\r\n" + strings.Repeat("X: 0123456789\r\n", 10) + "\r\n", 431, ReasonHeadTooLarge, 64},
		{"too large, CR at the limit", "GET / HTTP/1.1\r\n" + strings.Repeat("X: 012345678\r\n", 3) + "Y: 01\r\n\r\n", 431, ReasonHeadTooLarge, 64},
		{"line too long fails early", "GET /" + strings.Repeat("a", 40) + " HTTP/1.1\r\n\r\n", 431, ReasonLineTooLong, 33},
		{"bare LF", "GET / HTTP/1.1\nHost: a\n\n", 400, ReasonSmuggling, 15},
		{"bare LF end", "GET / HTTP/1.1\r\nHost: a\r\n\n", 400, ReasonSmuggling, 26},
		{"bare CR", "GET / HTTP/1.1\rHost: a\r\n\r\n", 400, ReasonSmuggling, 16},
		{"TLS ClientHello", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, ReasonMalformed, 1},
		{"leading CRLF", "\r\nGET / HTTP/1.1\r\n\r\n", 400, ReasonMalformed, 1},
		{"leading space", " GET / HTTP/1.1\r\n\r\n", 400, ReasonMalformed, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, oneByte := range []bool{false, true} {
				cr := &countingReader{r: strings.NewReader(tt.input)}
				var r io.Reader = cr
				if oneByte {
					r = iotest.OneByteReader(cr)
				}
				_, _, err := ReadHead(r, lim)
				var he *Error
				if !errors.As(err, &he) || he.Status != tt.status || he.Reason != tt.reason {
					t.Fatalf("one byte %v: err %v, want %d %s", oneByte, err, tt.status, tt.reason)
				}
				if oneByte && cr.n > tt.maxRead {
					t.Errorf("read %d bytes before refusing, want at most %d", cr.n, tt.maxRead)
				}
				if cr.n > lim.MaxHeadBytes {
					t.Errorf("read %d bytes, over MaxHeadBytes", cr.n)
				}
			}
		})
	}
}

func TestReadHeadNeverReadsPastLimit(t *testing.T) {
	cr := &countingReader{r: strings.NewReader("GET / HTTP/1.1\r\n" + strings.Repeat("X: y\r\n", 10000))}
	_, _, err := ReadHead(cr, Limits{})
	var he *Error
	if !errors.As(err, &he) || he.Reason != ReasonHeadTooLarge {
		t.Fatalf("err %v, want head_too_large", err)
	}
	if cr.n != DefaultMaxHeadBytes {
		t.Errorf("read %d bytes, want exactly %d", cr.n, DefaultMaxHeadBytes)
	}
}

type zeroReader struct{}

func (zeroReader) Read([]byte) (int, error) { return 0, nil }

type badReader struct{}

func (badReader) Read(p []byte) (int, error) { return len(p) + 1, nil }

func TestReadHeadReadErrors(t *testing.T) {
	if _, _, err := ReadHead(strings.NewReader(""), Limits{}); err != io.EOF {
		t.Errorf("empty: %v, want io.EOF", err)
	}
	if _, _, err := ReadHead(strings.NewReader("GET / HTTP/1.1\r\nHost: a\r\n"), Limits{}); err != io.ErrUnexpectedEOF {
		t.Errorf("truncated: %v, want io.ErrUnexpectedEOF", err)
	}
	if _, _, err := ReadHead(strings.NewReader("GET / HTTP/1.1\r"), Limits{}); err != io.ErrUnexpectedEOF {
		t.Errorf("truncated after CR: %v, want io.ErrUnexpectedEOF", err)
	}
	// A deadline or reset mid-head is returned wrapped.
	r := iotest.TimeoutReader(iotest.OneByteReader(strings.NewReader("GET / HTTP/1.1\r\n\r\n")))
	if _, _, err := ReadHead(r, Limits{}); !errors.Is(err, iotest.ErrTimeout) || err == iotest.ErrTimeout {
		t.Errorf("timeout: %v, want it wrapped", err)
	}
	if _, _, err := ReadHead(zeroReader{}, Limits{}); err != io.ErrNoProgress {
		t.Errorf("zero reader: %v, want io.ErrNoProgress", err)
	}
	if _, _, err := ReadHead(badReader{}, Limits{}); !errors.Is(err, errBadReader) {
		t.Errorf("bad reader: %v", err)
	}
	// A complete head that arrives with an error is still returned; the
	// error will come back on the next read.
	h := head("GET / HTTP/1.1", "Host: a")
	r = iotest.TimeoutReader(bytes.NewReader(h))
	if got, _, err := ReadHead(r, Limits{}); err != nil || !bytes.Equal(got, h) {
		t.Errorf("complete head with timeout: %q, %v", got, err)
	}
}

// TestReadHeadThenParse checks that ReadHead and ParseRequest agree on
// limits: a head ReadHead returns under some limits never fails
// ParseRequest on a limit other than MaxHeaders.
func TestReadHeadThenParse(t *testing.T) {
	lim := Limits{MaxHeadBytes: 200, MaxLineBytes: 40}
	h := head("GET /"+strings.Repeat("a", 26)+" HTTP/1.1", "Host: "+strings.Repeat("b", 34))
	got, _, err := ReadHead(bytes.NewReader(h), lim)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseRequest(got, lim); err != nil {
		t.Fatal(err)
	}
	h = head("GET / HTTP/1.1", "Host: "+strings.Repeat("b", 35))
	if _, _, err := ReadHead(bytes.NewReader(h), lim); err == nil {
		t.Fatal("41-byte line accepted by ReadHead")
	}
	if _, err := ParseRequest(h, lim); err == nil {
		t.Fatal("41-byte line accepted by ParseRequest")
	}
}
