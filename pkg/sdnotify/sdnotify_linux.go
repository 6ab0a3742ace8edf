package sdnotify

import (
	"fmt"
	"syscall"
	"time"
	"unsafe"
)

// sendTimeout bounds how long a send may block when the manager's receive
// queue is full (net.unix.max_dgram_qlen datagrams): a stuck service manager
// must turn into an error, never into an agent that hangs while draining.
const sendTimeout = 5 * time.Second

// maxPath is the room in sockaddr_un.sun_path for a path, keeping the
// terminating NUL; an abstract name may use every byte but the leading 0.
const maxPath = len(syscall.RawSockaddrUnix{}.Path) - 1

// openSocket returns a new unbound AF_UNIX datagram socket, close-on-exec
// from the start so no fork+exec elsewhere in the process can inherit it.
func openSocket() (int, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("creating notify socket: %w", err)
	}
	return fd, nil
}

func send(addr, state string) error {
	if err := checkAddr(addr); err != nil {
		return err
	}
	if (addr[0] == '/' && len(addr) > maxPath) || (addr[0] == '@' && len(addr) > maxPath+1) {
		return fmt.Errorf("NOTIFY_SOCKET=%q: longer than the %d bytes a unix socket address holds", addr, maxPath)
	}
	fd, err := openSocket()
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	tv := syscall.NsecToTimeval(sendTimeout.Nanoseconds())
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_SNDTIMEO, &tv); err != nil {
		return fmt.Errorf("setting notify socket send timeout: %w", err)
	}
	// syscall turns a leading '@' into the abstract namespace's NUL byte and
	// sizes the address without a trailing NUL, as abstract names require.
	sa := &syscall.SockaddrUnix{Name: addr}
	for {
		// MSG_NOSIGNAL: a vanished peer must be an error, never SIGPIPE.
		err = syscall.Sendto(fd, []byte(state), syscall.MSG_NOSIGNAL, sa)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("sending to NOTIFY_SOCKET %s: %w", addr, err)
	}
	return nil
}

// monotonicUsec reads CLOCK_MONOTONIC, the clock systemd compares
// MONOTONIC_USEC with. Go's time package keeps a monotonic reading only
// relative to process start, so ask the kernel.
func monotonicUsec() (int64, error) {
	const clockMonotonic = 1 // CLOCK_MONOTONIC in <linux/time.h>
	var ts syscall.Timespec
	_, _, errno := syscall.RawSyscall(syscall.SYS_CLOCK_GETTIME, clockMonotonic, uintptr(unsafe.Pointer(&ts)), 0)
	if errno != 0 {
		return 0, errno
	}
	return int64(ts.Sec)*1_000_000 + int64(ts.Nsec)/1_000, nil
}
