package handshake

import (
	"encoding/binary"
	"net/netip"
	"strconv"
)

// proxyV2Sig is the 12-byte signature that starts a PROXY protocol v2
// header (haproxy.org proxy-protocol.txt §2.2).
const proxyV2Sig = "\r\n\r\n\x00\r\nQUIT\n"

// proxyAddrs normalises a pair for the PROXY protocol: zones dropped,
// v4-mapped addresses unmapped, and — because both addresses of a header
// share one family — an IPv4 address paired with an IPv6 one written as
// v4-mapped IPv6. ok is false if either address is not valid.
func proxyAddrs(src, dst netip.AddrPort) (s, d netip.Addr, v4, ok bool) {
	s = src.Addr().Unmap().WithZone("")
	d = dst.Addr().Unmap().WithZone("")
	if !s.IsValid() || !d.IsValid() {
		return s, d, false, false
	}
	if s.Is4() && d.Is4() {
		return s, d, true, true
	}
	return netip.AddrFrom16(s.As16()), netip.AddrFrom16(d.As16()), false, true
}

// AppendProxyV1 appends a PROXY protocol v1 header, "PROXY TCP4 src dst
// sport dport\r\n" ("TCP6" for IPv6), for a connection from src to dst. A
// v4-mapped IPv6 address is written as IPv4; if one address is IPv4 and
// the other IPv6, both are written as IPv6 (TCP6, the IPv4 one v4-mapped).
// If either address is invalid it appends "PROXY UNKNOWN\r\n", which tells
// the receiver to use the connection's own addresses.
func AppendProxyV1(dst []byte, src, dest netip.AddrPort) []byte {
	s, d, v4, ok := proxyAddrs(src, dest)
	if !ok {
		return append(dst, "PROXY UNKNOWN\r\n"...)
	}
	if v4 {
		dst = append(dst, "PROXY TCP4 "...)
	} else {
		dst = append(dst, "PROXY TCP6 "...)
	}
	dst = s.AppendTo(dst)
	dst = append(dst, ' ')
	dst = d.AppendTo(dst)
	dst = append(dst, ' ')
	dst = strconv.AppendUint(dst, uint64(src.Port()), 10)
	dst = append(dst, ' ')
	dst = strconv.AppendUint(dst, uint64(dest.Port()), 10)
	return append(dst, "\r\n"...)
}

// AppendProxyV2 appends a PROXY protocol v2 header for a connection from
// src to dst: the signature, version 2 command PROXY (0x21), family TCP over
// IPv4 (0x11, 12 address bytes) or TCP over IPv6 (0x21, 36 bytes), the
// big-endian length, the addresses and the ports. Addresses are normalised
// as in AppendProxyV1. If either is invalid the family is UNSPEC (0x00)
// with no address block, which the receiver accepts and then uses the
// connection's own addresses.
func AppendProxyV2(dst []byte, src, dest netip.AddrPort) []byte {
	dst = append(dst, proxyV2Sig...)
	s, d, v4, ok := proxyAddrs(src, dest)
	switch {
	case !ok:
		return append(dst, 0x21, 0x00, 0, 0)
	case v4:
		dst = append(dst, 0x21, 0x11, 0, 12)
	default:
		dst = append(dst, 0x21, 0x21, 0, 36)
	}
	dst = append(dst, s.AsSlice()...)
	dst = append(dst, d.AsSlice()...)
	dst = binary.BigEndian.AppendUint16(dst, src.Port())
	return binary.BigEndian.AppendUint16(dst, dest.Port())
}
