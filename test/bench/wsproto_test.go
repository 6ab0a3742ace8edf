package main

import (
	"bufio"
	"bytes"
	"io"
	"testing"
)

func TestAcceptKeyRFC6455(t *testing.T) {
	// The example of RFC 6455 section 1.3.
	if got, want := acceptKey("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="; got != want {
		t.Fatalf("acceptKey = %q, want %q", got, want)
	}
}

func TestFrameRoundTrip(t *testing.T) {
	for _, n := range []int{0, 1, 64, 125, 126, 127, 65535, 65536, 100000} {
		payload := make([]byte, n)
		for i := range payload {
			payload[i] = byte(i * 7)
		}
		for _, masked := range []bool{false, true} {
			var frame []byte
			if masked {
				frame = clientFrame(opBinary, payload)
			} else {
				frame = make([]byte, 14+n)
				h := frameHeader(frame, opBinary, n, nil)
				copy(frame[h:], payload)
				frame = frame[:h+n]
			}
			br := bufio.NewReader(bytes.NewReader(frame))
			f, err := readFrameHeader(br)
			if err != nil {
				t.Fatalf("n=%d masked=%v: %v", n, masked, err)
			}
			if f.op != opBinary || f.n != n || f.masked != masked {
				t.Fatalf("n=%d masked=%v: got %+v", n, masked, f)
			}
			got := make([]byte, n)
			if _, err := io.ReadFull(br, got); err != nil {
				t.Fatal(err)
			}
			if masked {
				if n >= 8 && bytes.Equal(got, payload) && f.key != [4]byte{} {
					t.Fatalf("n=%d: masked payload went out in the clear", n)
				}
				maskBytes(got, f.key[:])
			}
			if !bytes.Equal(got, payload) {
				t.Fatalf("n=%d masked=%v: payload differs", n, masked)
			}
		}
	}
}

func TestMaskBytesMatchesBytewise(t *testing.T) {
	key := []byte{0x12, 0x34, 0x56, 0x78}
	for n := range 40 {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(i)
		}
		want := make([]byte, n)
		for i := range want {
			want[i] = p[i] ^ key[i%4]
		}
		maskBytes(p, key)
		if !bytes.Equal(p, want) {
			t.Fatalf("n=%d: got %x, want %x", n, p, want)
		}
	}
}

func TestJiffiesBetween(t *testing.T) {
	a := map[int]uint64{1: 100, 2: 50, 3: 70}
	b := map[int]uint64{1: 130, 3: 10, 4: 5} // 2 exited, 3 is a reused PID, 4 is new
	if got, want := jiffiesBetween(a, b), uint64(30+10+5); got != want {
		t.Fatalf("jiffiesBetween = %d, want %d", got, want)
	}
}
