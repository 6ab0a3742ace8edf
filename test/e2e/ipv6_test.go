package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/vishvananda/netlink"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/demo"
	"github.com/wsplice/wsplice/pkg/tlsterm/tlstest"
	"github.com/wsplice/wsplice/test/testutil"
	"golang.org/x/sys/unix"
)

// v6Echo starts a demo echo backend on [::1].
func v6Echo(t *testing.T, name string) string {
	t.Helper()
	e, err := demo.StartEchoAt(name, "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	t.Cleanup(e.Close)
	return e.Addr
}

// tcpEcho is a plain TCP echo server on addr.
func tcpEcho(t *testing.T, addr string) string {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
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
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

// httpGet sends a plain GET from local (nil: any) to addr and returns the
// status and body.
func httpGet(t *testing.T, local net.Addr, addr, path string) (int, string) {
	t.Helper()
	d := net.Dialer{LocalAddr: local, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s from %v: %v", addr, local, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: example.com\r\n\r\n", path)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("response: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestIPv6Echo: IPv6-only listeners and backends on [::1] in every
// listener mode and on both data planes; the backend sees the client's
// IPv6 address in X-Forwarded-For.
func TestIPv6Echo(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		t.Run("websocket", func(t *testing.T) {
			cfg := simpleConfig(plane, v6Echo(t, "v6"))
			cfg.Listeners[0].Address = "[::1]:0"
			a, _ := startAgentLog(t, cfg)
			addr := a.Addr("ws").String()
			c := dialWS(t, ctx, addr, "/ws/", nil)
			defer c.CloseNow()
			for size := 1; size <= 1<<20; size *= 32 {
				msg := pattern(size, 3)
				if err := c.Write(ctx, websocket.MessageBinary, msg); err != nil {
					t.Fatal(err)
				}
				if _, got, err := c.Read(ctx); err != nil || !bytes.Equal(got, msg) {
					t.Fatalf("%d bytes: %v", size, err)
				}
			}
			conns := a.Proxy.Conns()
			if len(conns) != 1 || !conns[0].Client.Addr().Is6() || conns[0].Client.Addr().Is4In6() {
				t.Fatalf("conns %+v", conns)
			}
			if st, _ := a.Proxy.Stats(conns[0]); string(st.Plane) != plane {
				t.Fatalf("plane %s, want %s", st.Plane, plane)
			}
			if code, body := httpGet(t, nil, addr, "/ws/plain"); code != 200 || !strings.Contains(body, "xff=::1\n") {
				t.Fatalf("plain request: %d %q", code, body)
			}
		})
		t.Run("tcp", func(t *testing.T) {
			be := tcpEcho(t, "[::1]:0")
			cfg := simpleConfig(plane, be)
			cfg.Listeners[0].Address, cfg.Listeners[0].Mode, cfg.Listeners[0].Routes = "[::1]:0", "tcp", nil
			a, _ := startAgentLog(t, cfg)
			c, err := net.Dial("tcp6", a.Addr("ws").String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			msg := pattern(300000, 9)
			go c.Write(msg)
			got := make([]byte, len(msg))
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("tcp echo: %v", err)
			}
			if st, _ := a.Proxy.Stats(a.Proxy.Conns()[0]); string(st.Plane) != plane {
				t.Fatalf("plane %s, want %s", st.Plane, plane)
			}
		})
		t.Run("tls_passthrough", func(t *testing.T) {
			ca := tlstest.NewCA(t, "v6")
			be := tlsEcho(t, "v6tls", ca.Issue("v6tls", "v6.example.com"), "[::1]:0")
			cfg := &config.Config{
				Dataplane: plane, Tune: config.Tune{Mode: "off"}, Admin: config.Admin{Socket: "none"},
				DrainTimeout: config.Duration(2 * time.Second),
				Pools:        []config.Pool{{Name: "p", Backends: []config.Backend{{Address: be}}}},
				Listeners: []config.Listener{{Name: "tls", Address: "[::1]:0", Mode: "tls_passthrough",
					SNI: &config.SNI{Routes: []config.SNIRoute{{ServerName: "*.example.com", Pool: "p"}}}}},
			}
			a, _ := startAgentLog(t, cfg)
			c, name := wssDial(t, ctx, a.Addr("tls").String(), "v6.example.com", "/", ca.ClientConfig("v6.example.com"))
			defer c.CloseNow()
			if name != "v6tls" {
				t.Fatalf("greeting from %s", name)
			}
			echoOnce(t, ctx, c, strings.Repeat("6", 70000))
			if st, _ := a.Proxy.Stats(a.Proxy.Conns()[0]); string(st.Plane) != plane {
				t.Fatalf("plane %s, want %s", st.Plane, plane)
			}
		})
		t.Run("tls_terminate", func(t *testing.T) {
			ca := tlstest.NewCA(t, "v6")
			cfg := tlsConfig(plane, ca.Issue("ws", "v6.example.com", "::1"), v6Echo(t, "v6"))
			cfg.Listeners[0].Address = "[::1]:0"
			a, _ := startAgentLog(t, cfg)
			c, _ := wssDial(t, ctx, a.Addr("ws").String(), "v6.example.com", "/ws/", ca.ClientConfig("v6.example.com"))
			defer c.CloseNow()
			echoOnce(t, ctx, c, "over ::1")
		})
	})
}

// TestIPv6ProxyV2: a PROXY v2 header for an IPv6 client is family
// AF_INET6 with both 16-byte addresses.
func TestIPv6ProxyV2(t *testing.T) {
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	defer ln.Close()
	hdr := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b := make([]byte, 16+36)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		io.ReadFull(c, b)
		hdr <- b
		io.Copy(c, c)
	}()
	cfg := simpleConfig("splice", ln.Addr().String())
	cfg.Listeners[0].Address, cfg.Listeners[0].Mode, cfg.Listeners[0].Routes = "[::1]:0", "tcp", nil
	cfg.Pools[0].Forward = "proxy_v2"
	a, _ := startAgentLog(t, cfg)
	c, err := net.Dial("tcp", a.Addr("ws").String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("x"))
	var b []byte
	select {
	case b = <-hdr:
	case <-time.After(10 * time.Second):
		t.Fatal("no PROXY header")
	}
	if !bytes.Equal(b[:12], []byte("\r\n\r\n\x00\r\nQUIT\n")) || b[12] != 0x21 || b[13] != 0x21 || binary.BigEndian.Uint16(b[14:]) != 36 {
		t.Fatalf("header %x", b)
	}
	src, _ := netip.AddrFromSlice(b[16:32])
	sport := binary.BigEndian.Uint16(b[48:])
	if want := netip.MustParseAddrPort(c.LocalAddr().String()); src != want.Addr() || sport != want.Port() {
		t.Fatalf("PROXY source %s:%d, want %s", src, sport, want)
	}
}

// inChildNetNS runs the calling test again in a child process that has its
// own network namespace (clone with CLONE_NEWNET), where the test may add
// addresses and listen on wildcard addresses without touching the host.
// In the parent it returns false after reporting the child's result; in
// the child it brings lo up and returns true.
func inChildNetNS(t *testing.T) bool {
	t.Helper()
	if os.Getenv("WSPLICE_E2E_NETNS") == t.Name() {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			t.Fatal(err)
		}
		return true
	}
	testutil.RequirePrivileged(t)
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1", "-test.timeout=5m")
	cmd.Env = append(os.Environ(), "WSPLICE_E2E_NETNS="+t.Name())
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	out, err := cmd.CombinedOutput()
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		t.Log(line)
	}
	if err != nil {
		t.Fatalf("in a child network namespace: %v", err)
	}
	return false
}

