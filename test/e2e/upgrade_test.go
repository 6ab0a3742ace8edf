package e2e

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/wsplice/wsplice/pkg/admin"
	"github.com/wsplice/wsplice/pkg/config"
)

// The upgrade tests run the agent as a child process (this test binary,
// see TestMain in protect_test.go): an upgrade starts the same binary with
// the same arguments, which takes over and lets the old process exit.

// upConns is how many connections carry traffic through the upgrades:
// the test holds both ends of each (2 descriptors), the agent two more,
// and during a hand-off the old and new agent hold theirs at once.
func upConns() int {
	if n, err := strconv.Atoi(os.Getenv("WSPLICE_E2E_UPGRADE_CONNS")); err == nil && n > 0 {
		return n
	}
	if testing.Short() {
		return 200
	}
	return 2000
}

// childAgent is an agent process started by the test and its successors.
type childAgent struct {
	t      *testing.T
	first  *exec.Cmd
	stdin  *os.File // closing it stops whichever agent is current
	lines  chan string
	stderr *os.File
	admin  *admin.Client
	sock   string
	addr   string
}

func startChildAgent(t *testing.T, cfg *config.Config, env ...string) *childAgent {
	t.Helper()
	dir := t.TempDir()
	cfg.Admin.Socket = filepath.Join(dir, "admin.sock")
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	js, _ := json.Marshal(cfg)
	// Real files, not pipes copied by exec: every later agent inherits
	// them, and Wait must not wait for those.
	inR, inW, _ := os.Pipe()
	outR, outW, _ := os.Pipe()
	errF, err := os.Create(filepath.Join(dir, "agents.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), "WSPLICE_E2E_AGENT="+string(js)), env...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errF
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	inR.Close()
	outW.Close()
	a := &childAgent{t: t, first: cmd, stdin: inW, lines: make(chan string, 64), stderr: errF, sock: cfg.Admin.Socket, admin: admin.NewClient(cfg.Admin.Socket)}
	go func() {
		sc := bufio.NewScanner(outR)
		for sc.Scan() {
			a.lines <- sc.Text()
		}
		close(a.lines)
	}()
	t.Cleanup(func() {
		a.stop()
		go cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(errF.Name())
			t.Logf("agent logs (last 6000 bytes):\n%s", tail(grepv(string(b), "level=DEBUG"), 6000))
		}
	})
	select {
	case line := <-a.lines:
		a.addr = strings.TrimPrefix(line, "LISTEN ")
	case <-time.After(60 * time.Second):
		t.Fatalf("the agent did not start:\n%s", a.logs())
	}
	a.waitPID(cmd.Process.Pid)
	return a
}

func (a *childAgent) logs() string {
	b, _ := os.ReadFile(a.stderr.Name())
	return tail(string(b), 4000)
}

// stop closes the agents' stdin (the current one drains and exits) and
// waits until its pid is gone.
func (a *childAgent) stop() {
	pid := a.pid()
	a.stdin.Close()
	if pid > 0 {
		waitGone(pid, 20*time.Second)
	}
	a.admin.Close()
}

// pid asks the agent on the admin socket for its pid (0 if none answers).
func (a *childAgent) pid() int {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := a.admin.Status(ctx)
	if err != nil {
		return 0
	}
	return st.PID
}

// waitPID waits until the agent answering on the admin socket is pid.
func (a *childAgent) waitPID(pid int) {
	a.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := a.pid()
		if got == pid {
			return
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("the admin socket answers for pid %d, want %d\n%s", got, pid, a.logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// gone reports whether pid has exited (no such process, or a zombie
// waiting for its parent).
func gone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// pid (comm) S ...: the state follows the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z' || s[i+2] == 'X'
}

func waitGone(pid int, within time.Duration) bool {
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if gone(pid) {
			return true
		}
	}
	return false
}

// fdCount counts the open descriptors of pid: pipes (the splice plane's
// pool, which lends one to each direction moving bytes right now) and
// everything else (sockets above all).
func fdCount(t *testing.T, pid int) (other, pipes int) {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("fds of %d: %v", pid, err)
	}
	for _, e := range es {
		l, err := os.Readlink(filepath.Join(dir, e.Name()))
		switch {
		case err != nil:
			// Closed since ReadDir: a pipe the splice pool let go of.
		case strings.HasPrefix(l, "pipe:"):
			pipes++
		default:
			other++
		}
	}
	return other, pipes
}

// fdKinds summarises pid's descriptors by what they point at.
func fdKinds(pid int) map[string]int {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	es, _ := os.ReadDir(dir)
	out := map[string]int{}
	for _, e := range es {
		l, _ := os.Readlink(filepath.Join(dir, e.Name()))
		if i := strings.IndexByte(l, ':'); i > 0 && !strings.HasPrefix(l, "/") {
			l = l[:i]
		}
		out[l]++
	}
	return out
}

// maxIdlePipeFDs is what the splice plane's pool keeps when idle: 8 pipes
// of 2 descriptors on this 2-CPU machine (max(8, 4×GOMAXPROCS)); the
// agent's stdin/stdout/stderr may be pipes too.
const maxIdlePipeFDs = 2*8 + 3

// settledFDs waits until pid's pipes are back in the idle pool (traffic
// that queued during a hand-off lends many for a moment) and returns the
// counts.
func settledFDs(t *testing.T, pid int) (other, pipes int) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		other, pipes = fdCount(t, pid)
		if pipes <= maxIdlePipeFDs || time.Now().After(deadline) {
			return other, pipes
		}
	}
}

