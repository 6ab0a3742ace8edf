package handshake

import (
	"bytes"
	"net/netip"
	"testing"
)

// chromeHead is what Chrome sends for new WebSocket("wss://…"), with a
// realistic cookie, the size that matters for per-connection cost.
var chromeHead = head(
	"GET /ws/chat?room=lobby HTTP/1.1",
	"Host: chat.example.com",
	"Connection: Upgrade",
	"Pragma: no-cache",
	"Cache-Control: no-cache",
	"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
	"Upgrade: websocket",
	"Origin: https://chat.example.com",
	"Sec-WebSocket-Version: 13",
	"Accept-Encoding: gzip, deflate, br, zstd",
	"Accept-Language: en-US,en;q=0.9",
	"Cookie: session=5f2b9c0e7a4d4c1f9b8e6a3d2c1b0a99; theme=dark; _ga=GA1.1.123456789.1700000000",
	"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==",
	"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
)

func BenchmarkParseRequest(b *testing.B) {
	b.ReportAllocs()
	b.SetBytes(int64(len(chromeHead)))
	for b.Loop() {
		r, err := ParseRequest(chromeHead, Limits{})
		if err != nil || !r.Upgrade {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendRewritten(b *testing.B) {
	r, err := ParseRequest(chromeHead, Limits{})
	if err != nil {
		b.Fatal(err)
	}
	fw := Forwarding{ClientAddr: netip.MustParseAddrPort("203.0.113.7:51234"), Proto: "https", Headers: true}
	b.Run("reused", func(b *testing.B) {
		b.ReportAllocs()
		buf := make([]byte, 0, 2048)
		for b.Loop() {
			buf = r.AppendRewritten(buf[:0], fw)
		}
	})
	b.Run("nil", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = r.AppendRewritten(nil, fw)
		}
	})
}

func BenchmarkReadHead(b *testing.B) {
	b.ReportAllocs()
	b.SetBytes(int64(len(chromeHead)))
	rd := bytes.NewReader(chromeHead)
	for b.Loop() {
		rd.Reset(chromeHead)
		if _, _, err := ReadHead(rd, Limits{}); err != nil {
			b.Fatal(err)
		}
	}
}
