package sdnotify_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/wsplice/wsplice/pkg/sdnotify"
	"github.com/wsplice/wsplice/pkg/sdnotify/sdnotifytest"
)

const wait = 5 * time.Second

func TestNotifyWithoutSocketIsNoop(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	for name, f := range map[string]func() (bool, error){
		"Ready":     sdnotify.Ready,
		"Reloading": sdnotify.Reloading,
		"Stopping":  sdnotify.Stopping,
		"Watchdog":  sdnotify.Watchdog,
		"Status":    func() (bool, error) { return sdnotify.Status("x") },
		"MainPID":   func() (bool, error) { return sdnotify.MainPID(1) },
	} {
		sent, err := f()
		if sent || err != nil {
			t.Errorf("%s with NOTIFY_SOCKET unset = (%v, %v), want (false, nil)", name, sent, err)
		}
	}
	os.Unsetenv("NOTIFY_SOCKET")
	if sent, err := sdnotify.Ready(); sent || err != nil {
		t.Errorf("Ready with NOTIFY_SOCKET absent = (%v, %v), want (false, nil)", sent, err)
	}
}

func TestHelpers(t *testing.T) {
	for _, tc := range []struct {
		name string
		send func() (bool, error)
		want map[string]string
	}{
		{"ready", sdnotify.Ready, map[string]string{"READY": "1"}},
		{"stopping", sdnotify.Stopping, map[string]string{"STOPPING": "1"}},
		{"watchdog", sdnotify.Watchdog, map[string]string{"WATCHDOG": "1"}},
		{"status", func() (bool, error) { return sdnotify.Status("draining 12 connections") },
			map[string]string{"STATUS": "draining 12 connections"}},
		{"status newlines", func() (bool, error) { return sdnotify.Status("a\nREADY=1\r\nb") },
			map[string]string{"STATUS": "a READY=1 b"}},
		{"mainpid", func() (bool, error) { return sdnotify.MainPID(4242) }, map[string]string{"MAINPID": "4242"}},
		{"combined", func() (bool, error) { return sdnotify.Notify("MAINPID=7\nREADY=1") },
			map[string]string{"MAINPID": "7", "READY": "1"}},
	} {
		for _, abstract := range []bool{false, true} {
			name := tc.name + "/path"
			if abstract {
				name = tc.name + "/abstract"
			}
			t.Run(name, func(t *testing.T) {
				var s *sdnotifytest.Socket
				if abstract {
					s = sdnotifytest.ListenAbstract(t)
					if s.Addr[0] != '@' {
						t.Fatalf("abstract socket address %q does not start with @", s.Addr)
					}
				} else {
					s = sdnotifytest.Listen(t)
				}
				sent, err := tc.send()
				if !sent || err != nil {
					t.Fatalf("send = (%v, %v), want (true, nil)", sent, err)
				}
				m, err := s.Receive(wait)
				if err != nil {
					t.Fatal(err)
				}
				if len(m.Fields) != len(tc.want) {
					t.Errorf("got fields %q, want %q", m.Fields, tc.want)
				}
				for k, v := range tc.want {
					if m.Fields[k] != v {
						t.Errorf("%s = %q, want %q (datagram %q)", k, m.Fields[k], v, m.Raw)
					}
				}
				if m.PID != os.Getpid() {
					t.Errorf("sender PID = %d, want this process %d", m.PID, os.Getpid())
				}
			})
		}
	}
}

func TestReloadingSendsMonotonicTimestamp(t *testing.T) {
	s := sdnotifytest.Listen(t)
	var before, after unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &before); err != nil {
		t.Fatal(err)
	}
	if sent, err := sdnotify.Reloading(); !sent || err != nil {
		t.Fatalf("Reloading = (%v, %v)", sent, err)
	}
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &after); err != nil {
		t.Fatal(err)
	}
	m, err := s.Receive(wait)
	if err != nil {
		t.Fatal(err)
	}
	if m.Fields["RELOADING"] != "1" {
		t.Errorf("RELOADING = %q in %q", m.Fields["RELOADING"], m.Raw)
	}
	usec, err := strconv.ParseInt(m.Fields["MONOTONIC_USEC"], 10, 64)
	if err != nil {
		t.Fatalf("MONOTONIC_USEC in %q: %v", m.Raw, err)
	}
	lo, hi := before.Nano()/1000, after.Nano()/1000
	if usec < lo || usec > hi {
		t.Errorf("MONOTONIC_USEC = %d, not within CLOCK_MONOTONIC [%d, %d] around the call", usec, lo, hi)
	}
}

func TestBadSocketAddress(t *testing.T) {
	for _, tc := range []struct {
		addr        string
		unsupported bool
	}{
		{"relative/notify", true},
		{"@", true},
		{"vsock:2:1234", true},
		{"/nonexistent-dir-for-sdnotify-test/notify", false},
		{"/" + strings.Repeat("x", 200), false},
	} {
		t.Setenv("NOTIFY_SOCKET", tc.addr)
		sent, err := sdnotify.Ready()
		if sent || err == nil {
			t.Errorf("NOTIFY_SOCKET=%q: Ready = (%v, %v), want (false, error)", tc.addr, sent, err)
			continue
		}
		if got := errors.Is(err, sdnotify.ErrUnsupportedSocket); got != tc.unsupported {
			t.Errorf("NOTIFY_SOCKET=%q: errors.Is(%v, ErrUnsupportedSocket) = %v, want %v", tc.addr, err, got, tc.unsupported)
		}
	}
}

