package proxy

import (
	"context"
	"fmt"
	"net"
	"syscall"

	"github.com/wsplice/wsplice/pkg/tune"
	"golang.org/x/sys/unix"
)

// Listen opens a TCP listening socket with SO_REUSEPORT (so a new agent can
// bind the same address during an upgrade, and several agents can share a
// port) and plain TCP — never MPTCP, whose sockets cannot join a sockmap
// (DESIGN.md fact 7; Go ≥ 1.24 listeners default to MPTCP). backlog ≤ 0
// means net.core.somaxconn, which the kernel caps it to anyway.
func Listen(address string, backlog int) (*net.TCPListener, error) {
	if backlog <= 0 {
		backlog = somaxconn()
	}
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	lc.SetMultipathTCP(false)
	lc.KeepAlive = -1 // per connection from the listener's config (keepalive.go)
	ln, err := lc.Listen(context.Background(), "tcp", address)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", address, err)
	}
	tl := ln.(*net.TCPListener)
	// Go listens with somaxconn already; a configured backlog is applied by
	// calling listen(2) again, which the kernel allows to change it.
	if backlog != somaxconn() {
		rc, err := tl.SyscallConn()
		if err == nil {
			var lerr error
			_ = rc.Control(func(fd uintptr) { lerr = unix.Listen(int(fd), backlog) })
			if lerr != nil {
				tl.Close()
				return nil, fmt.Errorf("setting backlog %d on %s: %w", backlog, address, lerr)
			}
		}
	}
	return tl, nil
}

func somaxconn() int { return tune.Somaxconn() }
