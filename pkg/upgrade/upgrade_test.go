package upgrade

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The tests run this binary as the new agent: TestMain plays a Target in
// the mode named by childMode.
const childMode = "WSPLICE_UPGRADE_TEST_CHILD"

func TestMain(m *testing.M) {
	if mode := os.Getenv(childMode); mode != "" {
		os.Exit(runChild(mode))
	}
	os.Exit(m.Run())
}

// fakeTarget answers each connection by writing its record to both of its
// sockets, so the test can check every descriptor arrived with its own
// record; the listener gets one accepted connection answered the same way.
type fakeTarget struct {
	mode    string
	ls      []Listener
	batches int
}

func (f *fakeTarget) Prepare(ls []Listener) error {
	switch f.mode {
	case "fail-prepare":
		return errors.New("configuration rejected")
	case "exit-prepare":
		os.Exit(3)
	case "hang":
		select {}
	}
	f.ls = ls
	return nil
}

func (f *fakeTarget) Adopt(conns []Conn) []int {
	f.batches++
	switch {
	case f.mode == "exit-adopt" && f.batches == 1:
		os.Exit(4)
	case f.mode == "exit-second" && f.batches == 2:
		os.Exit(5)
	}
	var rejected []int
	for i, c := range conns {
		for _, fl := range []*os.File{c.Client, c.Backend} {
			flags, err := unix.FcntlInt(fl.Fd(), unix.F_GETFD, 0)
			if err != nil || flags&unix.FD_CLOEXEC == 0 {
				fmt.Fprintf(os.Stderr, "received descriptor %d is not close-on-exec (%v)\n", fl.Fd(), err)
				os.Exit(6)
			}
		}
		if f.mode == "reject" && i%10 == 3 {
			rejected = append(rejected, i)
			c.Client.Close()
			c.Backend.Close()
			continue
		}
		for _, fl := range []*os.File{c.Client, c.Backend} {
			fl.Write(append(c.Record, '\n'))
			fl.Close()
		}
	}
	return rejected
}

func (f *fakeTarget) Paused(meta json.RawMessage) error {
	if string(meta) != `{"next_id":42}` {
		return fmt.Errorf("meta %s", meta)
	}
	return nil
}

func (f *fakeTarget) Done() {
	if f.mode == "exit-done" {
		os.Exit(7)
	}
}

func (f *fakeTarget) Accept() {
	for _, l := range f.ls {
		ln, err := net.FileListener(l.File)
		if err != nil {
			continue
		}
		go func() {
			c, err := ln.Accept()
			if err == nil {
				io.WriteString(c, l.Name+"\n")
				c.Close()
			}
			ln.Close()
		}()
	}
}

func runChild(mode string) int {
	ch, err := Inherited()
	if err != nil || ch == nil {
		fmt.Fprintln(os.Stderr, "no channel:", err)
		return 1
	}
	if os.Getenv(EnvFD) != "" {
		fmt.Fprintln(os.Stderr, "EnvFD still set")
		return 1
	}
	s, err := Take(context.Background(), ch, &fakeTarget{mode: mode}, Options{Step: 5 * time.Second})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := s.WaitReleased(5 * time.Second); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// fakeSource hands over n connections (socketpairs standing for TCP
// sockets: the test keeps the peer ends) and one TCP listener.
type fakeSource struct {
	t        *testing.T
	n, next  int
	ln       *net.TCPListener
	peers    []*os.File // test's ends, client and backend per connection
	mu       sync.Mutex
	calls    []string
	handed   int
	rejected int
	resumed  []Conn
}

func (s *fakeSource) call(c string) {
	s.mu.Lock()
	if len(s.calls) == 0 || s.calls[len(s.calls)-1] != c {
		s.calls = append(s.calls, c)
	}
	s.mu.Unlock()
}

func (s *fakeSource) Listeners() ([]Listener, error) {
	s.call("listeners")
	f, err := s.ln.File()
	if err != nil {
		return nil, err
	}
	return []Listener{{Name: "ws", Address: "127.0.0.1:0", File: f}}, nil
}

func (s *fakeSource) Pause(ctx context.Context) (json.RawMessage, error) {
	s.call("pause")
	return json.RawMessage(`{"next_id":42}`), nil
}

func (s *fakeSource) Detach(n int) ([]Conn, error) {
	s.call("detach")
	var out []Conn
	for ; s.next < s.n && len(out) < n; s.next++ {
		i := s.next
		var fs [2]*os.File
		for j := range fs {
			p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return out, err
			}
			fs[j] = os.NewFile(uintptr(p[0]), "ours")
			s.peers = append(s.peers, os.NewFile(uintptr(p[1]), "peer"))
		}
		// Records of varying size, some larger than a frame, as a
		// connection with bytes in flight would be.
		pad := ""
		if i%97 == 0 {
			pad = strings.Repeat("x", 3*frameSize/2)
		}
		rec, _ := json.Marshal(map[string]any{"id": i, "pad": pad})
		out = append(out, Conn{Record: rec, Client: fs[0], Backend: fs[1]})
	}
	return out, nil
}

