package dataplane

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// epoller is the sockmap plane's one epoll instance: every socket the plane
// owns, the BPF ring buffer and a wake-up eventfd. Each registration carries
// a 64-bit tag (a socket cookie, or one of the reserved tags below) instead
// of an fd, so an event finds its connection with one map lookup.
type epoller struct {
	fd   int
	wake int // eventfd: Start/Kill/Close poke the loop through it
}

const (
	// Socket cookies count up from 1 and never reach these.
	epTagWake uint64 = ^uint64(0)
	epTagRing uint64 = ^uint64(0) - 1
)

func newEpoller() (*epoller, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	e := &epoller{fd: fd, wake: wake}
	if err := e.add(wake, unix.EPOLLIN, epTagWake); err != nil {
		e.close()
		return nil, err
	}
	return e, nil
}

// epTag packs a tag into the event's data field.
func epTag(ev *unix.EpollEvent) uint64 {
	return *(*uint64)(unsafe.Pointer(&ev.Fd))
}

func (e *epoller) add(fd int, events uint32, tag uint64) error {
	ev := unix.EpollEvent{Events: events}
	*(*uint64)(unsafe.Pointer(&ev.Fd)) = tag
	if err := unix.EpollCtl(e.fd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("epoll_ctl add: %w", err)
	}
	return nil
}

func (e *epoller) mod(fd int, events uint32, tag uint64) error {
	ev := unix.EpollEvent{Events: events}
	*(*uint64)(unsafe.Pointer(&ev.Fd)) = tag
	if err := unix.EpollCtl(e.fd, unix.EPOLL_CTL_MOD, fd, &ev); err != nil {
		return fmt.Errorf("epoll_ctl mod: %w", err)
	}
	return nil
}

func (e *epoller) del(fd int) {
	_ = unix.EpollCtl(e.fd, unix.EPOLL_CTL_DEL, fd, nil)
}

// poke wakes the loop. Many pokes before the loop runs coalesce into one.
func (e *epoller) poke() {
	var one = [8]byte{1}
	_, _ = unix.Write(e.wake, one[:])
}

// drainWake resets the eventfd counter.
func (e *epoller) drainWake() {
	var b [8]byte
	_, _ = unix.Read(e.wake, b[:])
}

func (e *epoller) wait(evs []unix.EpollEvent, msec int) (int, error) {
	n, err := unix.EpollWait(e.fd, evs, msec)
	if err == unix.EINTR {
		return 0, nil
	}
	return n, err
}

func (e *epoller) close() {
	unix.Close(e.wake)
	unix.Close(e.fd)
}
