package admin

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
)

// tcpPair returns both ends of a loopback TCP connection on network
// ("tcp4", "tcp6", or "tcp" on a dual-stack listener dialled over IPv4).
func tcpPair(t *testing.T, network, listen, dial string) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen(network, listen)
	if err != nil {
		t.Skipf("cannot listen on %s %s: %v", network, listen, err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	c, err := net.Dial("tcp", net.JoinHostPort(dial, port))
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

func addrPort(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }

func TestSockDiag(t *testing.T) {
	d, err := OpenSockDiag()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, tc := range []struct{ name, network, listen, dial string }{
		{"ipv4", "tcp4", "127.0.0.1:0", "127.0.0.1"},
		{"ipv6", "tcp6", "[::1]:0", "::1"},
		// A dual-stack listener's accepted socket is AF_INET6 with an
		// IPv4-mapped peer: netlink.SocketGet would ask AF_INET and miss.
		{"v4-mapped", "tcp", "[::]:0", "127.0.0.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, s := tcpPair(t, tc.network, tc.listen, tc.dial)
			// Move some bytes so RTT and the byte counters are set, and
			// leave 100 unread bytes in s's receive queue.
			if _, err := c.Write(make([]byte, 1000)); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(s, make([]byte, 900)); err != nil {
				t.Fatal(err)
			}
			info, err := d.Lookup(addrPort(s.LocalAddr()), addrPort(s.RemoteAddr()))
			if err != nil {
				t.Fatalf("server side %s → %s: %v", s.LocalAddr(), s.RemoteAddr(), err)
			}
			if info.State != "ESTAB" || info.BytesReceived != 1000 || info.RecvQueue != 100 {
				t.Errorf("server side: %+v, want ESTAB, 1000 received, 100 queued", info)
			}
			info, err = d.Lookup(addrPort(c.LocalAddr()), addrPort(c.RemoteAddr()))
			if err != nil {
				t.Fatalf("client side: %v", err)
			}
			// bytes_acked counts the SYN too.
			if info.State != "ESTAB" || info.RTTMicros == 0 || info.BytesAcked < 1000 {
				t.Errorf("client side: %+v, want ESTAB, an RTT, 1000 acked", info)
			}
		})
	}
	// A socket that does not exist.
	_, err = d.Lookup(netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2"))
	if !errors.Is(err, ErrNoSocket) {
		t.Errorf("missing socket: %v, want ErrNoSocket", err)
	}
}
