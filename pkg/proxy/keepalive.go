package proxy

import (
	"net"
	"time"

	"github.com/wsplice/wsplice/pkg/config"
	"golang.org/x/sys/unix"
)

// setKeepalive applies one side's keepalive settings to a socket: TCP
// keepalive probes after Idle of silence, every Interval, Count of them
// unanswered meaning the peer is dead (nginx so_keepalive, HAProxy
// clitcpka-*/srvtcpka-*), and TCP_USER_TIMEOUT, which also ends a
// connection whose sent data stays unacknowledged that long — a peer that
// vanished while the agent had bytes for it, which keepalive alone does not
// catch because probes only start on an idle connection. With both set, the
// kernel ends an idle connection once UserTimeout has passed since the last
// segment received and at least one probe went unanswered.
//
// The options live on the socket, so they survive the hand-off to any data
// plane (sockmap keeps the descriptor, splice and copy use it as is). The
// listening socket and the backend dialer turn Go's own default keepalive
// (15 s) off, so a side with keepalive disabled has none (keepalive.go).
// Errors are ignored: a socket that refuses an option still works.
func setKeepalive(k config.KeepaliveSide, c *net.TCPConn) {
	if !k.On() || c == nil {
		return
	}
	secs := func(d config.Duration, def time.Duration) int {
		if d <= 0 {
			d = config.Duration(def)
		}
		return max(1, int(d.D()/time.Second))
	}
	idle := secs(k.Idle, config.DefaultKeepaliveIdle)
	intvl := secs(k.Interval, config.DefaultKeepaliveInterval)
	cnt := k.Count
	if cnt <= 0 {
		cnt = config.DefaultKeepaliveCount
	}
	ut := k.UserTimeout.D()
	if ut <= 0 {
		ut = time.Duration(idle+intvl*cnt) * time.Second
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		f := int(fd)
		_ = unix.SetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, idle)
		_ = unix.SetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, intvl)
		_ = unix.SetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_KEEPCNT, cnt)
		_ = unix.SetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(ut/time.Millisecond))
		_ = unix.SetsockoptInt(f, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
	})
}
