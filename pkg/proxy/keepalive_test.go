package proxy

import (
	"net"
	"testing"
	"time"

	"github.com/wsplice/wsplice/pkg/config"
	"golang.org/x/sys/unix"
)

func sockopts(t *testing.T, c *net.TCPConn) map[string]int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	rc.Control(func(fd uintptr) {
		for name, o := range map[string][2]int{
			"keepalive": {unix.SOL_SOCKET, unix.SO_KEEPALIVE}, "idle": {unix.IPPROTO_TCP, unix.TCP_KEEPIDLE},
			"interval": {unix.IPPROTO_TCP, unix.TCP_KEEPINTVL}, "count": {unix.IPPROTO_TCP, unix.TCP_KEEPCNT},
			"user_timeout": {unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT},
		} {
			v, err := unix.GetsockoptInt(int(fd), o[0], o[1])
			if err != nil {
				t.Errorf("getsockopt %s: %v", name, err)
			}
			out[name] = v
		}
	})
	return out
}

// TestKeepaliveOptions: the listener and the backend dialer leave
// keepalive off (not Go's 15 s default), and setKeepalive sets exactly the
// configured values, user timeout included.
func TestKeepaliveOptions(t *testing.T) {
	ln, err := Listen("127.0.0.1:0", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d := net.Dialer{KeepAlive: -1}
	dc, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	c, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if o := sockopts(t, c); o["keepalive"] != 0 || o["user_timeout"] != 0 {
		t.Fatalf("accepted socket before setKeepalive: %v", o)
	}
	off := false
	setKeepalive(config.KeepaliveSide{Enabled: &off, Idle: config.Duration(time.Second)}, c)
	if o := sockopts(t, c); o["keepalive"] != 0 {
		t.Fatalf("disabled side got keepalive: %v", o)
	}

	l := config.Listener{Keepalive: config.Keepalive{Client: config.KeepaliveSide{Idle: config.Duration(20 * time.Second), Count: 5}}}
	cfg := &config.Config{Listeners: []config.Listener{l}}
	cfg.SetDefaults()
	cfg.Validate() // fills keepalive defaults; other errors are not this test's
	k := cfg.Listeners[0].Keepalive.Client
	setKeepalive(k, c)
	want := map[string]int{"keepalive": 1, "idle": 20, "interval": 10, "count": 5, "user_timeout": 70000}
	if o := sockopts(t, c); !equalMaps(o, want) {
		t.Fatalf("options %v, want %v", o, want)
	}
	// Zero values (a config that skipped defaults) fall back to the defaults.
	setKeepalive(config.KeepaliveSide{}, dc.(*net.TCPConn))
	want = map[string]int{"keepalive": 1, "idle": 30, "interval": 10, "count": 3, "user_timeout": 60000}
	if o := sockopts(t, dc.(*net.TCPConn)); !equalMaps(o, want) {
		t.Fatalf("zero side: options %v, want %v", o, want)
	}
}

func equalMaps(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
