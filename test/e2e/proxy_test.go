package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/wsplice/wsplice/pkg/config"
)

func dialWS(t *testing.T, ctx context.Context, addr, path string, hdr http.Header) *websocket.Conn {
	t.Helper()
	c, _, err := websocket.Dial(ctx, "ws://"+addr+path, &websocket.DialOptions{HTTPHeader: hdr})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	c.SetReadLimit(8 << 20)
	if _, hello, err := c.Read(ctx); err != nil || !strings.HasPrefix(string(hello), "hello from ") {
		t.Fatalf("greeting: %q %v", hello, err)
	}
	return c
}

// TestEchoMessages sends text and binary messages of 1 B to 1 MiB through
// the agent and checks each comes back intact.
func TestEchoMessages(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		a := startAgent(t, simpleConfig(plane, echoBackends(t, 2)...))
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		c := dialWS(t, ctx, a.Addr("ws").String(), "/ws/echo", nil)
		defer c.CloseNow()
		for size := 1; size <= 1<<20; size *= 4 {
			for _, typ := range []websocket.MessageType{websocket.MessageText, websocket.MessageBinary} {
				msg := pattern(size, byte(size))
				if typ == websocket.MessageText {
					msg = bytes.Repeat([]byte("x"), size)
				}
				if err := c.Write(ctx, typ, msg); err != nil {
					t.Fatalf("write %d: %v", size, err)
				}
				gt, got, err := c.Read(ctx)
				if err != nil || gt != typ || !bytes.Equal(got, msg) {
					t.Fatalf("%v message of %d bytes: came back as %v, %d bytes, err %v", typ, size, gt, len(got), err)
				}
			}
		}
		conns := a.Proxy.Conns()
		if len(conns) != 1 {
			t.Fatalf("agent lists %d connections, want 1", len(conns))
		}
		st, ok := a.Proxy.Stats(conns[0])
		if !ok || string(st.Plane) != plane {
			t.Fatalf("connection on plane %q (known %v), want %s", st.Plane, ok, plane)
		}
		if st.ClientToBackend.Bytes < 1<<20 || st.BackendToClient.Bytes < 1<<20 {
			t.Fatalf("byte counters too low: %+v", st)
		}
		c.Close(websocket.StatusNormalClosure, "")
	})
}

// TestManyClients runs concurrent clients, each echoing messages.
func TestManyClients(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		a := startAgent(t, simpleConfig(plane, echoBackends(t, 3)...))
		addr := a.Addr("ws").String()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		const clients, msgs = 200, 20
		var wg sync.WaitGroup
		errs := make(chan error, clients)
		for i := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, _, err := websocket.Dial(ctx, "ws://"+addr+"/ws/", nil)
				if err != nil {
					errs <- err
					return
				}
				defer c.CloseNow()
				if _, _, err := c.Read(ctx); err != nil {
					errs <- err
					return
				}
				for j := range msgs {
					m := pattern(100+j*37, byte(i+j))
					if err := c.Write(ctx, websocket.MessageBinary, m); err != nil {
						errs <- err
						return
					}
					_, got, err := c.Read(ctx)
					if err != nil || !bytes.Equal(got, m) {
						errs <- fmt.Errorf("client %d message %d: %v", i, j, err)
						return
					}
				}
				c.Close(websocket.StatusNormalClosure, "")
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		waitFor(t, "connections to close", func() bool { return a.Proxy.Active() == 0 })
	})
}

// TestPipelinedBothWays: the client sends bytes in the same write as its
// head, and the backend sends bytes in the same write as its 101. Nothing
// may be lost or duplicated on either side.
func TestPipelinedBothWays(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		up, down := pattern(300<<10, 1), pattern(300<<10, 2)
		gotUp := make(chan []byte, 1)
		backend := rawBackend(t, func(c net.Conn, br *bufio.Reader, head string) {
			c.Write(append([]byte(switching), down...))
			buf := make([]byte, len(up))
			_, err := io.ReadFull(br, buf)
			if err != nil {
				gotUp <- nil
				return
			}
			gotUp <- buf
			io.Copy(io.Discard, br)
		})
		a := startAgent(t, simpleConfig(plane, backend))
		for i := range 20 {
			c, br, head := rawUpgrade(t, a.Addr("ws").String(), "/ws/", up)
			if !strings.HasPrefix(head, "HTTP/1.1 101") {
				t.Fatalf("response %q", head)
			}
			buf := make([]byte, len(down))
			c.SetReadDeadline(time.Now().Add(20 * time.Second))
			if _, err := io.ReadFull(br, buf); err != nil || !bytes.Equal(buf, down) {
				t.Fatalf("run %d: backend→client bytes differ (err %v)", i, err)
			}
			if g := <-gotUp; !bytes.Equal(g, up) {
				t.Fatalf("run %d: client→backend bytes differ", i)
			}
			c.Close()
		}
	})
}

