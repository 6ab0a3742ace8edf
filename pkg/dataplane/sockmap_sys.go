package dataplane

import (
	"errors"
	"fmt"
	"net"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Socket-level helpers of the sockmap plane. They work on raw file
// descriptors the plane owns (fact 9: out of Go's poller), and are written
// not to allocate: the loop calls some of them for every busy connection
// every poll interval.

// smTCPInfo reads TCP_INFO into ti without allocating.
func smTCPInfo(fd int, ti *unix.TCPInfo) error {
	l := uint32(unsafe.Sizeof(*ti))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_INFO,
		uintptr(unsafe.Pointer(ti)), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return e
	}
	return nil
}

// smIoctl reads an int-valued ioctl (SIOCINQ, SIOCOUTQ) without allocating.
func smIoctl(fd int, req uintptr) (int, error) {
	var v int32
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&v)))
	if e != 0 {
		return 0, e
	}
	return int(v), nil
}

// smRxConsumed returns the payload bytes fd has received that are no longer
// in its receive queue (tcpi_bytes_received - SIOCINQ), and SIOCINQ itself.
// SIOCINQ is read before and after TCP_INFO until both reads agree: no
// segment arrived in between, so the two numbers describe one instant
// (fact 15). Only meaningful while fd is in no sockmap (fact 13).
//
// tcpi_bytes_received counts sequence space, so a received FIN adds one
// that SIOCINQ never shows; it is taken off when the TCP state says a FIN
// was received.
func smRxConsumed(fd int) (consumed, inq uint64, err error) {
	var ti unix.TCPInfo
	for i := 0; i < 1000; i++ {
		q1, err := smIoctl(fd, unix.SIOCINQ)
		if err != nil {
			return 0, 0, fmt.Errorf("SIOCINQ: %w", err)
		}
		if err := smTCPInfo(fd, &ti); err != nil {
			return 0, 0, fmt.Errorf("TCP_INFO: %w", err)
		}
		q2, err := smIoctl(fd, unix.SIOCINQ)
		if err != nil {
			return 0, 0, fmt.Errorf("SIOCINQ: %w", err)
		}
		if q1 == q2 {
			rx := ti.Bytes_received
			if smFinReceived(ti.State) && rx > 0 {
				rx--
			}
			return rx - uint64(q1), uint64(q1), nil
		}
	}
	return 0, 0, errors.New("receive queue never settled")
}

// smFinReceived tells from a TCP state whether the peer's FIN was
// received. A socket the plane holds reaches CLOSE without an error only
// through a FIN exchange (TIME_WAIT's full socket, LAST_ACK acked); after
// an RST it has a socket error, which callers check first.
func smFinReceived(state uint8) bool {
	switch state {
	case unix.BPF_TCP_CLOSE_WAIT, unix.BPF_TCP_LAST_ACK, unix.BPF_TCP_CLOSING,
		unix.BPF_TCP_TIME_WAIT, unix.BPF_TCP_CLOSE:
		return true
	}
	return false
}

// smTxWritten returns the bytes ever written into fd's send queue:
// tcpi_bytes_acked + SIOCOUTQ (SIOCOUTQ is write_seq - snd_una, so the sum
// is write_seq - isn - 1, plus one once a FIN was queued).
//
// With exact set the result is taken at one instant (SIOCOUTQ unchanged
// around TCP_INFO), which holds only while nothing writes to fd: used for
// the baseline at insertion. Without it TCP_INFO is read first, then
// SIOCOUTQ: an ACK landing between the two reads moves bytes from "in
// flight" to "acked" after acked was read, so the sum can only be too
// small, never too large, and the parked estimate redirected - written can
// only over-count. (The other order over-counts written by up to a window
// of in-flight bytes, and a FIN forwarded on that estimate cuts off bytes
// still parked for the peer.)
func smTxWritten(fd int, exact bool) (uint64, error) {
	var ti unix.TCPInfo
	if !exact {
		if err := smTCPInfo(fd, &ti); err != nil {
			return 0, fmt.Errorf("TCP_INFO: %w", err)
		}
		q, err := smIoctl(fd, unix.SIOCOUTQ)
		if err != nil {
			return 0, fmt.Errorf("SIOCOUTQ: %w", err)
		}
		return ti.Bytes_acked + uint64(q), nil
	}
	for i := 0; i < 1000; i++ {
		q1, err := smIoctl(fd, unix.SIOCOUTQ)
		if err != nil {
			return 0, fmt.Errorf("SIOCOUTQ: %w", err)
		}
		if err := smTCPInfo(fd, &ti); err != nil {
			return 0, fmt.Errorf("TCP_INFO: %w", err)
		}
		q2, err := smIoctl(fd, unix.SIOCOUTQ)
		if err != nil {
			return 0, fmt.Errorf("SIOCOUTQ: %w", err)
		}
		if q1 == q2 {
			return ti.Bytes_acked + uint64(q1), nil
		}
	}
	return 0, errors.New("send queue never settled")
}

// smDupConn takes a *net.TCPConn's socket out of Go's poller (fact 9): it
// duplicates the descriptor with CLOEXEC inside SyscallConn().Control. The
// caller closes c once it no longer needs the net.Conn; the socket then
// lives on through the duplicate only. The duplicate shares the file status
// flags, so it stays O_NONBLOCK.
func smDupConn(c *net.TCPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) {
		fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, fmt.Errorf("dup: %w", derr)
	}
	return fd, nil
}

// smNetnsIno returns the inode of the network namespace fd's socket lives
// in (SIOCGSKNS, needs CAP_NET_ADMIN).
func smNetnsIno(fd int) (uint64, error) {
	nsfd, err := unix.IoctlRetInt(fd, unix.SIOCGSKNS)
	if err != nil {
		return 0, fmt.Errorf("SIOCGSKNS: %w", err)
	}
	defer unix.Close(nsfd)
	var st unix.Stat_t
	if err := unix.Fstat(nsfd, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// smWriteAll writes b to the non-blocking fd, waiting for POLLOUT when the
// send buffer is full, until deadline.
func smWriteAll(fd int, b []byte, deadline time.Time) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if n > 0 {
			b = b[n:]
		}
		switch {
		case err == nil, err == unix.EINTR:
		case err == unix.EAGAIN:
			ms := int(time.Until(deadline) / time.Millisecond)
			if ms <= 0 {
				return errors.New("peer send buffer stayed full")
			}
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
			if _, err := unix.Poll(pfd, ms); err != nil && err != unix.EINTR {
				return fmt.Errorf("poll: %w", err)
			}
		default:
			return err
		}
	}
	return nil
}

// smLingerZero makes the next close of fd send RST instead of FIN.
func smLingerZero(fd int) {
	_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
}

// smSockErr returns the socket's pending error (SO_ERROR), nil if none.
func smSockErr(fd int) error {
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if v != 0 {
		return unix.Errno(v)
	}
	return nil
}
