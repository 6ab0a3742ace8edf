package upgrade

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// objSource is a fakeSource that also hands over kernel objects: one end
// of a pipe stands for a BPF map.
type objSource struct {
	*fakeSource
	r, w *os.File
}

func (s *objSource) Objects() (Objects, error) {
	return Objects{Meta: json.RawMessage(`{"maps":["verdict"]}`), Files: []*os.File{s.w}}, nil
}

// TestHandConnTakeover: a new agent that connects to the take-over socket
// (another container) gets the objects before anything else, then the
// listener and 300 connections, each descriptor with its record; the old
// side's result counts them.
func TestHandConnTakeover(t *testing.T) {
	path, ts := testTakeover(t)
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v %v, want 0600", st.Mode(), err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	src := &objSource{fakeSource: newFakeSource(t, 300), r: r, w: w}

	newDone := make(chan error, 1)
	go func() {
		ch, err := DialTakeover(path)
		if err != nil {
			newDone <- err
			return
		}
		objs, err := ch.Objects(5 * time.Second)
		if err != nil {
			newDone <- err
			return
		}
		if string(objs.Meta) != `{"maps":["verdict"]}` || len(objs.Files) != 1 {
			newDone <- errors.New("objects: " + string(objs.Meta))
			return
		}
		// The received descriptor is the pipe's write end.
		if _, err := objs.Files[0].Write([]byte("map")); err != nil {
			newDone <- err
			return
		}
		objs.Files[0].Close()
		s, err := Take(context.Background(), ch, &fakeTarget{mode: "ok"}, Options{Step: 5 * time.Second})
		if err != nil {
			newDone <- err
			return
		}
		newDone <- s.WaitReleased(5 * time.Second)
	}()

	ch, err := ts.Accept()
	if err != nil {
		t.Fatal(err)
	}
	s, err := HandConn(context.Background(), ch, src, Options{})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 3)
	r.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(r, buf); err != nil || string(buf) != "map" {
		t.Fatalf("object descriptor: read %q %v", buf, err)
	}
	if s.Result.Conns != 300 || src.handed != 300 || s.Result.Listeners != 1 {
		t.Fatalf("result %+v, handed %d", s.Result, src.handed)
	}
	if err := s.Released(); err != nil {
		t.Fatal(err)
	}
	if err := <-newDone; err != nil {
		t.Fatalf("new agent: %v", err)
	}
	// Every connection's sockets reached the new side with their record.
	for i, p := range src.peers {
		p.SetReadDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 64)
		n, err := p.Read(b)
		if err != nil || !strings.Contains(string(b[:n]), `"id":`) {
			t.Fatalf("peer %d: %q %v", i, b[:n], err)
		}
	}
}

// TestHandConnNoAnswer: a connected new agent that takes a batch and never
// answers cannot be stopped by the old one, so the batch is not taken back
// (the other process may serve it): its connections are shut down both
// ways, and nothing is resumed.
func TestHandConnNoAnswer(t *testing.T) {
	path, ts := testTakeover(t)
	src := newFakeSource(t, 3)
	hold := make(chan struct{})
	defer close(hold)
	go func() {
		ch, err := DialTakeover(path)
		if err != nil {
			return
		}
		defer ch.Close()
		m, files, err := ch.recv(time.Now().Add(5 * time.Second))
		closeFiles(files)
		if err != nil || m.Type != msgHello {
			return
		}
		ch.send(&message{Type: msgReady}, nil)
		_, files, _ = ch.recv(time.Now().Add(5 * time.Second)) // the batch: kept, never answered
		defer closeFiles(files)
		<-hold
	}()
	ch, err := ts.Accept()
	if err != nil {
		t.Fatal(err)
	}
	_, err = HandConn(context.Background(), ch, src, Options{Step: 300 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "batch in flight were closed") {
		t.Fatalf("HandConn: %v, want a failure that closed the batch in flight", err)
	}
	if len(src.resumed) != 0 || src.handed != 3 {
		t.Fatalf("resumed %d connections, settled %d as handed; want 0 and 3", len(src.resumed), src.handed)
	}
	// The test's ends see EOF: the connections ended for both processes.
	for i, p := range src.peers {
		p.SetReadDeadline(time.Now().Add(2 * time.Second))
		if n, err := p.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Fatalf("peer %d after the abort: %d %v, want EOF", i, n, err)
		}
	}
}

