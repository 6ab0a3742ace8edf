package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/wsplice/wsplice/pkg/agent"
	"github.com/wsplice/wsplice/pkg/config"
	"golang.org/x/sys/unix"
)

// TestMain lets a test re-run this binary as a standalone agent (with its
// own open-file limit) when WSPLICE_E2E_AGENT holds a config.
func TestMain(m *testing.M) {
	if js := os.Getenv("WSPLICE_E2E_AGENT"); js != "" {
		os.Exit(runChildAgent(js))
	}
	os.Exit(m.Run())
}

func runChildAgent(js string) int {
	var cfg config.Config
	if err := json.Unmarshal([]byte(js), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if n := os.Getenv("WSPLICE_E2E_NOFILE"); n != "" {
		var lim uint64
		fmt.Sscan(n, &lim)
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: lim, Max: lim}); err != nil {
			fmt.Fprintln(os.Stderr, "setrlimit:", err)
			return 1
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { io.Copy(io.Discard, os.Stdin); cancel() }() // parent gone or done: stop
	err := agent.Run(ctx, agent.Options{Config: &cfg, TakeOver: os.Getenv("WSPLICE_E2E_TAKEOVER") == "1", Ready: func(a *agent.Agent) {
		fmt.Printf("LISTEN %s\n", a.Addr("ws"))
	}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func limitConfig(plane string, backends []string, lim config.Limits) *config.Config {
	cfg := simpleConfig(plane, backends...)
	cfg.Limits = lim
	return cfg
}

// TestPerIPConns: limit_conn — the (N+1)th concurrent connection from one
// address gets 429 and is counted; a slot frees when a connection closes.
func TestPerIPConns(t *testing.T) {
	a := startAgent(t, limitConfig("splice", echoBackends(t, 1), config.Limits{PerIPConns: 3}))
	addr := a.Addr("ws").String()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var conns []*websocket.Conn
	for range 3 {
		conns = append(conns, dialWS(t, ctx, addr, "/ws/", nil))
	}
	if status, _ := rawRequest(t, addr, upgradeRequest("/ws/")); status != 429 {
		t.Fatalf("4th connection: %d, want 429", status)
	}
	if n := a.Proxy.Counters.Refusals()["per_ip_conns"]; n != 1 {
		t.Fatalf("per_ip_conns refusals = %d, want 1", n)
	}
	conns[0].Close(websocket.StatusNormalClosure, "")
	waitFor(t, "the slot to free", func() bool { return a.Proxy.Active() == 2 })
	if status, _ := rawRequest(t, addr, "GET /ws/ HTTP/1.1\r\nHost: x\r\n\r\n"); status != 200 {
		t.Fatalf("after a connection closed: %d, want 200 (refusals %v, active %d)", status, a.Proxy.Counters.Refusals(), a.Proxy.Active())
	}
	for _, c := range conns[1:] {
		c.CloseNow()
	}
}

// TestPerIPRate: limit_req — new connections beyond the burst get 429.
func TestPerIPRate(t *testing.T) {
	a := startAgent(t, limitConfig("splice", echoBackends(t, 1), config.Limits{PerIPRate: 0.5, PerIPBurst: 2}))
	addr := a.Addr("ws").String()
	for i := range 2 {
		if status, _ := rawRequest(t, addr, "GET /ws/ HTTP/1.1\r\nHost: x\r\n\r\n"); status != 200 {
			t.Fatalf("request %d within the burst: %d", i, status)
		}
	}
	if status, _ := rawRequest(t, addr, "GET /ws/ HTTP/1.1\r\nHost: x\r\n\r\n"); status != 429 {
		t.Fatalf("over the burst: %d, want 429", status)
	}
	if n := a.Proxy.Counters.Refusals()["per_ip_rate"]; n != 1 {
		t.Fatalf("per_ip_rate refusals = %d", n)
	}
}

// TestGlobalMaxConns: above limits.max_conns clients get 503.
func TestGlobalMaxConns(t *testing.T) {
	a := startAgent(t, limitConfig("splice", echoBackends(t, 1), config.Limits{MaxConns: 2}))
	addr := a.Addr("ws").String()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c1 := dialWS(t, ctx, addr, "/ws/", nil)
	c2 := dialWS(t, ctx, addr, "/ws/", nil)
	defer c1.CloseNow()
	defer c2.CloseNow()
	if status, _ := rawRequest(t, addr, upgradeRequest("/ws/")); status != 503 {
		t.Fatalf("3rd connection: %d, want 503", status)
	}
}

// TestBackendMaxConns: a backend at its max_conns takes no more; with no
// other backend the client gets 503.
func TestBackendMaxConns(t *testing.T) {
	cfg := simpleConfig("splice", echoBackends(t, 1)...)
	cfg.Pools[0].Backends[0].MaxConns = 2
	a := startAgent(t, cfg)
	addr := a.Addr("ws").String()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c1 := dialWS(t, ctx, addr, "/ws/", nil)
	c2 := dialWS(t, ctx, addr, "/ws/", nil)
	defer c1.CloseNow()
	defer c2.CloseNow()
	if status, _ := rawRequest(t, addr, upgradeRequest("/ws/")); status != 503 {
		t.Fatalf("3rd connection to a backend with max_conns 2: %d, want 503", status)
	}
}

// TestSlowloris: 1,000 clients that trickle their heads hold nothing for
// longer than the handshake timeout, get 408, and normal clients connect
// and echo meanwhile.
func TestSlowloris(t *testing.T) {
	cfg := simpleConfig("splice", echoBackends(t, 1)...)
	cfg.Listeners[0].HandshakeTimeout = config.Duration(2 * time.Second)
	a := startAgent(t, cfg)
	addr := a.Addr("ws").String()
	const slow = 1000
	var wg sync.WaitGroup
	got408 := make(chan bool, slow)
	stop := make(chan struct{})
	for range slow {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				got408 <- false
				return
			}
			defer c.Close()
			go func() {
				// 8 bytes over 1.6 s, then silence: trickling below the 2 s
				// handshake deadline. (Writing on after the 408 would make
				// the agent's close an RST that can beat the answer.)
				for _, b := range []byte("GET /ws/") {
					select {
					case <-stop:
						return
					case <-time.After(200 * time.Millisecond):
					}
					if _, err := c.Write([]byte{b}); err != nil {
						return
					}
				}
			}()
			c.SetReadDeadline(time.Now().Add(15 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			got408 <- err == nil && resp.StatusCode == 408
		}()
	}
	time.Sleep(300 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := range 20 {
		c := dialWS(t, ctx, addr, "/ws/", nil)
		m := fmt.Sprintf("normal %d", i)
		c.Write(ctx, websocket.MessageText, []byte(m))
		if _, got, err := c.Read(ctx); err != nil || string(got) != m {
			t.Fatalf("normal client %d during slowloris: %q %v", i, got, err)
		}
		c.Close(websocket.StatusNormalClosure, "")
	}
	wg.Wait()
	close(stop)
	close(got408)
	n := 0
	for ok := range got408 {
		if ok {
			n++
		}
	}
	if n != slow {
		t.Fatalf("%d of %d slow clients got 408", n, slow)
	}
	if r := a.Proxy.Counters.Refusals()["head_timeout"]; r != slow {
		t.Fatalf("head_timeout refusals = %d, want %d", r, slow)
	}
}

// TestFDLimit runs the agent in its own process with an open-file limit of
// 1,400: it caps max_conns to what that holds, refuses the excess with 503
// instead of failing, keeps the established connections, and accepts again
// once some close.
func TestFDLimit(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a child agent")
	}
	cfg := simpleConfig("splice", echoBackends(t, 1)...)
	cfg.SetDefaults()
	js, _ := json.Marshal(cfg)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "WSPLICE_E2E_AGENT="+string(js), "WSPLICE_E2E_NOFILE=1400")
	stdin, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
		}
	}()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("child agent: %v\n%s", err, stderr.String())
	}
	addr := strings.TrimSpace(strings.TrimPrefix(line, "LISTEN "))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const capConns = (1400 - 1024) / 2
	var conns []*websocket.Conn
	for range capConns {
		conns = append(conns, dialWS(t, ctx, addr, "/ws/", nil))
	}
	for range 20 {
		if status, _ := rawRequest(t, addr, upgradeRequest("/ws/")); status != 503 {
			t.Fatalf("over the capped limit: %d, want 503", status)
		}
	}
	for i, c := range conns[:10] {
		m := fmt.Sprintf("still here %d", i)
		c.Write(ctx, websocket.MessageText, []byte(m))
		if _, got, err := c.Read(ctx); err != nil || string(got) != m {
			t.Fatalf("established connection %d broke: %v", i, err)
		}
		c.Close(websocket.StatusNormalClosure, "")
	}
	var again *websocket.Conn
	for deadline := time.Now().Add(10 * time.Second); again == nil; {
		c, _, err := websocket.Dial(ctx, "ws://"+addr+"/ws/", nil)
		if err == nil {
			again = c
			break
		}
		if time.Now().After(deadline) {
			fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", cmd.Process.Pid))
			t.Fatalf("the agent did not accept again after connections closed: %v (agent holds %d fds)\n%s", err, len(fds), grepv(stderr.String(), "reason=max_conns"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	again.CloseNow()
	for _, c := range conns[10:] {
		c.CloseNow()
	}
	// Logged before LISTEN, so it is in stderr by now.
	if !strings.Contains(stderr.String(), "capping limits.max_conns") || !strings.Contains(stderr.String(), "LimitNOFILE") {
		t.Errorf("the agent did not say it capped max_conns and how to fix it:\n%s", stderr.String())
	}
}

// syncBuffer is a bytes.Buffer safe for a child's output goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func grepv(s, drop string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.Contains(l, drop) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
