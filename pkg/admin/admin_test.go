package admin

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fakeHandler is a Handler over a fixed set of backends and connections.
type fakeHandler struct {
	mu       sync.Mutex
	backends []Backend
	conns    []Conn
	killed   []uint64
	reloads  int
	lameDuck bool
}

func (f *fakeHandler) Reload(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reloads++
	if f.reloads > 1 {
		return Invalidf("listeners[0].address: bad")
	}
	return nil
}

func (f *fakeHandler) LameDuck(_ context.Context, on bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lameDuck = on
	return nil
}

func (f *fakeHandler) Upgrade(_ context.Context, req UpgradeRequest) (UpgradeResult, error) {
	if req.Binary == "/bin/false" {
		return UpgradeResult{}, errors.New("upgrade failed waiting for the new agent to start: the new agent exited: exit status 1")
	}
	return UpgradeResult{OldPID: 1, NewPID: 1, Connections: 3, Batches: 1}, nil
}

func (f *fakeHandler) Status(context.Context) (Status, error) {
	return Status{Version: "test", PID: 1, Dataplane: "splice", Connections: ConnCounts{Active: len(f.conns)}}, nil
}

func (f *fakeHandler) Conns(_ context.Context, q ConnQuery) ([]Conn, error) {
	match, err := ParseClientFilter(q.Client)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []Conn
	for _, c := range f.conns {
		if q.Backend != "" && !MatchBackend(q.Backend, c.Pool, c.Backend) {
			continue
		}
		if !match(netip.MustParseAddrPort(c.Client)) {
			continue
		}
		out = append(out, c)
	}
	return out, nil
}

func (f *fakeHandler) Backends(context.Context) ([]Backend, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Backend(nil), f.backends...), nil
}

func (f *fakeHandler) update(spec string, fn func(b *Backend)) ([]Backend, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []Backend
	for i := range f.backends {
		b := &f.backends[i]
		if MatchBackend(spec, b.Pool, b.Address) {
			fn(b)
			out = append(out, *b)
		}
	}
	if out == nil {
		return nil, NotFoundf("no backend matches %q", spec)
	}
	return out, nil
}

func (f *fakeHandler) Drain(_ context.Context, spec string, on bool, _ time.Duration) ([]Backend, error) {
	return f.update(spec, func(b *Backend) { b.Draining = on; b.State = BackendState(b.Healthy, on, b.Down) })
}

func (f *fakeHandler) SetWeight(_ context.Context, spec string, w int) ([]Backend, error) {
	return f.update(spec, func(b *Backend) { b.Weight = w })
}

func (f *fakeHandler) Kill(_ context.Context, id uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.conns {
		if c.ID == id {
			f.killed = append(f.killed, id)
			return nil
		}
	}
	return NotFoundf("connection %d", id)
}

func newFake() *fakeHandler {
	return &fakeHandler{
		backends: []Backend{
			{Pool: "p", Address: "10.0.0.1:80", State: StateUp, Healthy: true, Weight: 1},
			{Pool: "p", Address: "10.0.0.2:80", State: StateUp, Healthy: true, Weight: 1},
			{Pool: "q", Address: "10.0.0.1:80", State: StateUp, Healthy: true, Weight: 1},
		},
		conns: []Conn{
			{ID: 1, Pool: "p", Backend: "10.0.0.1:80", Client: "192.0.2.1:1000"},
			{ID: 2, Pool: "p", Backend: "10.0.0.2:80", Client: "192.0.2.2:1000"},
		},
	}
}

func serve(t *testing.T, h Handler) (*Server, *Client) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "run", "admin.sock")
	s, err := Listen(path, h, ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	c := NewClient(path)
	t.Cleanup(c.Close)
	return s, c
}