// Messages: seq (4 bytes), length (2), payload, CRC-32 of all before it
// (4). The payload is a function of the connection and the sequence
// number, so both ends can check every byte, and the sequence number
// shows a lost, repeated or reordered message.
const msgHead = 6

func msgPayload(conn, seq uint32, b []byte) []byte {
	r := rand.NewPCG(uint64(conn), uint64(seq))
	n := 16 + int(r.Uint64()%480)
	b = b[:0]
	for len(b) < n {
		b = binary.LittleEndian.AppendUint64(b, r.Uint64())
	}
	return b[:n]
}

func appendMsg(b []byte, conn, seq uint32, scratch []byte) []byte {
	p := msgPayload(conn, seq, scratch)
	b = binary.BigEndian.AppendUint32(b, seq)
	b = binary.BigEndian.AppendUint16(b, uint16(len(p)))
	b = append(b, p...)
	return binary.BigEndian.AppendUint32(b, crc32.ChecksumIEEE(b))
}

// readMsg reads one message and checks it is message want of conn.
func readMsg(br *bufio.Reader, conn, want uint32, buf, scratch []byte) ([]byte, error) {
	head := buf[:msgHead]
	if _, err := io.ReadFull(br, head); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(head[4:]))
	m := buf[:msgHead+n+4]
	if _, err := io.ReadFull(br, m[msgHead:]); err != nil {
		return nil, err
	}
	seq := binary.BigEndian.Uint32(m)
	if crc32.ChecksumIEEE(m[:msgHead+n]) != binary.BigEndian.Uint32(m[msgHead+n:]) {
		return nil, fmt.Errorf("conn %d: message %d (expected %d): checksum mismatch", conn, seq, want)
	}
	if seq != want {
		return nil, fmt.Errorf("conn %d: got message %d, want %d (lost, repeated or reordered)", conn, seq, want)
	}
	if p := msgPayload(conn, seq, scratch); string(p) != string(m[msgHead:msgHead+n]) {
		return nil, fmt.Errorf("conn %d: message %d: payload differs", conn, seq)
	}
	return m, nil
}

// msgBackend accepts upgrades, answers 101 and echoes every message after
// checking it; it records how many each connection sent.
type msgBackend struct {
	ln   net.Listener
	recv sync.Map // conn id → *atomic.Uint32 (messages checked)
	errs atomic.Int64
	err  atomic.Pointer[error]
}

func startMsgBackend(t *testing.T) *msgBackend {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &msgBackend{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go b.serve(c)
		}
	}()
	return b
}