func addAddr(t *testing.T, cidr string) {
	t.Helper()
	lo, _ := netlink.LinkByName("lo")
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	a.Flags = unix.IFA_F_NODAD
	if err := netlink.AddrAdd(lo, a); err != nil {
		t.Fatalf("adding %s: %v", cidr, err)
	}
}

func tcpFrom(ip string) *net.TCPAddr { return &net.TCPAddr{IP: net.ParseIP(ip)} }

// TestIPv6Namespace runs in a network namespace of its own, with several
// IPv6 addresses on lo: a dual-stack listener serves IPv4 and IPv6 clients
// and reports each in its own family; per-IP limits group IPv6 clients by
// limits.ipv6_prefix (/64 by default); client_ip hash keys send one /64 to
// one backend.
func TestIPv6Namespace(t *testing.T) {
	if !inChildNetNS(t) {
		return
	}
	for _, a := range []string{"2001:db8:1::1/64", "2001:db8:1::2/64", "2001:db8:2::1/64"} {
		addAddr(t, a)
	}
	forEachPlane(t, func(t *testing.T, plane string) {
		t.Run("dual stack", func(t *testing.T) {
			cfg := simpleConfig(plane, echoBackends(t, 1)...)
			cfg.Listeners[0].Address = "[::]:0"
			a, _ := startAgentLog(t, cfg)
			port := a.Addr("ws").(*net.TCPAddr).Port
			for _, tc := range []struct{ dial, xff string }{
				{"127.0.0.1", "127.0.0.1"}, {"::1", "::1"}, {"2001:db8:2::1", "2001:db8:2::1"},
			} {
				code, body := httpGet(t, nil, net.JoinHostPort(tc.dial, fmt.Sprint(port)), "/ws/")
				if code != 200 || !strings.Contains(body, "xff="+tc.xff+"\n") {
					t.Fatalf("via %s: %d %q, want xff=%s", tc.dial, code, body, tc.xff)
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			for _, host := range []string{"127.0.0.1", "::1"} {
				c := dialWS(t, ctx, net.JoinHostPort(host, fmt.Sprint(port)), "/ws/", nil)
				echoOnce(t, ctx, c, "dual "+host)
				c.CloseNow()
			}
		})
		t.Run("per-ip prefix", func(t *testing.T) {
			cfg := simpleConfig(plane, echoBackends(t, 1)...)
			cfg.Listeners[0].Address = "[::]:0"
			cfg.Limits.PerIPConns = 1
			a, _ := startAgentLog(t, cfg)
			port := a.Addr("ws").(*net.TCPAddr).Port
			addr := net.JoinHostPort("2001:db8:2::1", fmt.Sprint(port))
			hold := func(from string) *websocket.Conn {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				d := &net.Dialer{LocalAddr: tcpFrom(from)}
				c, _, err := websocket.Dial(ctx, "ws://"+addr+"/ws/", &websocket.DialOptions{HTTPClient: &http.Client{Transport: &http.Transport{DialContext: d.DialContext}}})
				if err != nil {
					return nil
				}
				c.Read(ctx) // greeting
				return c
			}
			first := hold("2001:db8:1::1")
			if first == nil {
				t.Fatal("first client refused")
			}
			defer first.CloseNow()
			if code, _ := httpGet(t, tcpFrom("2001:db8:1::2"), addr, "/ws/"); code != 429 {
				t.Fatalf("second address of the same /64: %d, want 429", code)
			}
			if code, _ := httpGet(t, tcpFrom("2001:db8:2::1"), addr, "/ws/"); code != 200 {
				t.Fatalf("another /64: %d, want 200", code)
			}
			// Per address instead of per /64.
			cfg.Limits.IPv6Prefix = 128
			if err := a.Proxy.Reload(cfg); err != nil {
				t.Fatal(err)
			}
			if code, _ := httpGet(t, tcpFrom("2001:db8:1::2"), addr, "/ws/"); code != 200 {
				t.Fatalf("ipv6_prefix 128, another address: %d, want 200", code)
			}
		})
		t.Run("hash keys", func(t *testing.T) {
			cfg := simpleConfig(plane, echoBackends(t, 4)...)
			cfg.Listeners[0].Address = "[::]:0"
			cfg.Pools[0].Balance = "maglev"
			a, _ := startAgentLog(t, cfg)
			addr := net.JoinHostPort("::1", fmt.Sprint(a.Addr("ws").(*net.TCPAddr).Port))
			backendOf := func(from string) string {
				_, body := httpGet(t, tcpFrom(from), addr, "/ws/")
				name, _, _ := strings.Cut(body, ":")
				return name
			}
			sources := []string{"2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::1", "::1"}
			for _, key := range []string{"client_ip", "client_ip/24", "client_ip/48"} {
				// A fresh copy: the running agent reads the config it was given.
				next := *cfg
				next.Pools = append([]config.Pool(nil), cfg.Pools...)
				next.Pools[0].HashKey = key
				if err := a.Proxy.Reload(&next); err != nil {
					t.Fatal(err)
				}
				got := map[string]string{}
				for _, src := range sources {
					got[src] = backendOf(src)
					for range 3 {
						if b := backendOf(src); b != got[src] {
							t.Fatalf("%s from %s: %s then %s", key, src, got[src], b)
						}
					}
				}
				// A /64 (client_ip/24 → IPv6 /64) or a /48 is one key.
				if key != "client_ip" && got["2001:db8:1::1"] != got["2001:db8:1::2"] {
					t.Fatalf("%s: one prefix on two backends: %v", key, got)
				}
				t.Logf("%s: %v", key, got)
			}
		})
	})
}