// TestHalfClose: each side closes its write half with data still in flight;
// the other side receives every byte, then EOF, and can still answer.
func TestHalfClose(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		t.Run("client_first", func(t *testing.T) {
			data := pattern(2<<20, 3)
			backend := rawBackend(t, func(c net.Conn, br *bufio.Reader, head string) {
				c.Write([]byte(switching))
				got, err := io.ReadAll(br) // until the client's FIN arrives
				if err != nil {
					return
				}
				// Answer after the client's FIN: the reverse direction still works.
				fmt.Fprintf(c, "got %d bytes", len(got))
				if bytes.Equal(got, data) {
					io.WriteString(c, " intact")
				}
				c.(*net.TCPConn).CloseWrite()
			})
			a := startAgent(t, simpleConfig(plane, backend))
			c, br, _ := rawUpgrade(t, a.Addr("ws").String(), "/ws/", nil)
			if _, err := c.Write(data); err != nil {
				t.Fatal(err)
			}
			c.CloseWrite()
			c.SetReadDeadline(time.Now().Add(20 * time.Second))
			reply, err := io.ReadAll(br)
			if err != nil {
				t.Fatalf("reading reply: %v", err)
			}
			if want := fmt.Sprintf("got %d bytes intact", len(data)); string(reply) != want {
				t.Fatalf("reply %q, want %q", reply, want)
			}
		})
		t.Run("backend_first", func(t *testing.T) {
			data := pattern(2<<20, 4)
			result := make(chan string, 1)
			backend := rawBackend(t, func(c net.Conn, br *bufio.Reader, head string) {
				c.Write(append([]byte(switching), data...))
				c.(*net.TCPConn).CloseWrite()
				br2 := bufio.NewReader(br)
				got, _ := io.ReadAll(br2)
				result <- string(got)
			})
			a := startAgent(t, simpleConfig(plane, backend))
			c, br, _ := rawUpgrade(t, a.Addr("ws").String(), "/ws/", nil)
			c.SetReadDeadline(time.Now().Add(20 * time.Second))
			got, err := io.ReadAll(br)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("client read %d of %d bytes before EOF, err %v", len(got), len(data), err)
			}
			io.WriteString(c, "thanks")
			c.CloseWrite()
			select {
			case r := <-result:
				if r != "thanks" {
					t.Fatalf("backend got %q after its FIN, want thanks", r)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("backend never saw the client's answer and FIN")
			}
		})
	})
}

// TestBackendReset: a backend that resets its connection makes the client
// see a reset too, not a clean close.
func TestBackendReset(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		backend := rawBackend(t, func(c net.Conn, br *bufio.Reader, head string) {
			c.Write([]byte(switching))
			buf := make([]byte, 5)
			io.ReadFull(br, buf)
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		})
		a := startAgent(t, simpleConfig(plane, backend))
		c, br, _ := rawUpgrade(t, a.Addr("ws").String(), "/ws/", nil)
		io.WriteString(c, "hello")
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := io.ReadAll(br)
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("client read ended with %v, want connection reset", err)
		}
		waitFor(t, "the connection to leave the table", func() bool { return a.Proxy.Active() == 0 })
	})
}

// TestClientReset: a client reset reaches the backend as a reset.
func TestClientReset(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		result := make(chan error, 1)
		backend := rawBackend(t, func(c net.Conn, br *bufio.Reader, head string) {
			c.Write([]byte(switching))
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err := io.ReadAll(br)
			result <- err
		})
		a := startAgent(t, simpleConfig(plane, backend))
		c, _, _ := rawUpgrade(t, a.Addr("ws").String(), "/ws/", nil)
		io.WriteString(c, "hello")
		time.Sleep(100 * time.Millisecond)
		c.SetLinger(0)
		c.Close()
		if err := <-result; !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("backend read ended with %v, want connection reset", err)
		}
	})
}

// TestBackendDownNextBackend: a dead backend is skipped (nginx
// proxy_next_upstream) and every client still connects.
func TestBackendDownNextBackend(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		dead := deadAddr(t)
		live := echoBackends(t, 1)
		a := startAgent(t, simpleConfig(plane, dead, live[0]))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for range 6 {
			c := dialWS(t, ctx, a.Addr("ws").String(), "/ws/", nil)
			c.Close(websocket.StatusNormalClosure, "")
		}
		if a.Proxy.Counters.ConnectFails.Load() == 0 {
			t.Fatal("no connect failure counted, yet one backend is dead")
		}
	})
}