func (b *msgBackend) fail(err error) {
	if b.errs.Add(1) == 1 {
		b.err.Store(&err)
	}
}

func (b *msgBackend) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	head, err := readHead(br)
	if err != nil {
		return
	}
	var id uint32
	for _, l := range strings.Split(head, "\r\n") {
		if v, ok := strings.CutPrefix(l, "X-Conn: "); ok {
			n, _ := strconv.Atoi(v)
			id = uint32(n)
		}
	}
	if _, err := io.WriteString(c, switching); err != nil {
		return
	}
	cnt := new(atomic.Uint32)
	b.recv.Store(id, cnt)
	buf, scratch := make([]byte, 1024), make([]byte, 0, 512)
	for seq := uint32(0); ; seq++ {
		m, err := readMsg(br, id, seq, buf, scratch)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				b.fail(fmt.Errorf("backend: %w", err))
			}
			return
		}
		cnt.Add(1)
		if _, err := c.Write(m); err != nil {
			return
		}
	}
}

// msgClient is one connection sending numbered messages at random
// intervals and checking their echoes.
type msgClient struct {
	id         uint32
	c          *net.TCPConn
	br         *bufio.Reader
	sent, echo atomic.Uint32
	err        atomic.Pointer[error]
	done       chan struct{} // reader finished
	wdone      chan struct{} // writer finished
}

func dialMsgClient(addr string, id uint32) (*msgClient, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	req := upgradeRequest("/ws/", fmt.Sprintf("X-Conn: %d\r\n", id))
	if _, err := io.WriteString(c, req); err != nil {
		c.Close()
		return nil, err
	}
	br := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	head, err := readHead(br)
	c.SetReadDeadline(time.Time{})
	if err != nil || !strings.HasPrefix(head, "HTTP/1.1 101") {
		c.Close()
		return nil, fmt.Errorf("conn %d: handshake: %q %v", id, firstLine(head), err)
	}
	return &msgClient{id: id, c: c.(*net.TCPConn), br: br, done: make(chan struct{}), wdone: make(chan struct{})}, nil
}

func (m *msgClient) setErr(err error) {
	m.err.CompareAndSwap(nil, &err)
}

// run sends until stop closes, then reports; the reader checks echoes.
func (m *msgClient) run(stop <-chan struct{}, wg *sync.WaitGroup) {
	wg.Add(2)
	go func() {
		defer wg.Done()
		defer close(m.done)
		buf, scratch := make([]byte, 1024), make([]byte, 0, 512)
		for seq := uint32(0); ; seq++ {
			if _, err := readMsg(m.br, m.id, seq, buf, scratch); err != nil {
				if !errors.Is(err, net.ErrClosed) {
					m.setErr(fmt.Errorf("client reading: %w", err))
				}
				return
			}
			m.echo.Add(1)
		}
	}()
	go func() {
		defer wg.Done()
		defer close(m.wdone)
		r := rand.New(rand.NewPCG(uint64(m.id), 7))
		var b []byte
		scratch := make([]byte, 0, 512)
		for seq := uint32(0); ; seq++ {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(100+r.IntN(200)) * time.Millisecond):
			}
			b = appendMsg(b[:0], m.id, seq, scratch)
			m.c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			if _, err := m.c.Write(b); err != nil {
				m.setErr(fmt.Errorf("client writing message %d: %w", seq, err))
				return
			}
			m.sent.Add(1)
		}
	}()
}

// msgFleet is every connection of the test.
type msgFleet struct {
	t       *testing.T
	backend *msgBackend
	clients []*msgClient
	stop    chan struct{}
	wg      sync.WaitGroup
}