func (s *fakeSource) Handed(adopted, rejected []Conn) error {
	s.handed += len(adopted)
	s.rejected += len(rejected)
	for _, c := range append(adopted, rejected...) {
		c.Client.Close()
		c.Backend.Close()
	}
	return nil
}

func (s *fakeSource) Resume(conns []Conn) error {
	s.call("resume")
	s.resumed = conns
	return nil
}

func (s *fakeSource) Commit() { s.call("commit") }

func newFakeSource(t *testing.T, n int) *fakeSource {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &fakeSource{t: t, n: n, ln: ln}
}

func spec(t *testing.T, mode string) Spec {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return Spec{Path: exe, Args: []string{"-test.run=^$"}, Env: append(os.Environ(), childMode+"="+mode), Stderr: os.Stderr}
}

// TestHandCommit hands 600 connections (5 batches, some records larger
// than a frame) and a listener to a child process: every descriptor
// arrives with its own record, close-on-exec, and the listener accepts in
// the child.
func TestHandCommit(t *testing.T) {
	src := newFakeSource(t, 600)
	s, err := Hand(context.Background(), spec(t, "ok"), src, Options{Ready: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if s.Result.Conns != 600 || s.Result.Batches != 5 || s.Result.Listeners != 1 || s.Result.PID <= 0 {
		t.Fatalf("result %+v", s.Result)
	}
	t.Logf("%+v", s.Result)
	// The child accepts on the listener it inherited.
	c, err := net.Dial("tcp", src.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, _ := io.ReadAll(c); string(b) != "ws\n" {
		t.Fatalf("the child's listener answered %q", b)
	}
	c.Close()
	for i, p := range src.peers {
		p.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(p)
		if err != nil {
			t.Fatalf("peer %d: %v", i, err)
		}
		var rec struct{ ID int }
		if err := json.Unmarshal(bytes.TrimSpace(b), &rec); err != nil || rec.ID != i/2 {
			t.Fatalf("socket %d of connection %d carried record %.60q (%v)", i%2, i/2, b, err)
		}
		p.Close()
	}
	if err := s.Released(); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(src.calls, ","); got != "listeners,pause,detach,commit" {
		t.Fatalf("source calls %s", got)
	}
}

// TestHandFailures: whatever the new process does wrong before it has
// adopted anything, the old side resumes everything and the child is gone;
// after that, the old side loses only what the child had adopted.
func TestHandFailures(t *testing.T) {
	for _, tc := range []struct {
		mode, want      string
		resumed, handed int
	}{
		{"fail-prepare", "configuration rejected", 0, 0},
		{"exit-prepare", "exit status 3", 0, 0},
		{"hang", "timed out", 0, 0},
		{"exit-adopt", "exit status 4", ConnsPerBatch, 0},
		{"exit-second", "exit status 5", ConnsPerBatch, ConnsPerBatch},
		{"exit-done", "exit status 7", 0, 300},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			src := newFakeSource(t, 300)
			t0 := time.Now()
			_, err := Hand(context.Background(), spec(t, tc.mode), src, Options{Ready: 2 * time.Second, Step: 2 * time.Second, Grace: 500 * time.Millisecond})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
			t.Logf("%v after %v", err, time.Since(t0).Round(time.Millisecond))
			if last := src.calls[len(src.calls)-1]; last != "resume" {
				t.Fatalf("calls %v: the source did not resume", src.calls)
			}
			if len(src.resumed) != tc.resumed || src.handed != tc.handed {
				t.Fatalf("resumed %d and handed %d connections, want %d and %d", len(src.resumed), src.handed, tc.resumed, tc.handed)
			}
			if tc.handed > 0 && !strings.Contains(err.Error(), "lost with it") {
				t.Fatalf("error %v does not say connections were lost", err)
			}
		})
	}
}

// TestHandRejected: connections the new agent rejects come back to the
// old one; the rest are handed over and the upgrade commits.
func TestHandRejected(t *testing.T) {
	src := newFakeSource(t, 300)
	s, err := Hand(context.Background(), spec(t, "reject"), src, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Released()
	want := 0 // the child rejects every tenth of each batch, from the fourth
	for left := 300; left > 0; left -= ConnsPerBatch {
		want += (min(left, ConnsPerBatch) + 6) / 10
	}
	if src.rejected != want || src.handed != 300-want || s.Result.Rejected != want || s.Result.Conns != 300-want {
		t.Fatalf("rejected %d, handed %d, result %+v", src.rejected, src.handed, s.Result)
	}
}

// TestHandMissingBinary: a binary that cannot start fails at once and
// touches nothing.
func TestHandMissingBinary(t *testing.T) {
	src := newFakeSource(t, 3)
	_, err := Hand(context.Background(), Spec{Path: "/nonexistent/wsplice"}, src, Options{})
	if err == nil || len(src.calls) != 0 {
		t.Fatalf("error %v, calls %v", err, src.calls)
	}
}

// TestHandCancel: cancelling before commit rolls back.
func TestHandCancel(t *testing.T) {
	src := newFakeSource(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := Hand(ctx, spec(t, "hang"), src, Options{Grace: 200 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "cancelled") {
		t.Fatalf("error %v", err)
	}
}

// TestSCMMaxFD checks the kernel limit ConnsPerBatch is built on: 253
// descriptors go in one message, 254 do not.
func TestSCMMaxFD(t *testing.T) {
	p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	fds := make([]int, MaxFDs+1)
	for i := range fds {
		fds[i] = p[0]
	}
	if err := unix.Sendmsg(p[0], []byte{0}, unix.UnixRights(fds[:MaxFDs]...), nil, 0); err != nil {
		t.Fatalf("%d descriptors: %v", MaxFDs, err)
	}
	if err := unix.Sendmsg(p[0], []byte{0}, unix.UnixRights(fds...), nil, 0); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("%d descriptors: %v, want EINVAL", MaxFDs+1, err)
	}
	if 2*ConnsPerBatch > MaxFDs {
		t.Fatalf("a batch of %d connections needs %d descriptors", ConnsPerBatch, 2*ConnsPerBatch)
	}
}

// TestChannelFrames sends a message larger than several frames with
// descriptors and gets it back whole.
func TestChannelFrames(t *testing.T) {
	a, bf, err := socketpair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := newChannel(bf)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	big := strings.Repeat("y", 5*frameSize+17)
	rec, _ := json.Marshal(big)
	r, w, _ := os.Pipe()
	defer r.Close()
	go func() {
		if err := a.send(&message{Type: msgConns, Conns: []json.RawMessage{rec}}, []*os.File{w, w}); err != nil {
			t.Error(err)
		}
		w.Close()
	}()
	m, files, err := b.recv(time.Now().Add(5 * time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer closeFiles(files)
	var got string
	json.Unmarshal(m.Conns[0], &got)
	if got != big || len(files) != 2 {
		t.Fatalf("got %d bytes and %d files", len(got), len(files))
	}
}

// TestHandExitAtOnce: a binary that exits at once (here /bin/false) fails
// the upgrade with its exit status, whether it is gone before the hello or
// after.
func TestHandExitAtOnce(t *testing.T) {
	for range 5 {
		src := newFakeSource(t, 3)
		_, err := Hand(context.Background(), Spec{Path: "/bin/false"}, src, Options{})
		if err == nil || !strings.Contains(err.Error(), "the new agent exited: exit status 1") {
			t.Fatalf("error %v", err)
		}
		if src.calls[len(src.calls)-1] != "resume" {
			t.Fatalf("calls %v", src.calls)
		}
	}
}

// TestHandNoConns: with no connection the hand-off still moves the
// listeners and commits.
func TestHandNoConns(t *testing.T) {
	src := newFakeSource(t, 0)
	s, err := Hand(context.Background(), spec(t, "ok"), src, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Released()
	if s.Result.Conns != 0 || s.Result.Batches != 0 || s.Result.Listeners != 1 {
		t.Fatalf("result %+v", s.Result)
	}
	c, err := net.Dial("tcp", src.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, _ := io.ReadAll(c); string(b) != "ws\n" {
		t.Fatalf("the child's listener answered %q", b)
	}
}