// TestHandConnPeerGivesUp: when the connected agent says it failed, it
// adopted nothing: the batch in flight is taken back (resumed), not shut.
func TestHandConnPeerGivesUp(t *testing.T) {
	path, ts := testTakeover(t)
	src := newFakeSource(t, 3)
	go func() {
		ch, err := DialTakeover(path)
		if err != nil {
			return
		}
		Take(context.Background(), ch, &fakeTarget{mode: "fail-prepare"}, Options{Step: 5 * time.Second})
	}()
	ch, err := ts.Accept()
	if err != nil {
		t.Fatal(err)
	}
	_, err = HandConn(context.Background(), ch, src, Options{})
	if err == nil || !strings.Contains(err.Error(), "configuration rejected") {
		t.Fatalf("HandConn: %v", err)
	}
	if src.calls[len(src.calls)-1] != "resume" {
		t.Fatalf("calls %v, want a resume last", src.calls)
	}
}

// TestListenTakeover: a live socket is not stolen, a stale one is
// replaced, a file that is not a socket is refused, and with no agent
// DialTakeover says so (ErrNoAgent) rather than failing.
func TestListenTakeover(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "t.sock")
	if _, err := DialTakeover(path); !errors.Is(err, ErrNoAgent) {
		t.Fatalf("dial with no socket: %v, want ErrNoAgent", err)
	}
	ts, err := ListenTakeover(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ListenTakeover(path); err == nil || !strings.Contains(err.Error(), "another agent listens") {
		t.Fatalf("second listener on a live socket: %v", err)
	}
	ts.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("Close removed the socket file (the next agent may own it): %v", err)
	}
	if _, err := DialTakeover(path); !errors.Is(err, ErrNoAgent) {
		t.Fatalf("dial a stale socket: %v, want ErrNoAgent", err)
	}
	ts, err = ListenTakeover(path)
	if err != nil {
		t.Fatalf("replacing a stale socket: %v", err)
	}
	ts.Close()
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, nil, 0o600)
	if _, err := ListenTakeover(plain); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("a regular file: %v", err)
	}
}

// TestObjectsClosedWithoutObjects: a hello's object descriptors that the
// new agent does not ask for (Take without Objects) are closed, not
// leaked.
func TestObjectsClosedWithoutObjects(t *testing.T) {
	a, b, err := socketpairChannels()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	r, w, _ := os.Pipe()
	defer r.Close()
	if err := a.send(&message{Type: msgHello, Version: ProtocolVersion, ObjectFiles: 1}, []*os.File{w}); err != nil {
		t.Fatal(err)
	}
	w.Close()
	m, files, err := b.readHello(time.Second, false)
	if err != nil || m.Type != msgHello || len(files) != 0 {
		t.Fatalf("hello %v, %d files, %v", m, len(files), err)
	}
	// Every write end is closed: the read end sees EOF.
	r.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := r.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("the object descriptor is still open somewhere: %d %v", n, err)
	}
}

func socketpairChannels() (*Channel, *Channel, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	a, err := newChannel(os.NewFile(uintptr(fds[0]), "a"))
	if err != nil {
		return nil, nil, err
	}
	b, err := newChannel(os.NewFile(uintptr(fds[1]), "b"))
	return a, b, err
}

// testTakeover listens on a take-over socket in a temporary directory
// for the test's length.
func testTakeover(t *testing.T) (string, *TakeoverSocket) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "takeover.sock")
	ts, err := ListenTakeover(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ts.Close() })
	return path, ts
}