func startFleet(t *testing.T, addr string, b *msgBackend, n int) *msgFleet {
	t.Helper()
	f := &msgFleet{t: t, backend: b, clients: make([]*msgClient, n), stop: make(chan struct{})}
	var next atomic.Int64
	var wg sync.WaitGroup
	var ferr atomic.Pointer[error]
	for range 32 {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ferr.Load() != nil {
					return
				}
				c, err := dialMsgClient(addr, uint32(i))
				if err != nil {
					ferr.CompareAndSwap(nil, &err)
					return
				}
				f.clients[i] = c
			}
		})
	}
	wg.Wait()
	if e := ferr.Load(); e != nil {
		t.Fatalf("connecting: %v", *e)
	}
	for _, c := range f.clients {
		c.run(f.stop, &f.wg)
	}
	t.Cleanup(func() {
		for _, c := range f.clients {
			if c != nil {
				c.c.Close()
			}
		}
	})
	return f
}

// check fails the test on the first error of any connection or the backend.
func (f *msgFleet) check() {
	f.t.Helper()
	if e := f.backend.err.Load(); e != nil {
		f.t.Fatalf("%d backend errors, first: %v", f.backend.errs.Load(), *e)
	}
	for _, c := range f.clients {
		if e := c.err.Load(); e != nil {
			f.t.Fatalf("connection %d: %v", c.id, *e)
		}
	}
}

