package handshake

import (
	"bytes"
	"net/netip"
	"testing"
)

// The expected bytes are written out by hand from the haproxy.org
// proxy-protocol.txt spec, not produced by the code under test.

var (
	v4src = netip.MustParseAddrPort("192.0.2.1:56324")
	v4dst = netip.MustParseAddrPort("198.51.100.2:443")
	v6src = netip.MustParseAddrPort("[2001:db8::1]:56324")
	v6dst = netip.MustParseAddrPort("[2001:db8:0:1::2]:8443")
)

func TestAppendProxyV1(t *testing.T) {
	tests := []struct {
		name     string
		src, dst netip.AddrPort
		want     string
	}{
		{"ipv4", v4src, v4dst, "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"},
		{"ipv6", v6src, v6dst, "PROXY TCP6 2001:db8::1 2001:db8:0:1::2 56324 8443\r\n"},
		{"v4-mapped unmapped", netip.MustParseAddrPort("[::ffff:192.0.2.1]:1"), netip.MustParseAddrPort("[::ffff:198.51.100.2]:2"), "PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\n"},
		{"zone dropped", netip.MustParseAddrPort("[fe80::1%eth0]:1"), netip.MustParseAddrPort("[fe80::2%eth0]:65535"), "PROXY TCP6 fe80::1 fe80::2 1 65535\r\n"},
		{"mixed families", v4src, v6dst, "PROXY TCP6 ::ffff:192.0.2.1 2001:db8:0:1::2 56324 8443\r\n"},
		{"invalid", netip.AddrPort{}, v4dst, "PROXY UNKNOWN\r\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := AppendProxyV1([]byte("x"), tt.src, tt.dst)
			if string(got) != "x"+tt.want {
				t.Errorf("got %q, want %q", got, "x"+tt.want)
			}
			if len(got)-1 > 107 {
				t.Errorf("v1 header is %d bytes, the spec's maximum is 107", len(got)-1)
			}
		})
	}
}

func TestAppendProxyV2(t *testing.T) {
	sig := []byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	tests := []struct {
		name     string
		src, dst netip.AddrPort
		want     []byte
	}{
		{"ipv4", v4src, v4dst, cat(sig,
			[]byte{0x21, 0x11, 0x00, 0x0C},
			[]byte{192, 0, 2, 1},
			[]byte{198, 51, 100, 2},
			[]byte{0xDC, 0x04}, // 56324
			[]byte{0x01, 0xBB}, // 443
		)},
		{"ipv6", v6src, v6dst, cat(sig,
			[]byte{0x21, 0x21, 0x00, 0x24},
			[]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01},
			[]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x02},
			[]byte{0xDC, 0x04}, // 56324
			[]byte{0x20, 0xFB}, // 8443
		)},
		{"v4-mapped unmapped", netip.MustParseAddrPort("[::ffff:192.0.2.1]:56324"), v4dst, cat(sig,
			[]byte{0x21, 0x11, 0x00, 0x0C},
			[]byte{192, 0, 2, 1},
			[]byte{198, 51, 100, 2},
			[]byte{0xDC, 0x04, 0x01, 0xBB},
		)},
		{"mixed families", v4src, v6dst, cat(sig,
			[]byte{0x21, 0x21, 0x00, 0x24},
			[]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1},
			[]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x02},
			[]byte{0xDC, 0x04, 0x20, 0xFB},
		)},
		{"invalid", v4src, netip.AddrPort{}, cat(sig, []byte{0x21, 0x00, 0x00, 0x00})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := AppendProxyV2([]byte("x"), tt.src, tt.dst)
			if want := append([]byte("x"), tt.want...); !bytes.Equal(got, want) {
				t.Errorf("got  % x\nwant % x", got, want)
			}
		})
	}
}
