// Package e2e runs real WebSocket clients and servers through a real agent,
// once per data plane: splice everywhere, sockmap where the test is
// privileged (and always in CI).
package e2e

import (
	"bufio"
	"context"
	"crypto/sha1"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/wsplice/wsplice/pkg/agent"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/demo"
	"github.com/wsplice/wsplice/test/testutil"
)

// planes lists the data planes every end-to-end test runs on.
var planes = []string{"splice", "sockmap"}

// forEachPlane runs fn once per data plane, as subtests.
func forEachPlane(t *testing.T, fn func(t *testing.T, plane string)) {
	for _, p := range planes {
		t.Run(p, func(t *testing.T) {
			if p == "sockmap" {
				testutil.RequirePrivileged(t)
			}
			fn(t, p)
		})
	}
}

func testLogger(t *testing.T) *slog.Logger {
	if os.Getenv("WSPLICE_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startAgent runs an agent on cfg until the test ends and returns it.
func startAgent(t *testing.T, cfg *config.Config) *agent.Agent {
	t.Helper()
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("config: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan *agent.Agent, 1)
	errc := make(chan error, 1)
	go func() {
		errc <- agent.Run(ctx, agent.Options{Config: cfg, Logger: testLogger(t), Ready: func(a *agent.Agent) { ready <- a }})
	}()
	select {
	case a := <-ready:
		t.Cleanup(func() {
			cancel()
			if err := <-errc; err != nil {
				t.Errorf("agent: %v", err)
			}
		})
		if cfg.Dataplane == "sockmap" && a.Sockmap == nil {
			t.Fatal("sockmap requested but the agent runs without it")
		}
		return a
	case err := <-errc:
		cancel()
		t.Fatalf("agent did not start: %v", err)
	}
	return nil
}

// simpleConfig is one websocket listener on a loopback port with a /ws/
// route to one pool.
func simpleConfig(plane string, backends ...string) *config.Config {
	cfg := &config.Config{
		Dataplane:    plane,
		Tune:         config.Tune{Mode: "off"},
		Admin:        config.Admin{Socket: "none"},
		DrainTimeout: config.Duration(2 * time.Second),
		Listeners:    []config.Listener{{Name: "ws", Address: "127.0.0.1:0", Routes: []config.Route{{Path: "/ws/", Pool: "p"}}}},
		Pools:        []config.Pool{{Name: "p", ConnectTimeout: config.Duration(time.Second)}},
	}
	for _, b := range backends {
		cfg.Pools[0].Backends = append(cfg.Pools[0].Backends, config.Backend{Address: b})
	}
	return cfg
}

func echoBackends(t *testing.T, n int) []string {
	var addrs []string
	for i := range n {
		e, err := demo.StartEcho(fmt.Sprintf("echo-%d", i+1))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.Close)
		addrs = append(addrs, e.Addr)
	}
	return addrs
}

// rawBackend is a TCP backend driven by the test: it accepts, reads the
// request head, and hands the connection (with a reader that holds any
// bytes read past the head) to fn.
func rawBackend(t *testing.T, fn func(c net.Conn, br *bufio.Reader, head string)) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				head, err := readHead(br)
				if err != nil {
					return
				}
				fn(c, br, head)
			}()
		}
	}()
	return ln.Addr().String()
}

func readHead(br *bufio.Reader) (string, error) {
	var sb strings.Builder
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return sb.String(), err
		}
		sb.WriteString(line)
		if line == "\r\n" {
			return sb.String(), nil
		}
	}
}

const wsKey = "dGhlIHNhbXBsZSBub25jZQ=="

func upgradeRequest(path string, extra ...string) string {
	return "GET " + path + " HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: " + wsKey + "\r\nSec-WebSocket-Version: 13\r\n" + strings.Join(extra, "") + "\r\n"
}

func acceptKey(key string) string {
	h := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(h[:])
}

const switching = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"

// rawUpgrade dials the agent, sends an upgrade head with pipelined bytes
// right behind it in the same write, and returns the connection and a
// reader positioned after the 101 response head.
func rawUpgrade(t *testing.T, addr, path string, pipelined []byte) (*net.TCPConn, *bufio.Reader, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(append([]byte(upgradeRequest(path)), pipelined...)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	head, err := readHead(br)
	if err != nil {
		t.Fatalf("reading response head: %v (got %q)", err, head)
	}
	c.SetReadDeadline(time.Time{})
	return c.(*net.TCPConn), br, head
}

// rawRequest sends raw bytes and returns the status line's code and the
// whole response until the agent closes.
func rawRequest(t *testing.T, addr, req string) (int, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading response to %q: %v", firstLine(req), err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp.StatusCode, string(body)
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\r\n")
	return line
}

// pattern returns n deterministic bytes seeded by seed.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}