// progress waits until every connection has had more echoes than in
// before (one more round trip through whichever agent serves now).
func (f *msgFleet) progress(before []uint32, within time.Duration) {
	f.t.Helper()
	deadline := time.Now().Add(within)
	for {
		f.check()
		lag := 0
		for i, c := range f.clients {
			if c.echo.Load() <= before[i]+1 {
				lag++
			}
		}
		if lag == 0 {
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("%d of %d connections made no progress in %v", lag, len(f.clients), within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (f *msgFleet) echoes() []uint32 {
	out := make([]uint32, len(f.clients))
	for i, c := range f.clients {
		out[i] = c.echo.Load()
	}
	return out
}

// finish stops the senders and checks that every message sent arrived at
// the backend and came back, each exactly once and in order.
func (f *msgFleet) finish() (msgs uint64) {
	f.t.Helper()
	close(f.stop)
	deadline := time.Now().Add(60 * time.Second)
	for _, c := range f.clients {
		<-c.wdone
		for c.echo.Load() != c.sent.Load() && c.err.Load() == nil {
			if time.Now().After(deadline) {
				f.t.Fatalf("connection %d: %d messages sent, %d echoed", c.id, c.sent.Load(), c.echo.Load())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	f.check()
	for _, c := range f.clients {
		v, ok := f.backend.recv.Load(c.id)
		if !ok {
			f.t.Fatalf("connection %d never reached the backend", c.id)
		}
		if got := v.(*atomic.Uint32).Load(); got != c.sent.Load() {
			f.t.Fatalf("connection %d: %d sent, %d at the backend", c.id, c.sent.Load(), got)
		}
		msgs += uint64(c.sent.Load())
		c.c.Close()
	}
	f.wg.Wait()
	return msgs
}

func upgradeConfig(backend, metrics, plane string) *config.Config {
	cfg := simpleConfig(plane, backend)
	cfg.Metrics.Address = metrics
	cfg.Listeners[0].Backlog = 4096
	return cfg
}

func freePort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// healthz asks the metrics address for /healthz on a new connection,
// retrying for up to 30s (a loaded machine, -race).
func healthz(addr string) error {
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	var err error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		var resp *http.Response
		if resp, err = c.Get("http://" + addr + "/healthz"); err != nil {
			continue
		}
		resp.Body.Close()
		if resp.StatusCode == 200 {
			return nil
		}
		err = fmt.Errorf("/healthz: %s", resp.Status)
	}
	return err
}

// TestUpgrade: with connections exchanging checksummed, numbered messages
// continuously, ten upgrades in a row (alternately `wsplice upgrade`
// through the admin API and SIGUSR2) each hand every connection to a new
// process: the old process exits, the new one holds the same number of
// descriptors, every connection keeps moving, the admin socket and the
// metrics address move too, and at the end every message arrived exactly
// once and in order, both ways. Then an upgrade to a binary that exits at
// once fails and leaves the agent serving everything, new clients too.
//
// On the sockmap plane the new agent also takes over the old one's BPF
// maps (the same map ids, each socket in them throughout) and the
// connections never leave the kernel path.
func TestUpgrade(t *testing.T) {
	if testing.Short() {
		t.Skip("child agents")
	}
	forEachPlane(t, testUpgrade)
}

func testUpgrade(t *testing.T, plane string) {
	n := upConns()
	b := startMsgBackend(t)
	metrics := freePort(t)
	a := startChildAgent(t, upgradeConfig(b.ln.Addr().String(), metrics, plane))
	t0 := time.Now()
	f := startFleet(t, a.addr, b, n)
	t.Logf("%d connections established in %v", n, time.Since(t0).Round(time.Millisecond))
	pid := a.first.Process.Pid
	f.progress(f.echoes(), 60*time.Second)
	cpu0, e0, t0 := cpuTicks(pid), sumEchoes(f.echoes()), time.Now()
	time.Sleep(2 * time.Second)
	t.Logf("steady state: the agent used %.0f%% of a CPU for %.0f echoes/s", float64(cpuTicks(pid)-cpu0)/float64(time.Since(t0)/(10*time.Millisecond))*100,
		float64(sumEchoes(f.echoes())-e0)/time.Since(t0).Seconds())
	base, basePipes := settledFDs(t, pid)
	baseKinds := fdKinds(pid)
	if base < 2*n {
		t.Fatalf("the agent holds %d descriptors for %d connections", base, n)
	}
	t.Logf("agent pid %d holds %d descriptors besides %d of pipes (%d for the connections)", pid, base, basePipes, 2*n)
	var maps sockhashes
	if plane == "sockmap" {
		maps = agentSockhashes(t, pid)
		if got := maps.entries(t); got != [2]int{2 * n, 2 * n} {
			t.Fatalf("sockhash entries %v, want %d in each", got, 2*n)
		}
	}
	// Sockets may differ by the admin and metrics clients' idle
	// keep-alive connections.
	const slack = 4
	ctx := context.Background()

	rounds := 10
	if v, err := strconv.Atoi(os.Getenv("WSPLICE_E2E_UPGRADE_ROUNDS")); err == nil {
		rounds = v
	}
	var counts []string
	for i := range rounds {
		before := f.echoes()
		t1 := time.Now()
		var newPID int
		var res admin.UpgradeResult
		if i%2 == 0 {
			var err error
			res, err = a.admin.Upgrade(ctx, "")
			if err != nil {
				t.Fatalf("upgrade %d: %v\n%s", i+1, err, a.logs())
			}
			newPID = res.NewPID
			if res.Connections != n || res.Rejected != 0 || res.OldPID != pid {
				t.Fatalf("upgrade %d: %+v, want %d connections from pid %d", i+1, res, n, pid)
			}
			a.waitPID(newPID)
		} else {
			if err := syscall.Kill(pid, syscall.SIGUSR2); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(60 * time.Second)
			for newPID = a.pid(); newPID == pid || newPID == 0; newPID = a.pid() {
				if time.Now().After(deadline) {
					t.Fatalf("upgrade %d (SIGUSR2): pid %d still answers\n%s", i+1, pid, a.logs())
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		took := time.Since(t1)
		if newPID == pid {
			t.Fatalf("upgrade %d: same pid", i+1)
		}
		if !waitGone(pid, 20*time.Second) {
			t.Fatalf("upgrade %d: the old agent (pid %d) is still running\n%s", i+1, pid, a.logs())
		}
		if line := <-a.lines; line != "LISTEN "+a.addr {
			t.Fatalf("upgrade %d: the new agent printed %q, want it on %s", i+1, line, a.addr)
		}
		f.progress(before, 60*time.Second)
		if err := healthz(metrics); err != nil {
			t.Fatalf("upgrade %d: metrics address after the hand-off: %v", i+1, err)
		}
		st, err := a.admin.Status(ctx)
		onPlane := st.Connections.Splice
		if plane == "sockmap" {
			onPlane = st.Connections.Sockmap
		}
		if err != nil || st.Connections.Active != n || onPlane != n || st.Connections.Demoted != 0 {
			t.Fatalf("upgrade %d: status %+v %v, want %d %s connections", i+1, st.Connections, err, n, plane)
		}
		if plane == "sockmap" {
			// The same maps, every socket still in them.
			got := agentSockhashes(t, newPID)
			if got.ids != maps.ids {
				t.Fatalf("upgrade %d: the new agent's sockhashes are %v, the first agent's %v: it did not take them over", i+1, got.ids, maps.ids)
			}
			if e := got.entries(t); e != [2]int{2 * n, 2 * n} {
				t.Fatalf("upgrade %d: sockhash entries %v, want %d in each", i+1, e, 2*n)
			}
		}
		fds, pipes := settledFDs(t, newPID)
		counts = append(counts, fmt.Sprintf("%d+%d", fds, pipes))
		how := "admin API"
		if i%2 == 1 {
			how = "SIGUSR2"
		}
		t.Logf("upgrade %2d (%s): pid %d → %d in %v (%d batches, the longest from detach to adoption %.0fms, accepting paused %.0fms), new agent holds %d descriptors and %d of pipes",
			i+1, how, pid, newPID, took.Round(time.Millisecond), res.Batches, res.MaxBatch*1000, res.AcceptPause*1000, fds, pipes)
		if fds < base-slack || fds > base+slack || pipes > maxIdlePipeFDs {
			t.Fatalf("upgrade %d: the new agent holds %d descriptors and %d of pipes, the first held %d and %d: a leak (%v, first %v)", i+1, fds, pipes, base, basePipes, fdKinds(newPID), baseKinds)
		}
		pid = newPID
	}
	t.Logf("descriptors (others+pipes) after each upgrade: %v (first agent %d+%d)", counts, base, basePipes)
	if lf, err := os.ReadFile(a.stderr.Name()); err == nil {
		for _, l := range strings.Split(string(lf), "\n") {
			if strings.Contains(l, "upgrade: the new agent serves") || strings.Contains(l, "upgrade: took over") {
				t.Log(l)
			}
		}
	}

	// A binary that exits at once: the upgrade fails, the agent serves on.
	before := f.echoes()
	_, err := a.admin.Upgrade(ctx, "/bin/false")
	if err == nil || !strings.Contains(err.Error(), "exit") {
		t.Fatalf("upgrade to /bin/false: %v, want a failure saying the new agent exited", err)
	}
	t.Logf("failed upgrade: %v", err)
	if got := a.pid(); got != pid {
		t.Fatalf("after the failed upgrade pid %d answers, want %d", got, pid)
	}
	f.progress(before, 60*time.Second)
	c, err := dialMsgClient(a.addr, uint32(n))
	if err != nil {
		t.Fatalf("a new client after the failed upgrade: %v", err)
	}
	c.c.Close()
	if fds, pipes := settledFDs(t, pid); fds < base-slack || fds > base+slack+1 || pipes > maxIdlePipeFDs {
		t.Fatalf("after the failed upgrade the agent holds %d descriptors and %d of pipes (first agent %d and %d)", fds, pipes, base, basePipes)
	}
	msgs := f.finish()
	t.Logf("%d messages each way, every one checked at the backend and back at the client", msgs)
	if plane == "sockmap" {
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			e := maps.entries(t)
			if e == [2]int{} {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("sockhash entries %v after every connection closed", e)
			}
		}
	}
}

// cpuTicks is pid's user+system time in clock ticks (10ms).
func cpuTicks(pid int) int64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return u + st
}

func sumEchoes(xs []uint32) (n uint64) {
	for _, x := range xs {
		n += uint64(x)
	}
	return n
}

// sockhashes are an agent's two sockhash maps (verdict and target), by id.
type sockhashes struct {
	ids  [2]ebpf.MapID
	maps [2]*ebpf.Map
}

// agentSockhashes finds the sockhash maps pid holds, from its descriptors'
// fdinfo (map_type 18 is BPF_MAP_TYPE_SOCKHASH).
func agentSockhashes(t *testing.T, pid int) sockhashes {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fdinfo", pid)
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var ids []ebpf.MapID
	seen := map[ebpf.MapID]bool{}
	for _, e := range es {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil || !strings.Contains(string(b), "map_type:\t18\n") {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "map_id:\t"); ok {
				id, _ := strconv.Atoi(v)
				if !seen[ebpf.MapID(id)] {
					seen[ebpf.MapID(id)] = true
					ids = append(ids, ebpf.MapID(id))
				}
			}
		}
	}
	if len(ids) != 2 {
		t.Fatalf("agent %d holds %d sockhash maps (%v), want 2", pid, len(ids), ids)
	}
	slices.Sort(ids)
	var s sockhashes
	for i, id := range ids {
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		s.ids[i], s.maps[i] = id, m
	}
	return s
}

// entries counts the sockets in each map.
func (s sockhashes) entries(t *testing.T) (n [2]int) {
	t.Helper()
	for i, m := range s.maps {
		var k, v uint64
		it := m.Iterate()
		for it.Next(&k, &v) {
			n[i]++
		}
		if err := it.Err(); err != nil {
			t.Fatalf("walking sockhash %d: %v", s.ids[i], err)
		}
	}
	return n
}

// notifySocket is a stand-in for systemd's NOTIFY_SOCKET: it records each
// datagram with the sender's pid (SCM_CREDENTIALS).
type notifySocket struct {
	path string
	mu   sync.Mutex
	msgs []notifyMsg
}

type notifyMsg struct {
	pid  int
	text string
}

func startNotifySocket(t *testing.T, dir string) *notifySocket {
	n := &notifySocket{path: filepath.Join(dir, "notify")}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rc, _ := c.SyscallConn()
	rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_PASSCRED, 1) })
	go func() {
		buf, oob := make([]byte, 4096), make([]byte, 256)
		for {
			k, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			m := notifyMsg{text: string(buf[:k])}
			if cms, err := syscall.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, cm := range cms {
					if cred, err := syscall.ParseUnixCredentials(&cm); err == nil {
						m.pid = int(cred.Pid)
					}
				}
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, m)
			n.mu.Unlock()
		}
	}()
	return n
}

// wait returns the first message from pid that contains text.
func (n *notifySocket) wait(t *testing.T, pid int, text string) notifyMsg {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		n.mu.Lock()
		for _, m := range n.msgs {
			if m.pid == pid && strings.Contains(m.text, text) {
				n.mu.Unlock()
				return m
			}
		}
		n.mu.Unlock()
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	t.Fatalf("no %q from pid %d; got %+v", text, pid, n.msgs)
	return notifyMsg{}
}

func (n *notifySocket) from(pid int) []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []string
	for _, m := range n.msgs {
		if m.pid == pid {
			out = append(out, m.text)
		}
	}
	return out
}

// TestUpgradeBinary runs the real wsplice binary from a configuration file
// as systemd would (Type=notify, NOTIFY_SOCKET): `wsplice upgrade` hands
// the connections over, the new process announces MAINPID=<its pid> with
// READY=1, the old one exits without STOPPING=1 (which would stop the
// unit), and `wsplice upgrade --binary /bin/false` fails with the reason
// while the agent serves on.
func TestUpgradeBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "wsplice")
	build := exec.Command("go", "build", "-o", bin, "./cmd/wsplice")
	build.Dir = "../.."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	b := startMsgBackend(t)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	sock := filepath.Join(dir, "run", "admin.sock")
	cfgPath := filepath.Join(dir, "wsplice.yaml")
	cfg := fmt.Sprintf(`dataplane: splice
drain_timeout: 2s
tune: {mode: "off"}
admin: {socket: %q}
listeners:
  - name: ws
    address: %q
    routes: [{path: /ws/, pool: p}]
pools:
  - name: p
    backends: [{address: %q}]
`, sock, addr, b.ln.Addr().String())
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	notify := startNotifySocket(t, dir)
	logf, _ := os.Create(filepath.Join(dir, "agent.log"))
	agent := exec.Command(bin, "run", "-c", cfgPath)
	agent.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify.path)
	agent.Stdout, agent.Stderr = logf, logf
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	old := agent.Process.Pid
	go agent.Wait()
	logs := func() string { b, _ := os.ReadFile(logf.Name()); return tail(string(b), 4000) }
	cli := func(args ...string) (string, error) {
		out, err := exec.Command(bin, append(args, "--admin-socket", sock)...).CombinedOutput()
		return string(out), err
	}
	var current atomic.Int64
	current.Store(int64(old))
	t.Cleanup(func() {
		pid := int(current.Load())
		syscall.Kill(pid, syscall.SIGTERM)
		waitGone(pid, 20*time.Second)
		if t.Failed() {
			t.Logf("agent log:\n%s", logs())
		}
	})
	notify.wait(t, old, "READY=1")
	f := startFleet(t, addr, b, 50)
	f.progress(f.echoes(), 30*time.Second)

	out, err := cli("upgrade")
	if err != nil {
		t.Fatalf("wsplice upgrade: %v\n%s\n%s", err, out, logs())
	}
	t.Logf("wsplice upgrade: %s", strings.TrimSpace(out))
	var newPID int
	if _, err := fmt.Sscanf(out, "upgraded: pid %d → %d", new(int), &newPID); err != nil || newPID == old {
		t.Fatalf("cannot read the new pid from %q: %v", out, err)
	}
	current.Store(int64(newPID))
	m := notify.wait(t, newPID, "MAINPID=")
	if m.text != fmt.Sprintf("MAINPID=%d\nREADY=1", newPID) {
		t.Fatalf("the new agent told systemd %q, want MAINPID=%d and READY=1 in one message", m.text, newPID)
	}
	if !waitGone(old, 20*time.Second) {
		t.Fatalf("the old agent %d is still running", old)
	}
	for _, s := range notify.from(old) {
		if strings.Contains(s, "STOPPING=1") {
			t.Fatalf("the old agent sent %q: systemd would stop the unit", s)
		}
	}
	f.progress(f.echoes(), 30*time.Second)

	out, err = cli("upgrade", "--binary", "/bin/false")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(out, "exit status 1") {
		t.Fatalf("wsplice upgrade --binary /bin/false: %v\n%s", err, out)
	}
	t.Logf("wsplice upgrade --binary /bin/false: exit %d: %s", ee.ExitCode(), strings.TrimSpace(out))

	// A configuration the new process cannot serve: a second listener on a
	// port in use (it fails while starting, and says why), then a file
	// that does not parse (it exits before the hand-off starts).
	busy, _ := net.Listen("tcp", "127.0.0.1:0")
	defer busy.Close()
	for _, bad := range []struct{ cfg, want string }{
		{strings.Replace(cfg, "pools:", fmt.Sprintf("  - {name: extra, address: %q, mode: tcp, pool: p}\npools:", busy.Addr().String()), 1), "address already in use"},
		{"listeners: [", "exit status 3"},
	} {
		os.WriteFile(cfgPath, []byte(bad.cfg), 0o600)
		out, err = cli("upgrade")
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(out, bad.want) {
			t.Fatalf("wsplice upgrade with a bad configuration: %v\n%s\nconfig:\n%s", err, out, bad.cfg)
		}
		t.Logf("wsplice upgrade with a bad configuration: exit %d: %s", ee.ExitCode(), strings.TrimSpace(out))
	}
	os.WriteFile(cfgPath, []byte(cfg), 0o600)
	out, err = cli("status", "-o", "json")
	var st admin.Status
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || st.PID != newPID || st.Connections.Active != 50 {
		t.Fatalf("status after the failed upgrade: %v %+v\n%s", err, st.Connections, out)
	}
	f.progress(f.echoes(), 30*time.Second)
	t.Logf("%d messages each way checked", f.finish())
	syscall.Kill(newPID, syscall.SIGTERM)
	notify.wait(t, newPID, "STOPPING=1")
}
