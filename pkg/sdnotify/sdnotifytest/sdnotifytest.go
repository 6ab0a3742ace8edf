//go:build linux

// Package sdnotifytest is a fake systemd notify socket for tests: it listens
// on a unixgram socket, points NOTIFY_SOCKET at it for the test's duration,
// and returns each datagram parsed as systemd would, with the sender's PID
// and UID from SCM_CREDENTIALS so a test can tell which process announced
// readiness or a new MAINPID.
//
// Listen and ListenAbstract call t.Setenv, so tests that use them cannot call
// t.Parallel (the environment is process-wide). A child process started by
// the test inherits NOTIFY_SOCKET and can notify the same fake.
package sdnotifytest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Message is one datagram received by the fake socket.
type Message struct {
	// Raw is the datagram as sent.
	Raw string
	// Fields holds the KEY=VALUE assignments; as in systemd, a later
	// assignment of the same key wins and lines without '=' are ignored.
	Fields map[string]string
	// PID, UID and GID identify the sender (SCM_CREDENTIALS, filled in by
	// the kernel, so they cannot be forged by an unprivileged sender).
	PID      int
	UID, GID uint32
}

// Socket is a fake notify socket.
type Socket struct {
	// Addr is the value NOTIFY_SOCKET was set to: a path, or "@name".
	Addr string
	conn *net.UnixConn
}

// Listen creates a fake notify socket at a path in a fresh temporary
// directory and sets NOTIFY_SOCKET to it until the test ends.
func Listen(t testing.TB) *Socket {
	t.Helper()
	// t.TempDir() embeds the test name and can exceed the 107 bytes of
	// sun_path; a short directory of our own cannot.
	dir, err := os.MkdirTemp("", "sdnotify")
	if err != nil {
		t.Fatalf("creating directory for the notify socket: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return listen(t, dir+"/notify")
}

// ListenAbstract creates a fake notify socket in the abstract namespace (the
// form systemd uses for user managers and containers: NOTIFY_SOCKET=@name)
// and sets NOTIFY_SOCKET to it until the test ends.
func ListenAbstract(t testing.TB) *Socket {
	t.Helper()
	return listen(t, fmt.Sprintf("@wsplice-sdnotifytest-%d-%d", os.Getpid(), time.Now().UnixNano()))
}

func listen(t testing.TB, addr string) *Socket {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listening on fake notify socket %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	rc, err := conn.SyscallConn()
	if err != nil {
		t.Fatalf("fake notify socket: %v", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		// Ask the kernel to attach the sender's credentials, as systemd does.
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		t.Fatalf("setting SO_PASSCRED on fake notify socket: %v", errors.Join(err, serr))
	}
	t.Setenv("NOTIFY_SOCKET", addr)
	return &Socket{Addr: addr, conn: conn}
}

// Receive waits up to timeout for the next datagram.
func (s *Socket) Receive(timeout time.Duration) (Message, error) {
	if err := s.conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return Message{}, err
	}
	buf := make([]byte, 64<<10)
	oob := make([]byte, syscall.CmsgSpace(syscall.SizeofUcred))
	n, oobn, _, _, err := s.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return Message{}, fmt.Errorf("reading fake notify socket: %w", err)
	}
	m := Message{Raw: string(buf[:n]), Fields: Parse(string(buf[:n])), PID: -1}
	cmsgs, err := syscall.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return m, fmt.Errorf("parsing credentials: %w", err)
	}
	for i := range cmsgs {
		if cred, err := syscall.ParseUnixCredentials(&cmsgs[i]); err == nil {
			m.PID, m.UID, m.GID = int(cred.Pid), cred.Uid, cred.Gid
		}
	}
	return m, nil
}

// WaitFor receives datagrams until one assigns value to key (for example
// "READY", "1") and returns it, failing the test after timeout. Earlier
// datagrams are returned too, in order, so a test can check what came
// before (STATUS lines, RELOADING).
func (s *Socket) WaitFor(t testing.TB, key, value string, timeout time.Duration) (Message, []Message) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var before []Message
	for {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("no %s=%s on the notify socket within %s; received %s", key, value, timeout, describe(before))
		}
		m, err := s.Receive(left)
		if err != nil {
			t.Fatalf("waiting for %s=%s: %v; received %s", key, value, err, describe(before))
		}
		if v, ok := m.Fields[key]; ok && v == value {
			return m, before
		}
		before = append(before, m)
	}
}

func describe(ms []Message) string {
	if len(ms) == 0 {
		return "nothing"
	}
	var b strings.Builder
	for i, m := range ms {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Quote(m.Raw))
	}
	return b.String()
}

// Parse splits a notification into its assignments the way systemd reads
// them: one KEY=VALUE per line, later keys win, other lines ignored.
func Parse(raw string) map[string]string {
	fields := map[string]string{}
	for _, line := range strings.Split(raw, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && k != "" {
			fields[k] = v
		}
	}
	return fields
}