// TestNonUpgrade: a plain request is forwarded with Connection: close and
// X-Forwarded-For; an upgrade-only route answers 426.
func TestNonUpgrade(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		backend := echoBackends(t, 1)[0]
		cfg := simpleConfig(plane, backend)
		cfg.Listeners[0].Routes = append([]config.Route{{Path: "/strict/", Pool: "p", UpgradeOnly: true}}, cfg.Listeners[0].Routes...)
		a := startAgent(t, cfg)
		addr := a.Addr("ws").String()
		status, body := rawRequest(t, addr, "GET /ws/plain HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n")
		if status != 200 || !strings.Contains(body, "xff=203.0.113.9, 127.0.0.1") {
			t.Fatalf("plain request: %d %q", status, body)
		}
		if status, _ := rawRequest(t, addr, "GET /strict/x HTTP/1.1\r\nHost: x\r\n\r\n"); status != 426 {
			t.Fatalf("upgrade-only route answered %d, want 426", status)
		}
	})
}

// TestRefusals: every refusal gets its HTTP status and a counter.
func TestRefusals(t *testing.T) {
	backend := echoBackends(t, 1)[0]
	cfg := simpleConfig("splice", backend)
	cfg.Listeners[0].HandshakeTimeout = config.Duration(500 * time.Millisecond)
	cfg.Listeners[0].Routes = append(cfg.Listeners[0].Routes,
		config.Route{Path: "/dead/", Pool: "dead"},
		config.Route{Path: "/origin/", Pool: "p", AllowedOrigins: []string{"https://good.example"}})
	cfg.Pools = append(cfg.Pools, config.Pool{Name: "dead", Backends: []config.Backend{{Address: deadAddr(t)}}, MaxTries: 1})
	a := startAgent(t, cfg)
	addr := a.Addr("ws").String()
	cases := []struct {
		name, req string
		status    int
		reason    string
	}{
		{"malformed", "GARBAGE\r\n\r\n", 400, ""},
		{"bare_lf", "GET /ws/ HTTP/1.1\nHost: x\n\n", 400, ""},
		{"too_large", "GET /ws/ HTTP/1.1\r\nHost: x\r\n" + strings.Repeat("X-Big: "+strings.Repeat("a", 5000)+"\r\n", 4) + "\r\n", 431, "head_too_large"},
		{"line_too_long", "GET /ws/ HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", 9<<10) + "\r\n\r\n", 431, "line_too_long"},
		{"too_many_headers", "GET /ws/ HTTP/1.1\r\nHost: x\r\n" + strings.Repeat("X-A: 1\r\n", 101) + "\r\n", 431, "too_many_headers"},
		{"no_route", "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no_route"},
		{"bad_version", strings.Replace(upgradeRequest("/ws/"), "Version: 13", "Version: 8", 1), 426, ""},
		{"origin", upgradeRequest("/origin/", "Origin: https://evil.example\r\n"), 403, "origin"},
		{"backend_down", upgradeRequest("/dead/"), 502, "backend_failed"},
		{"smuggling", "GET /ws/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := a.Proxy.Counters.Refusals()
			status, _ := rawRequest(t, addr, tc.req)
			if status != tc.status {
				t.Fatalf("status %d, want %d", status, tc.status)
			}
			after := a.Proxy.Counters.Refusals()
			if tc.reason != "" && after[tc.reason] != before[tc.reason]+1 {
				t.Fatalf("refusal counter %q went %d → %d", tc.reason, before[tc.reason], after[tc.reason])
			}
			if sum(after) != sum(before)+1 {
				t.Fatalf("refusals went %d → %d, want +1", sum(before), sum(after))
			}
		})
	}
	t.Run("head_timeout", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /ws/ HTTP/1.1\r\n") // and then nothing
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != 408 {
			t.Fatalf("slow head: %v %v, want 408", resp, err)
		}
	})
}

func sum(m map[string]uint64) (n uint64) {
	for _, v := range m {
		n += v
	}
	return n
}

// deadAddr returns a loopback address with nothing listening.
func deadAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestBackendDeclinesUpgrade: a backend that answers an upgrade with 403
// has its answer relayed, and the connection is closed rather than
// tunnelled (the client could otherwise send more requests past the
// agent's checks).
func TestBackendDeclinesUpgrade(t *testing.T) {
	backend := rawBackend(t, func(c net.Conn, br *bufio.Reader, head string) {
		io.WriteString(c, "HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\nnope\r\n")
		io.Copy(io.Discard, br) // keep-alive: the backend would read a next request
	})
	a := startAgent(t, simpleConfig("splice", backend))
	c, err := net.Dial("tcp", a.Addr("ws").String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, upgradeRequest("/ws/"))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	all, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading: %v", err)
	}
	if !strings.HasPrefix(string(all), "HTTP/1.1 403") || !strings.HasSuffix(string(all), "nope\r\n") {
		t.Fatalf("client got %q", all)
	}
	if a.Proxy.Counters.UpgradeDeclined.Load() != 1 || a.Proxy.Active() != 0 {
		t.Fatalf("declined=%d active=%d", a.Proxy.Counters.UpgradeDeclined.Load(), a.Proxy.Active())
	}
}
