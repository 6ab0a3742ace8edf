package balance

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"unsafe"
)

// The hash below is part of the fleet's wire contract, not an
// implementation detail: every agent must compute the same value for the
// same key, in every version, or a rolling upgrade would send the same
// client to two backends. It is seedless on purpose (no hash/maphash, whose
// seed is random per process). TestHashGolden pins its output; changing a
// constant or the block structure reshuffles every key in every fleet.
//
// Construction: a length-dependent start value, then for every 8-byte
// little-endian block h = fmix(h ^ block), where fmix is the splitmix64
// finaliser (a bijection with full avalanche), and the tail (0 to 7 bytes)
// as one more zero-padded block. The length in the start value keeps
// "a" and "a\x00" apart. It is not a cryptographic hash: a client that
// chooses its own key can always pick the backend it lands on, which is
// what stickiness means, and bounded load (Options.BalanceFactor) is the
// defence against one key, or many colliding keys, making a hot spot.
const (
	hashStart = 0x243f6a8885a308d3 // first hex digits of π
	hashLen   = 0x9e3779b97f4a7c15 // 2⁶⁴/φ
	mixMul1   = 0xbf58476d1ce4e5b9 // splitmix64 finaliser
	mixMul2   = 0x94d049bb133111eb
	// Seeds of the two Maglev permutation hashes (offset and skip) and of
	// the probe sequence; any fixed distinct values would do.
	seedOffset = 0x6a09e667f3bcc908 // √2
	seedSkip   = 0xbb67ae8584caa73b // √3
)

// fmix is the splitmix64 finaliser: a bijection on uint64 in which every
// input bit affects every output bit with probability about ½.
func fmix(x uint64) uint64 {
	x ^= x >> 30
	x *= mixMul1
	x ^= x >> 27
	x *= mixMul2
	x ^= x >> 31
	return x
}

// startFor is the start value for n bytes under seed.
func startFor(seed uint64, n int) uint64 { return seed ^ hashStart ^ uint64(n)*hashLen }

// hash64 hashes b starting from seed.
func hash64(seed uint64, b []byte) uint64 {
	h := startFor(seed, len(b))
	for len(b) >= 8 {
		h = fmix(h ^ binary.LittleEndian.Uint64(b))
		b = b[8:]
	}
	if len(b) > 0 {
		var t uint64
		for i, c := range b {
			t |= uint64(c) << (8 * i)
		}
		h = fmix(h ^ t)
	}
	return fmix(h)
}

// hashStr is hash64 of a string's bytes, without copying it.
func hashStr(seed uint64, s string) uint64 {
	return hash64(seed, unsafe.Slice(unsafe.StringData(s), len(s)))
}

// Key is the hash of a request's balancing key. Present is false when the
// request has no such key (no header, no cookie, …); Pick then uses
// Options.Fallback instead of the Maglev table. The zero Key is "missing".
type Key struct {
	Hash    uint64
	Present bool
}

// HashBytes returns the Key of b. The hash is a fixed, seedless function:
// the same bytes give the same Key in every process and every version.
// Present is true even for an empty b; deciding that a key is missing is the
// caller's job (see KeySpec.Key).
func HashBytes(b []byte) Key { return Key{Hash: hash64(0, b), Present: true} }

// HashString is HashBytes for a string, without copying or allocating.
func HashString(s string) Key { return Key{Hash: hashStr(0, s), Present: true} }

// HashAddr returns the Key of a client address after masking it to its
// first v4Prefix (IPv4) or v6Prefix (IPv6) bits, so that e.g. v4Prefix 24
// sends a whole /24 to the same backend like nginx ip_hash. A prefix ≤ 0 or
// beyond the address length means the whole address. An IPv4-mapped IPv6
// address (::ffff:a.b.c.d, what a dual-stack listener reports) is treated
// as the IPv4 address. An invalid address gives a missing Key.
func HashAddr(a netip.Addr, v4Prefix, v6Prefix int) Key {
	if !a.IsValid() {
		return Key{}
	}
	a = a.Unmap()
	if a.Is4() {
		b4 := a.As4()
		v := uint64(binary.BigEndian.Uint32(b4[:]))
		if v4Prefix > 0 && v4Prefix < 32 {
			v &^= (1<<32 - 1) >> v4Prefix
		}
		return Key{Hash: fmix(fmix(startFor(0, 4)^v) ^ uint64(clampPrefix(v4Prefix, 32))), Present: true}
	}
	b := a.As16()
	hi, lo := binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])
	p := clampPrefix(v6Prefix, 128)
	switch {
	case p <= 64:
		lo = 0
		if p < 64 {
			hi &^= ^uint64(0) >> p
		}
	default:
		if p < 128 {
			lo &^= ^uint64(0) >> (p - 64)
		}
	}
	return Key{Hash: fmix(fmix(fmix(startFor(0, 16)^hi)^lo) ^ uint64(p)), Present: true}
}

// HashAddrPort returns the Key of a client address and port (one key per
// connection: for pure L4 listeners that want no stickiness but a
// deterministic spread). An invalid address gives a missing Key.
func HashAddrPort(ap netip.AddrPort) Key {
	k := HashAddr(ap.Addr(), 0, 0)
	if !k.Present {
		return k
	}
	k.Hash = fmix(k.Hash ^ uint64(ap.Port())*hashLen)
	return k
}

// clampPrefix turns "no prefix" (≤ 0 or too long) into the full length.
func clampPrefix(p, max int) int {
	if p <= 0 || p > max {
		return max
	}
	return p
}

// reduce maps a well-mixed 64-bit hash onto [0, n) without a division
// (Lemire's multiply-shift range reduction; it uses the high bits).
func reduce(h uint64, n int) int {
	hi, _ := bits.Mul64(h, uint64(n))
	return int(hi)
}

// probe returns the j-th slot hash of a key's probe sequence: j = 0 is the
// key itself, later probes are independent rehashes. Used by Maglev when the
// owner of a slot cannot take the connection.
func probe(h uint64, j int) uint64 {
	if j == 0 {
		return h
	}
	return fmix(h + uint64(j)*hashLen)
}