func TestAPI(t *testing.T) {
	h := newFake()
	_, c := serve(t, h)
	ctx := context.Background()

	st, err := c.Status(ctx)
	if err != nil || st.Version != "test" || st.Connections.Active != 2 {
		t.Fatalf("status: %+v, %v", st, err)
	}
	cs, err := c.Conns(ctx, ConnQuery{Backend: "10.0.0.2"})
	if err != nil || len(cs) != 1 || cs[0].ID != 2 {
		t.Fatalf("conns by backend host: %+v, %v", cs, err)
	}
	cs, err = c.Conns(ctx, ConnQuery{Client: "192.0.2.0/31"})
	if err != nil || len(cs) != 1 || cs[0].ID != 1 {
		t.Fatalf("conns by client prefix: %+v, %v", cs, err)
	}
	cs, err = c.Conns(ctx, ConnQuery{Backend: "nothing:1"})
	if err != nil || cs == nil || len(cs) != 0 {
		t.Fatalf("no match must be an empty list: %#v, %v", cs, err)
	}
	if _, err := c.Conns(ctx, ConnQuery{Client: "not-an-ip"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("bad client filter: %v, want ErrInvalid", err)
	}

	bs, err := c.Drain(ctx, "10.0.0.1:80", true)
	if err != nil || len(bs) != 2 || !bs[0].Draining || bs[0].State != StateDraining {
		t.Fatalf("drain in every pool: %+v, %v", bs, err)
	}
	bs, err = c.Drain(ctx, "q/10.0.0.1:80", false)
	if err != nil || len(bs) != 1 || bs[0].Pool != "q" || bs[0].Draining {
		t.Fatalf("undrain in one pool: %+v, %v", bs, err)
	}
	if _, err := c.Drain(ctx, "10.9.9.9:80", true); !errors.Is(err, ErrNotFound) {
		t.Fatalf("drain unknown: %v, want ErrNotFound", err)
	}
	bs, err = c.SetWeight(ctx, "p/10.0.0.2:80", 7)
	if err != nil || len(bs) != 1 || bs[0].Weight != 7 {
		t.Fatalf("weight: %+v, %v", bs, err)
	}
	for _, w := range []int{-1, MaxWeight + 1} {
		if _, err := c.SetWeight(ctx, "10.0.0.2:80", w); !errors.Is(err, ErrInvalid) {
			t.Fatalf("weight %d: %v, want ErrInvalid", w, err)
		}
	}
	if err := c.Kill(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if err := c.Kill(ctx, 99); !errors.Is(err, ErrNotFound) {
		t.Fatalf("kill unknown: %v, want ErrNotFound", err)
	}
	if len(h.killed) != 1 || h.killed[0] != 2 {
		t.Fatalf("killed %v", h.killed)
	}
}

func TestSocketModes(t *testing.T) {
	s, _ := serve(t, newFake())
	st, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Type() != fs.ModeSocket || st.Mode().Perm() != SocketMode {
		t.Errorf("socket mode %v, want socket %v", st.Mode(), SocketMode)
	}
	dst, err := os.Stat(filepath.Dir(s.Path()))
	if err != nil {
		t.Fatal(err)
	}
	if dst.Mode().Perm() != DirMode {
		t.Errorf("directory mode %v, want %v", dst.Mode().Perm(), DirMode)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(s.Path()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("socket left behind after Close: %v", err)
	}
}

func TestSecondAgentRefused(t *testing.T) {
	s, _ := serve(t, newFake())
	_, err := Listen(s.Path(), newFake(), ServerOptions{})
	if !errors.Is(err, ErrAgentRunning) {
		t.Fatalf("second Listen: %v, want ErrAgentRunning", err)
	}
	// The first agent still answers.
	if _, err := NewClient(s.Path()).Status(context.Background()); err != nil {
		t.Fatalf("first agent after the refused second: %v", err)
	}
}

// TestLiveSocketWithoutLock: an agent that answers on the socket but holds
// no lock (an older version) is still detected.
func TestLiveSocketWithoutLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := Listen(path, newFake(), ServerOptions{}); !errors.Is(err, ErrAgentRunning) || !strings.Contains(err.Error(), "another agent is running") {
		t.Fatalf("Listen on a live socket: %v, want ErrAgentRunning", err)
	}
}

func TestStaleSocketRemoved(t *testing.T) {
	path := filepath.Join(t.TempDir(), "admin.sock")
	// A socket file nobody listens on, as a killed agent leaves it.
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	syscall.Close(fd)
	if st, err := os.Lstat(path); err != nil || st.Mode().Type() != fs.ModeSocket {
		t.Fatalf("setup: %v %v", st, err)
	}
	s, err := Listen(path, newFake(), ServerOptions{})
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer s.Close()
	if _, err := NewClient(path).Status(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestNotASocketLeftAlone(t *testing.T) {
	path := filepath.Join(t.TempDir(), "admin.sock")
	if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(path, newFake(), ServerOptions{}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "precious" {
		t.Fatal("the file was touched")
	}
}

func TestUnsafeDirectory(t *testing.T) {
	dir := t.TempDir()
	ww := filepath.Join(dir, "ww")
	sticky := filepath.Join(dir, "sticky")
	for _, d := range []string{ww, sticky} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// Chmod explicitly: Mkdir's mode goes through the umask.
	if err := os.Chmod(ww, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sticky, 0o777|fs.ModeSticky); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(filepath.Join(ww, "a.sock"), newFake(), ServerOptions{}); err == nil || !strings.Contains(err.Error(), "world-writable") {
		t.Fatalf("world-writable directory: %v", err)
	}
	s, err := Listen(filepath.Join(sticky, "a.sock"), newFake(), ServerOptions{})
	if err != nil {
		t.Fatalf("sticky world-writable directory (like /tmp) must be accepted: %v", err)
	}
	s.Close()

	// Owned by another user: checked on the FileInfo, so this runs without
	// root too.
	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	other := os.Geteuid() + 1000
	if other == 0 {
		other = 1000
	}
	if err := checkDir(dir, st, other); err != nil && os.Geteuid() == 0 {
		t.Fatalf("a root-owned directory is trusted: %v", err)
	}
	if os.Geteuid() != 0 {
		if err := checkDir(dir, st, other); err == nil || !strings.Contains(err.Error(), "owned by uid") {
			t.Fatalf("directory owned by another user: %v", err)
		}
	}
	fakeOwned := fakeInfo{FileInfo: st, uid: uint32(other)}
	if err := checkDir(dir, fakeOwned, os.Geteuid()); err == nil || !strings.Contains(err.Error(), "owned by uid") {
		t.Fatalf("directory owned by another user: %v", err)
	}
}

type fakeInfo struct {
	fs.FileInfo
	uid uint32
}

func (f fakeInfo) Sys() any {
	st := *f.FileInfo.Sys().(*syscall.Stat_t)
	st.Uid = f.uid
	return &st
}

func TestNoAgent(t *testing.T) {
	c := NewClient(filepath.Join(t.TempDir(), "missing.sock"))
	_, err := c.Status(context.Background())
	if !errors.Is(err, ErrNoAgent) {
		t.Fatalf("no socket: %v, want ErrNoAgent", err)
	}
}

func TestMatchBackend(t *testing.T) {
	for _, tc := range []struct {
		spec, pool, addr string
		want             bool
	}{
		{"10.0.0.1:80", "p", "10.0.0.1:80", true},
		{"10.0.0.1", "p", "10.0.0.1:80", true},
		{"10.0.0.1:81", "p", "10.0.0.1:80", false},
		{"p/10.0.0.1:80", "p", "10.0.0.1:80", true},
		{"q/10.0.0.1:80", "p", "10.0.0.1:80", false},
		{"p/10.0.0.1", "p", "10.0.0.1:80", true},
		{"[::1]", "p", "[::1]:80", true},
		{"::1", "p", "[::1]:80", true},
		{"[::1]:80", "p", "[::1]:80", true},
		{"", "p", "10.0.0.1:80", false},
		{"p/", "p", "10.0.0.1:80", false},
		{"ws.example.com", "p", "ws.example.com:443", true},
	} {
		if got := MatchBackend(tc.spec, tc.pool, tc.addr); got != tc.want {
			t.Errorf("MatchBackend(%q, %q, %q) = %v, want %v", tc.spec, tc.pool, tc.addr, got, tc.want)
		}
	}
}

func TestClientFilter(t *testing.T) {
	for _, tc := range []struct {
		spec, client string
		want         bool
	}{
		{"", "192.0.2.1:5", true},
		{"192.0.2.1", "192.0.2.1:5", true},
		{"192.0.2.1", "[::ffff:192.0.2.1]:5", true},
		{"192.0.2.1:5", "192.0.2.1:5", true},
		{"192.0.2.1:6", "192.0.2.1:5", false},
		{"192.0.2.0/24", "192.0.2.200:5", true},
		{"192.0.2.0/24", "[::ffff:192.0.2.200]:5", true},
		{"192.0.3.0/24", "192.0.2.200:5", false},
		{"2001:db8::1", "[2001:db8::1]:5", true},
		{"[2001:db8::1]", "[2001:db8::1]:5", true},
		{"[2001:db8::1]:5", "[2001:db8::1]:5", true},
		{"2001:db8::/32", "[2001:db8::77]:5", true},
	} {
		f, err := ParseClientFilter(tc.spec)
		if err != nil {
			t.Fatalf("%q: %v", tc.spec, err)
		}
		if got := f(netip.MustParseAddrPort(tc.client)); got != tc.want {
			t.Errorf("filter %q on %s = %v, want %v", tc.spec, tc.client, got, tc.want)
		}
	}
	if _, err := ParseClientFilter("example.com"); !errors.Is(err, ErrInvalid) {
		t.Errorf("host name: %v, want ErrInvalid", err)
	}
}

func TestRender(t *testing.T) {
	now := time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)
	var buf bytes.Buffer
	cs := []Conn{
		{ID: 2, Client: "192.0.2.2:1000", Backend: "b:1", Route: "/ws/", Dataplane: "splice", Demoted: true, AgeSeconds: 3700, IdleSeconds: 2, BytesToBackend: 1536, BytesToClient: 3 << 20,
			ClientTCP: &TCPInfo{RTTMicros: 120, Retransmits: 1}, BackendTCP: &TCPInfo{RTTMicros: 45}},
		{ID: 1, Client: "192.0.2.1:1000", Backend: "b:2", Route: "/ws/", Dataplane: "sockmap", AgeSeconds: 5, BytesToBackend: 10},
	}
	if err := SortConns(cs, "id"); err != nil || cs[0].ID != 1 {
		t.Fatalf("sort by id: %v", err)
	}
	if err := SortConns(cs, "out"); err != nil || cs[0].ID != 2 {
		t.Fatalf("sort by out: %v", err)
	}
	if err := SortConns(cs, "nope"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("bad sort key: %v", err)
	}
	if err := WriteConns(&buf, cs); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{"RTT(C)", "splice*", "1h1m", "1.5K", "3.0M", "0.12ms", "0.04ms", "demoted from sockmap"} {
		if !strings.Contains(out, want) {
			t.Errorf("conns table lacks %q:\n%s", want, out)
		}
	}
	buf.Reset()
	bs := []Backend{{Pool: "p", Address: "b:1", State: StateDraining, Weight: 3, Active: 4, History: []Transition{
		{Time: now.Add(-2 * time.Minute), State: StateDraining, Cause: "admin"}, {Time: now.Add(-time.Hour), State: StateUp},
	}}}
	if err := WriteBackends(&buf, bs, now); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "draining 2m0s ago (admin), up 1h0m ago") {
		t.Errorf("backends table:\n%s", buf.String())
	}
}

func TestBytesAndAge(t *testing.T) {
	for n, want := range map[uint64]string{0: "0B", 1023: "1023B", 1024: "1.0K", 1 << 20: "1.0M", 5 << 30: "5.0G"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
	for d, want := range map[time.Duration]string{-time.Second: "0ms", 250 * time.Millisecond: "250ms", 90 * time.Second: "1m30s", 26 * time.Hour: "1d2h"} {
		if got := Age(d); got != want {
			t.Errorf("Age(%v) = %q, want %q", d, got, want)
		}
	}
}

// TestReloadAndLameDuck: the reload and agent-wide drain verbs reach the
// handler and carry its error back.
func TestReloadAndLameDuck(t *testing.T) {
	h := &fakeHandler{}
	_, c := serve(t, h)
	ctx := context.Background()
	if err := c.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Reload(ctx); err == nil || !strings.Contains(err.Error(), "listeners[0].address") {
		t.Fatalf("second reload: %v, want the handler's error", err)
	}
	if err := c.LameDuck(ctx, true); err != nil || !h.lameDuck {
		t.Fatalf("lameduck: %v %v", err, h.lameDuck)
	}
	if err := c.LameDuck(ctx, false); err != nil || h.lameDuck {
		t.Fatalf("unlameduck: %v %v", err, h.lameDuck)
	}
}

// TestUpgrade: the upgrade verb carries the handler's result and error,
// and the CLI waits for the new agent to answer on the socket.
func TestUpgrade(t *testing.T) {
	h := &fakeHandler{}
	_, c := serve(t, h)
	ctx := context.Background()
	res, err := c.Upgrade(ctx, "")
	if err != nil || res.Connections != 3 || res.NewPID != 1 {
		t.Fatalf("upgrade: %+v %v", res, err)
	}
	if err := waitAgent(ctx, c, res.NewPID, time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Upgrade(ctx, "/bin/false"); err == nil || !strings.Contains(err.Error(), "exit status 1") {
		t.Fatalf("failed upgrade: %v, want the handler's error", err)
	}
	if err := waitAgent(ctx, c, 42, 200*time.Millisecond); err == nil {
		t.Fatal("waitAgent accepted the wrong pid")
	}
}
