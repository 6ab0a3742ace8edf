package tlsterm

import (
	"fmt"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// KTLS reports whether the kernel offers kernel TLS: it attaches the "tls"
// upper-layer protocol (setsockopt TCP_ULP) to an established loopback TCP
// connection, the first step of handing record encryption to the kernel.
// The error says why not (ENOENT: the kernel has no tls module, i.e.
// CONFIG_TLS is off). The agent only reports the result: crypto/tls does
// not export session keys, so terminated connections are always copied in
// userspace, whatever this returns.
func KTLS() (bool, error) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return false, fmt.Errorf("ktls probe: %w", err)
	}
	defer ln.Close()
	ln.SetDeadline(time.Now().Add(2 * time.Second))
	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		return false, fmt.Errorf("ktls probe: %w", err)
	}
	defer c.Close()
	peer, err := ln.AcceptTCP()
	if err != nil {
		return false, fmt.Errorf("ktls probe: %w", err)
	}
	defer peer.Close()
	rc, err := c.SyscallConn()
	if err != nil {
		return false, fmt.Errorf("ktls probe: %w", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_ULP, "tls")
	}); err != nil {
		return false, fmt.Errorf("ktls probe: %w", err)
	}
	if serr != nil {
		return false, fmt.Errorf("setsockopt TCP_ULP tls: %w", serr)
	}
	return true, nil
}
