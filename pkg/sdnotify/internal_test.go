package sdnotify

import (
	"syscall"
	"testing"
)

// TestSocketIsCloseOnExec guards the property the upgrade path relies on:
// the notify socket never leaks into a binary the agent execs.
func TestSocketIsCloseOnExec(t *testing.T) {
	fd, err := openSocket()
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	flags, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_GETFD, 0)
	if errno != 0 {
		t.Fatal(errno)
	}
	if flags&syscall.FD_CLOEXEC == 0 {
		t.Error("notify socket is not close-on-exec")
	}
	typ, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_TYPE)
	if err != nil {
		t.Fatal(err)
	}
	if typ != syscall.SOCK_DGRAM {
		t.Errorf("socket type = %d, want SOCK_DGRAM (%d)", typ, syscall.SOCK_DGRAM)
	}
}
