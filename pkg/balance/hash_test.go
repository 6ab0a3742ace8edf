package balance

import (
	"net/netip"
	"testing"
)

// TestHashGolden pins the hash: it is part of the fleet's contract (every
// agent of every version must send a key to the same backend). If this test
// fails, the change reshuffles every key in every deployed fleet.
func TestHashGolden(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
	}{
		{"", 0xe9e0033e3badaf36},
		{"a", 0x4da6792ebc7a9529},
		{"user-42", 0x691708c26ab9fb4b},
		{"0123456789abcdef", 0x7b47ab9a231f679c},
		{"0123456789abcdefX", 0x1bec6d78da395357},
	} {
		if got := HashString(tc.in).Hash; got != tc.want {
			t.Errorf("HashString(%q) = %#x, want %#x", tc.in, got, tc.want)
		}
	}
	for _, tc := range []struct {
		in     string
		v4, v6 int
		want   uint64
	}{
		{"192.0.2.1", 0, 0, 0x5cafbd51fec8bd1c},
		{"192.0.2.1", 24, 64, 0x614cca5db16934a4},
		{"2001:db8::1", 0, 0, 0x13ee7e0fbc819487},
		{"2001:db8::1", 24, 64, 0x1570664dbe4e46e6},
	} {
		if got := HashAddr(netip.MustParseAddr(tc.in), tc.v4, tc.v6).Hash; got != tc.want {
			t.Errorf("HashAddr(%s, %d, %d) = %#x, want %#x", tc.in, tc.v4, tc.v6, got, tc.want)
		}
	}
}

func TestHashAddrPrefix(t *testing.T) {
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	same := func(x, y netip.Addr, v4, v6 int) bool {
		return HashAddr(x, v4, v6) == HashAddr(y, v4, v6)
	}
	for _, tc := range []struct {
		name   string
		x, y   netip.Addr
		v4, v6 int
		want   bool
	}{
		{"v4 same /24", a("10.1.2.3"), a("10.1.2.200"), 24, 0, true},
		{"v4 other /24", a("10.1.2.3"), a("10.1.3.3"), 24, 0, false},
		{"v4 whole", a("10.1.2.3"), a("10.1.2.4"), 0, 0, false},
		{"v4 /32", a("10.1.2.3"), a("10.1.2.4"), 32, 0, false},
		{"v4 /8", a("10.1.2.3"), a("10.200.2.4"), 8, 0, true},
		{"v4 /1", a("10.1.2.3"), a("100.200.2.4"), 1, 0, true},
		{"v4 /1 other half", a("10.1.2.3"), a("200.1.2.3"), 1, 0, false},
		{"mapped is v4", a("::ffff:10.1.2.3"), a("10.1.2.3"), 0, 0, true},
		{"mapped /24", a("::ffff:10.1.2.3"), a("10.1.2.9"), 24, 0, true},
		{"v6 same /64", a("2001:db8:1:2::1"), a("2001:db8:1:2:ffff::9"), 0, 64, true},
		{"v6 other /64", a("2001:db8:1:2::1"), a("2001:db8:1:3::1"), 0, 64, false},
		{"v6 /48", a("2001:db8:1:2::1"), a("2001:db8:1:ff::1"), 0, 48, true},
		{"v6 /96", a("2001:db8::1:0:1"), a("2001:db8::1:0:2"), 0, 96, true},
		{"v6 /96 other", a("2001:db8::1:0:1"), a("2001:db8::2:0:1"), 0, 96, false},
		{"v6 whole", a("2001:db8::1"), a("2001:db8::2"), 0, 0, false},
		{"v6 prefix ignores v4 prefix", a("2001:db8::1"), a("2001:db8::2"), 24, 0, false},
		{"zone ignored? no: different addresses", a("fe80::1"), a("fe80::2"), 0, 0, false},
	} {
		if got := same(tc.x, tc.y, tc.v4, tc.v6); got != tc.want {
			t.Errorf("%s: same(%s, %s) = %v, want %v", tc.name, tc.x, tc.y, got, tc.want)
		}
	}
	if k := HashAddr(netip.Addr{}, 24, 64); k.Present {
		t.Errorf("invalid address gives a present key")
	}
	// The prefix is part of the key: /24 and /32 of one address differ.
	if HashAddr(a("10.1.2.3"), 24, 0) == HashAddr(a("10.1.2.0"), 0, 0) {
		t.Errorf("/24 key equals the whole-address key of the network address")
	}
}

func TestHashAddrPort(t *testing.T) {
	x := HashAddrPort(netip.MustParseAddrPort("192.0.2.1:1000"))
	y := HashAddrPort(netip.MustParseAddrPort("192.0.2.1:1001"))
	z := HashAddrPort(netip.MustParseAddrPort("[::ffff:192.0.2.1]:1000"))
	if !x.Present || x == y || x != z {
		t.Errorf("HashAddrPort: %v %v %v", x, y, z)
	}
	if HashAddrPort(netip.AddrPort{}).Present {
		t.Errorf("invalid address gives a present key")
	}
}

// TestHashLengthAndBlocks checks that the zero-padded tail cannot collide
// with a longer input, and that the string and byte forms agree.
func TestHashLengthAndBlocks(t *testing.T) {
	seen := map[uint64]string{}
	for _, s := range []string{"", "\x00", "\x00\x00", "a", "a\x00", "abcdefgh", "abcdefgh\x00", "abcdefg", "abcdefghabcdefgh", "hgfedcbaabcdefgh"} {
		h := HashString(s).Hash
		if prev, ok := seen[h]; ok {
			t.Errorf("%q and %q collide", prev, s)
		}
		seen[h] = s
		if HashBytes([]byte(s)) != HashString(s) {
			t.Errorf("HashBytes(%q) != HashString(%q)", s, s)
		}
	}
}

// TestHashAvalanche checks that flipping any input bit flips about half of
// the output bits, on average over many inputs.
func TestHashAvalanche(t *testing.T) {
	const trials = 2000
	buf := make([]byte, 24)
	for bit := range len(buf) * 8 {
		total := 0
		for i := range trials {
			for k := range buf {
				buf[k] = byte(fmix(uint64(i*131+k)) >> 7)
			}
			h1 := HashBytes(buf).Hash
			buf[bit/8] ^= 1 << (bit % 8)
			h2 := HashBytes(buf).Hash
			total += popcount(h1 ^ h2)
		}
		if avg := float64(total) / trials; avg < 30 || avg > 34 {
			t.Errorf("bit %d: %.2f output bits change on average, want about 32", bit, avg)
		}
	}
}

func popcount(x uint64) int {
	n := 0
	for ; x != 0; x &= x - 1 {
		n++
	}
	return n
}

func TestHashNoAlloc(t *testing.T) {
	s := "some-user-id-0123456789"
	b := []byte(s)
	ap := netip.MustParseAddrPort("[2001:db8::1]:443")
	if n := testing.AllocsPerRun(100, func() {
		_ = HashString(s)
		_ = HashBytes(b)
		_ = HashAddr(ap.Addr(), 24, 64)
		_ = HashAddrPort(ap)
	}); n != 0 {
		t.Errorf("hashing allocates %.0f times", n)
	}
}