func TestMainPIDRejectsNonPositive(t *testing.T) {
	s := sdnotifytest.Listen(t)
	for _, pid := range []int{0, -1} {
		if sent, err := sdnotify.MainPID(pid); sent || err == nil {
			t.Errorf("MainPID(%d) = (%v, %v), want an error", pid, sent, err)
		}
	}
	if _, err := s.Receive(50 * time.Millisecond); err == nil {
		t.Error("a datagram was sent for an invalid PID")
	}
}

func TestPeerGone(t *testing.T) {
	s := sdnotifytest.Listen(t)
	addr := s.Addr
	// Replace the socket with a plain file: the send must fail, not panic or
	// raise SIGPIPE.
	if err := os.Remove(addr); err != nil {
		t.Fatal(err)
	}
	if sent, err := sdnotify.Ready(); sent || err == nil {
		t.Errorf("Ready to a removed socket = (%v, %v), want (false, error)", sent, err)
	}
}

// TestNoDescriptorLeak sends many notifications, concurrently (run with
// -race), and checks that the process holds no more descriptors afterwards.
func TestNoDescriptorLeak(t *testing.T) {
	s := sdnotifytest.Listen(t)
	count := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Skipf("cannot count descriptors: %v", err)
		}
		return len(ents)
	}
	start := count()
	const n = 64
	// Receive while sending: the socket queue holds only
	// net.unix.max_dgram_qlen datagrams before senders block.
	received := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			if _, err := s.Receive(wait); err != nil {
				received <- fmt.Errorf("datagram %d: %w", i, err)
				return
			}
		}
		received <- nil
	}()
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := sdnotify.Status("ping " + strconv.Itoa(i)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if err := <-received; err != nil {
		t.Fatal(err)
	}
	if end := count(); end != start {
		t.Errorf("descriptors: %d before, %d after %d notifications", start, end, n)
	}
}

func TestWatchdogEnabled(t *testing.T) {
	self := strconv.Itoa(os.Getpid())
	for _, tc := range []struct {
		usec, pid string
		want      time.Duration
		ok        bool
	}{
		{"", "", 0, false},
		{"0", "", 0, false},
		{"-5", "", 0, false},
		{"abc", "", 0, false},
		{"99999999999999999999", "", 0, false},
		{"30000000", "", 30 * time.Second, true},
		{"500000", self, 500 * time.Millisecond, true},
		{"500000", "1", 0, false}, // meant for another process (e.g. the pre-upgrade agent)
		{"500000", "x", 0, false},
	} {
		t.Setenv("WATCHDOG_USEC", tc.usec)
		t.Setenv("WATCHDOG_PID", tc.pid)
		got, ok := sdnotify.WatchdogEnabled()
		if got != tc.want || ok != tc.ok {
			t.Errorf("WATCHDOG_USEC=%q WATCHDOG_PID=%q: WatchdogEnabled() = (%v, %v), want (%v, %v)",
				tc.usec, tc.pid, got, ok, tc.want, tc.ok)
		}
	}
}

// TestChildAnnouncesMainPID plays the upgrade hand-off: a new process,
// started with the inherited NOTIFY_SOCKET, announces itself as the main
// PID and ready in one datagram. The fake socket's credentials show that
// the sender really is the child, which is what systemd checks.
func TestChildAnnouncesMainPID(t *testing.T) {
	if os.Getenv("SDNOTIFY_TEST_CHILD") == "1" {
		if _, err := sdnotify.Notify("MAINPID=" + strconv.Itoa(os.Getpid()) + "\n" + sdnotify.StateReady); err != nil {
			os.Exit(3)
		}
		os.Exit(0)
	}
	s := sdnotifytest.ListenAbstract(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestChildAnnouncesMainPID$")
	cmd.Env = append(os.Environ(), "SDNOTIFY_TEST_CHILD=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	m, _ := s.WaitFor(t, "READY", "1", wait)
	if m.PID != cmd.Process.Pid {
		t.Errorf("sender PID = %d, want the child %d", m.PID, cmd.Process.Pid)
	}
	if m.Fields["MAINPID"] != strconv.Itoa(cmd.Process.Pid) {
		t.Errorf("MAINPID = %q, want the child %d", m.Fields["MAINPID"], cmd.Process.Pid)
	}
}

// TestStuckManagerTimesOut fills the fake manager's queue without reading
// it: the next send must fail after the send timeout instead of blocking
// the agent for good.
func TestStuckManagerTimesOut(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the send timeout")
	}
	sdnotifytest.Listen(t) // never read
	start := time.Now()
	for i := 0; ; i++ {
		_, err := sdnotify.Status("fill " + strconv.Itoa(i))
		if err != nil {
			if !errors.Is(err, unix.EAGAIN) {
				t.Errorf("error = %v, want EAGAIN (send timeout)", err)
			}
			break
		}
		if time.Since(start) > 30*time.Second {
			t.Fatal("sends never blocked: the queue did not fill")
		}
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("send gave up after %v", d)
	}
}
