// Package sdnotify is the sending side of systemd's sd_notify protocol: a
// service started with Type=notify tells the service manager that it is
// ready, reloading or stopping, which process is its main PID, and that it
// is still alive (watchdog), by sending newline-separated KEY=VALUE
// assignments in one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET.
//
// It depends on nothing but the standard library and works the same outside
// systemd: when NOTIFY_SOCKET is unset every call is a no-op that reports
// false, so the agent calls it unconditionally.
//
// Each call opens its own SOCK_DGRAM|SOCK_CLOEXEC socket, sends and closes
// it, as libsystemd does: nothing is held between calls, no descriptor leaks
// into a binary the agent execs during an upgrade, and the functions are safe
// for concurrent use.
package sdnotify

import (
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"time"
)

// The states this package sends. They can be joined with "\n" and sent in
// one Notify call, which systemd applies atomically (e.g. MAINPID and READY
// together during an upgrade hand-off).
const (
	// StateReady tells systemd that start-up (or a reload) has finished:
	// for Type=notify, `systemctl start` returns and dependent units start.
	StateReady = "READY=1"
	// StateReloading starts a reload; systemd waits for StateReady again.
	StateReloading = "RELOADING=1"
	// StateStopping tells systemd the service is shutting down (draining).
	StateStopping = "STOPPING=1"
	// StateWatchdog is the keep-alive ping for WatchdogSec=.
	StateWatchdog = "WATCHDOG=1"
)

// ErrUnsupportedSocket is returned (wrapped) when NOTIFY_SOCKET names an
// address family this package does not speak, such as systemd's vsock:.
var ErrUnsupportedSocket = errors.New("unsupported NOTIFY_SOCKET address")

// Notify sends state, one or more newline-separated KEY=VALUE assignments,
// to the service manager at $NOTIFY_SOCKET in a single datagram. It returns
// (false, nil) when NOTIFY_SOCKET is unset or empty (not run by systemd, or
// systemd does not expect notifications), (true, nil) once the datagram was
// sent, and (false, err) when the socket is set but cannot be reached.
//
// NOTIFY_SOCKET is an absolute path ("/run/systemd/notify") or, starting
// with '@', a name in the abstract namespace. The variable is left in the
// environment on purpose: a binary the agent execs during a zero-downtime
// upgrade needs it to announce its own MAINPID and readiness.
func Notify(state string) (bool, error) {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return false, nil
	}
	if err := send(addr, state); err != nil {
		return false, err
	}
	return true, nil
}

// Ready sends READY=1: the agent is listening and its health endpoint
// answers. Send it after every successful start and after each reload.
func Ready() (bool, error) { return Notify(StateReady) }

// Reloading sends RELOADING=1 with MONOTONIC_USEC= set to the current
// CLOCK_MONOTONIC time in microseconds. systemd ≥ 253 requires the timestamp
// for Type=notify-reload, to match the notification to the reload request;
// older versions ignore the field. Send Ready when the reload has finished,
// whether it succeeded or the old configuration stayed in force.
func Reloading() (bool, error) {
	usec, err := monotonicUsec()
	if err != nil {
		return false, fmt.Errorf("reading CLOCK_MONOTONIC: %w", err)
	}
	return Notify(StateReloading + "\nMONOTONIC_USEC=" + strconv.FormatInt(usec, 10))
}

// Stopping sends STOPPING=1: the agent has begun draining and will exit.
func Stopping() (bool, error) { return Notify(StateStopping) }

// Watchdog sends WATCHDOG=1, the keep-alive ping for WatchdogSec=. Send it
// at half the interval WatchdogEnabled returns.
func Watchdog() (bool, error) { return Notify(StateWatchdog) }

// Status sends STATUS=msg, the free-form line `systemctl status` shows.
// Newlines would end the assignment early, so they become spaces.
func Status(msg string) (bool, error) {
	msg = strings.NewReplacer("\r\n", " ", "\n", " ", "\r", " ").Replace(msg)
	return Notify("STATUS=" + msg)
}

// MainPID sends MAINPID=pid: systemd tracks pid as the service's main
// process from now on. During a zero-downtime upgrade the new process must
// become the main PID before the old one exits, or systemd takes the old
// process's exit for the service's and stops the unit (killing the new
// process with it). The old process can send it for the new one (accepted
// with NotifyAccess=main, as the sender is the current main PID), or the new
// process sends its own PID (needs NotifyAccess=all: until then it is not
// the main PID). pid must be positive.
func MainPID(pid int) (bool, error) {
	if pid <= 0 {
		return false, fmt.Errorf("MAINPID %d: the PID must be positive", pid)
	}
	return Notify("MAINPID=" + strconv.Itoa(pid))
}

// WatchdogEnabled reports whether systemd expects watchdog pings from this
// process, and the watchdog interval: WATCHDOG_USEC is set to a positive
// number and WATCHDOG_PID, when set, is this process's PID. Ping (Watchdog)
// at half the returned interval.
//
// After an upgrade hand-off the new process inherits the old process's
// WATCHDOG_PID and so reports false here; the process that execs it should
// set WATCHDOG_PID to the child's PID (or remove it) in the child's
// environment if the watchdog is to continue.
func WatchdogEnabled() (time.Duration, bool) {
	s := os.Getenv("WATCHDOG_USEC")
	if s == "" {
		return 0, false
	}
	usec, err := strconv.ParseUint(s, 10, 64)
	if err != nil || usec == 0 || usec > math.MaxInt64/uint64(time.Microsecond) {
		return 0, false
	}
	if p := os.Getenv("WATCHDOG_PID"); p != "" {
		pid, err := strconv.Atoi(p)
		if err != nil || pid != os.Getpid() {
			return 0, false
		}
	}
	return time.Duration(usec) * time.Microsecond, true
}

// checkAddr rejects NOTIFY_SOCKET values that are neither an absolute path
// nor an abstract name, with an error that says which forms are accepted.
func checkAddr(addr string) error {
	switch {
	case strings.HasPrefix(addr, "/"), strings.HasPrefix(addr, "@") && len(addr) > 1:
		return nil
	case strings.HasPrefix(addr, "vsock:"), strings.HasPrefix(addr, "vsock-"):
		return fmt.Errorf("NOTIFY_SOCKET=%q: %w (vsock is not implemented; only AF_UNIX paths and @abstract names)", addr, ErrUnsupportedSocket)
	default:
		return fmt.Errorf("NOTIFY_SOCKET=%q: %w (want an absolute path or an @abstract name)", addr, ErrUnsupportedSocket)
	}
}
