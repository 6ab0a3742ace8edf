package e2e

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/wsplice/wsplice/pkg/admin"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/proxy"
	"github.com/wsplice/wsplice/pkg/tlsterm/tlstest"
)

// TestUpgradeLeavesTLS: TLS-terminated connections cannot move to a new
// process (their session state is in the old one), so an upgrade leaves
// them behind. A strict upgrade is refused while any is open and changes
// nothing; a normal one moves the plain connections and the listeners,
// and the old process — it holds their sockets, the test checks — serves
// the TLS ones on and exits as soon as the last closes, not at
// drain_timeout. New TLS clients reach the new agent.
func TestUpgradeLeavesTLS(t *testing.T) {
	if testing.Short() {
		t.Skip("child agents")
	}
	forEachPlane(t, testUpgradeLeavesTLS)
}

func testUpgradeLeavesTLS(t *testing.T, plane string) {
	const (
		plain = 20               // plain connections (the message fleet): they move
		drain = 60 * time.Second // far above how long the old agent may take to exit
	)
	ca := tlstest.NewCA(t, "e2e")
	leaf := ca.Issue("wss", "ws.example.com")
	b := startMsgBackend(t)
	echo := echoBackends(t, 1)[0]
	metrics := freePort(t)
	cfg := upgradeConfig(b.ln.Addr().String(), metrics, plane)
	cfg.DrainTimeout = config.Duration(drain)
	cfg.Pools = append(cfg.Pools, config.Pool{Name: "e", ConnectTimeout: config.Duration(time.Second),
		Backends: []config.Backend{{Address: echo}}})
	// A second loopback address: listeners are matched by their configured
	// address across an upgrade, so the two must differ.
	cfg.Listeners = append(cfg.Listeners, config.Listener{Name: "wss", Address: "127.0.0.2:0",
		Routes: []config.Route{{Path: "/ws/", Pool: "e"}},
		TLS:    &config.TLS{Certificates: []config.Certificate{{Cert: leaf.CertFile, Key: leaf.KeyFile}}}})
	a := startChildAgent(t, cfg)
	pid := a.first.Process.Pid
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := a.admin.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wss := stayListener(t, st, "wss")
	echoAddr := netip.MustParseAddrPort(echo)
	msgAddr := netip.MustParseAddrPort(b.ln.Addr().String())

	f := startFleet(t, a.addr, b, plain)
	f.progress(f.echoes(), 20*time.Second)
	tls1 := dialStayWSS(t, ctx, wss, ca.ClientConfig("ws.example.com"))
	tls2 := dialStayWSS(t, ctx, wss, ca.ClientConfig("ws.example.com"))
	tls1.echo(t, ctx, "tls1 before")
	tls2.echo(t, ctx, "tls2 before")
	stayActive(t, ctx, a, plain+2)
	if st, err := a.admin.Status(ctx); err != nil || st.Connections.TLS != 2 || st.Connections.Splice+st.Connections.Sockmap != plain {
		t.Fatalf("status counts %+v (%v): want 2 TLS-terminated and %d on the %s plane", st.Connections, err, plain, plane)
	}
	t.Logf("agent pid %d: %d plain connections on %s (%s), 2 TLS-terminated on %s", pid, plain, a.addr, plane, wss)

	// 1. Strict: refused while TLS connections are open, nothing changes.
	before := f.echoes()
	_, err = stayUpgrade(ctx, a, admin.UpgradeRequest{Binary: "", Strict: true})
	var ae *admin.APIError
	if !errors.As(err, &ae) || ae.Status/100 != 4 || !errors.Is(err, admin.ErrInvalid) {
		t.Fatalf("strict upgrade with TLS connections open: %v (%T), want a 400 refusal", err, err)
	}
	for _, want := range []string{proxy.ErrCannotHandOff.Error(), "2 on the copy data plane"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("strict upgrade refused with %q: it does not say %q", err, want)
		}
	}
	t.Logf("strict upgrade refused (HTTP %d): %v", ae.Status, err)
	if got := a.pid(); got != pid {
		t.Fatalf("after the refused upgrade pid %d answers, want %d", got, pid)
	}
	select {
	case l := <-a.lines:
		t.Fatalf("a refused upgrade started a new agent: it printed %q", l)
	default:
	}
	stayActive(t, ctx, a, plain+2)
	f.progress(before, 20*time.Second)
	tls1.echo(t, ctx, "tls1 after the refusal")
	tls2.echo(t, ctx, "tls2 after the refusal")

	// 2. A normal upgrade: the plain connections move, the TLS ones stay.
	before = f.echoes()
	res, err := stayUpgrade(ctx, a, admin.UpgradeRequest{})
	if err != nil {
		t.Fatalf("upgrade: %v\n%s", err, a.logs())
	}
	newPID := res.NewPID
	t.Logf("upgrade: %+v", res)
	if res.OldPID != pid || newPID == pid || newPID == 0 || res.Listeners != 2 || res.Connections != plain || res.Rejected != 0 || res.Stayed != 2 {
		t.Fatalf("upgrade result %+v, want pid %d → another, 2 listeners, %d connections handed over, none rejected, 2 stayed", res, pid, plain)
	}
	a.waitPID(newPID)
	select {
	case l := <-a.lines:
		if l != "LISTEN "+a.addr {
			t.Fatalf("the new agent printed %q, want it on %s", l, a.addr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the new agent printed no LISTEN line")
	}
	if gone(pid) {
		t.Fatalf("the old agent (pid %d) exited with 2 TLS connections open\n%s", pid, a.logs())
	}
	st, err = a.admin.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := stayListener(t, st, "wss"); got != wss {
		t.Fatalf("the new agent's wss listener is on %s, the old one's was on %s", got, wss)
	}
	stayActive(t, ctx, a, plain)

	// 3. Everything still works, each through the process that holds it:
	// the plain connections through the new agent, the TLS ones through
	// the old, and a new TLS client through the new.
	f.progress(before, 20*time.Second)
	tls1.echo(t, ctx, "tls1 after the upgrade")
	tls2.echo(t, ctx, "tls2 after the upgrade")
	var plainSocks []string
	for _, c := range f.clients {
		plainSocks = append(plainSocks, agentSide(t, c.c))
	}
	tlsSocks := []string{agentSide(t, tls1.tcp), agentSide(t, tls2.tcp)}
	stayHeld(t, "the plain connections' client sockets", plainSocks, pid, newPID, 0, plain)
	stayHeld(t, "the plain connections' backend sockets", towards(t, msgAddr), pid, newPID, 0, plain)
	stayHeld(t, "the TLS connections' client sockets", tlsSocks, pid, newPID, 2, 0)
	stayHeld(t, "the TLS connections' backend sockets", towards(t, echoAddr), pid, newPID, 2, 0)
	t.Logf("the new agent (pid %d) holds the %d plain connections, the old one (pid %d) the 2 TLS ones", newPID, plain, pid)

	tls3 := dialStayWSS(t, ctx, wss, ca.ClientConfig("ws.example.com"))
	tls3.echo(t, ctx, "tls3, a new connection")
	stayHeld(t, "the new TLS connection's client socket", []string{agentSide(t, tls3.tcp)}, pid, newPID, 0, 1)
	stayHeld(t, "the TLS connections' backend sockets", towards(t, echoAddr), pid, newPID, 2, 1)
	stayActive(t, ctx, a, plain+1)
	for i := range 3 {
		tls1.echo(t, ctx, fmt.Sprintf("tls1 %d", i))
		tls2.echo(t, ctx, fmt.Sprintf("tls2 %d", i))
		tls3.echo(t, ctx, fmt.Sprintf("tls3 %d", i))
	}

	// 4. The old agent serves until its last TLS connection closes, then
	// exits at once rather than at drain_timeout.
	tls1.close(t)
	stayHeld(t, "the closed TLS connection's client socket", tlsSocks[:1], pid, newPID, 0, 0)
	stayHeld(t, "the open TLS connection's client socket", tlsSocks[1:], pid, newPID, 1, 0)
	time.Sleep(500 * time.Millisecond)
	if gone(pid) {
		t.Fatalf("the old agent (pid %d) exited with a TLS connection still open\n%s", pid, a.logs())
	}
	tls2.echo(t, ctx, "tls2, the last on the old agent")
	t0 := time.Now()
	tls2.close(t)
	if !waitGone(pid, 10*time.Second) {
		t.Fatalf("the old agent (pid %d) is still running 10s after its last connection closed (drain_timeout %v)\n%s", pid, drain, a.logs())
	}
	t.Logf("the old agent (pid %d) exited %v after its last TLS connection closed (drain_timeout %v)", pid, time.Since(t0).Round(time.Millisecond), drain)
	if got := a.pid(); got != newPID {
		t.Fatalf("after the old agent exited pid %d answers, want %d", got, newPID)
	}
	if err := healthz(metrics); err != nil {
		t.Fatalf("metrics address of the new agent: %v", err)
	}
	f.progress(f.echoes(), 20*time.Second)
	tls3.echo(t, ctx, "tls3 after the old agent exited")

	// With no TLS connection open a strict upgrade goes through.
	tls3.close(t)
	stayActive(t, ctx, a, plain)
	before = f.echoes()
	res, err = stayUpgrade(ctx, a, admin.UpgradeRequest{Strict: true})
	if err != nil {
		t.Fatalf("strict upgrade without TLS connections: %v\n%s", err, a.logs())
	}
	if res.OldPID != newPID || res.NewPID == newPID || res.Listeners != 2 || res.Connections != plain || res.Stayed != 0 || res.Rejected != 0 {
		t.Fatalf("strict upgrade result %+v, want pid %d → another, 2 listeners, %d connections, none stayed", res, newPID, plain)
	}
	a.waitPID(res.NewPID)
	if !waitGone(newPID, 10*time.Second) {
		t.Fatalf("the agent upgraded with nothing left to serve (pid %d) is still running\n%s", newPID, a.logs())
	}
	select {
	case l := <-a.lines:
		if l != "LISTEN "+a.addr {
			t.Fatalf("the third agent printed %q, want it on %s", l, a.addr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the third agent printed no LISTEN line")
	}
	t.Logf("strict upgrade without TLS connections: pid %d → %d, %d connections handed over", newPID, res.NewPID, res.Connections)
	f.progress(before, 20*time.Second)
	t.Logf("%d messages each way on the plain connections, every one checked at the backend and back", f.finish())
	if lf, err := os.ReadFile(a.stderr.Name()); err == nil {
		for _, l := range strings.Split(string(lf), "\n") {
			if strings.Contains(l, "cannot move stay") || strings.Contains(l, "stopped: handed over") {
				t.Log(l)
			}
		}
	}
}

// stayUpgrade asks for an upgrade, waiting at most 15s (one takes well
// under a second here).
func stayUpgrade(ctx context.Context, a *childAgent, req admin.UpgradeRequest) (admin.UpgradeResult, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	return a.admin.UpgradeWith(ctx, req)
}

// stayListener returns the bound address of the listener called name.
func stayListener(t *testing.T, st admin.Status, name string) string {
	t.Helper()
	for _, l := range st.Listeners {
		if l.Name == name {
			return l.Address
		}
	}
	t.Fatalf("no listener %q in the status: %+v", name, st.Listeners)
	return ""
}

// stayActive waits until the agent on the admin socket counts n
// established connections.
func stayActive(t *testing.T, ctx context.Context, a *childAgent, n int) {
	t.Helper()
	var st admin.Status
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		st, err = a.admin.Status(ctx)
		if err == nil && st.Connections.Active == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent (pid %d) counts %+v connections (%v), want %d", st.PID, st.Connections, err, n)
		}
	}
}

// stayWSS is a wss:// WebSocket through the agent and its TCP connection.
type stayWSS struct {
	ws  *websocket.Conn
	tcp net.Conn
}

func dialStayWSS(t *testing.T, ctx context.Context, addr string, tcfg *tls.Config) *stayWSS {
	t.Helper()
	var tcp net.Conn
	tr := &http.Transport{
		TLSClientConfig: tcfg,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			tcp = c
			return c, err
		},
	}
	c, _, err := websocket.Dial(ctx, "wss://ws.example.com/ws/echo", &websocket.DialOptions{HTTPClient: &http.Client{Transport: tr}})
	if err != nil {
		t.Fatalf("wss dial via %s: %v", addr, err)
	}
	t.Cleanup(func() { c.CloseNow() })
	if _, hello, err := c.Read(ctx); err != nil || string(hello) != "hello from echo-1" {
		t.Fatalf("greeting %q: %v", hello, err)
	}
	return &stayWSS{ws: c, tcp: tcp}
}

func (w *stayWSS) echo(t *testing.T, ctx context.Context, msg string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	echoOnce(t, ctx, w.ws, msg)
}

// close ends the WebSocket with a close handshake, then the TCP
// connection.
func (w *stayWSS) close(t *testing.T) {
	t.Helper()
	if err := w.ws.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Fatalf("closing a TLS WebSocket: %v", err)
	}
	w.tcp.Close()
}

// stayTCP is an established TCP socket of this network namespace.
type stayTCP struct {
	local, remote netip.AddrPort
	inode         string
}

// establishedTCP lists the established IPv4 TCP sockets (/proc/net/tcp).
func establishedTCP(t *testing.T) []stayTCP {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	var out []stayTCP
	for _, l := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(l)
		if len(f) < 10 || f[3] != "01" { // TCP_ESTABLISHED
			continue
		}
		local, err1 := procTCPAddr(f[1])
		remote, err2 := procTCPAddr(f[2])
		if err1 != nil || err2 != nil {
			t.Fatalf("/proc/net/tcp line %q: %v %v", l, err1, err2)
		}
		out = append(out, stayTCP{local, remote, f[9]})
	}
	return out
}

// procTCPAddr parses an address of /proc/net/tcp: the IPv4 address as a
// host-order hex word, a colon, the port in hex.
func procTCPAddr(s string) (netip.AddrPort, error) {
	h, p, _ := strings.Cut(s, ":")
	ip, err := strconv.ParseUint(h, 16, 32)
	if err != nil {
		return netip.AddrPort{}, err
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, err
	}
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], uint32(ip))
	return netip.AddrPortFrom(netip.AddrFrom4(a), uint16(port)), nil
}

func addrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// agentSide returns the inode of the agent's socket of the connection
// whose client end is c.
func agentSide(t *testing.T, c net.Conn) string {
	t.Helper()
	local, remote := addrPort(c.RemoteAddr()), addrPort(c.LocalAddr())
	for _, s := range establishedTCP(t) {
		if s.local == local && s.remote == remote {
			return s.inode
		}
	}
	t.Fatalf("no established socket %s → %s in /proc/net/tcp", local, remote)
	return ""
}

// towards returns the inodes of the sockets connected to backend (the
// agents' ends of their backend connections).
func towards(t *testing.T, backend netip.AddrPort) []string {
	t.Helper()
	var out []string
	for _, s := range establishedTCP(t) {
		if s.remote == backend {
			out = append(out, s.inode)
		}
	}
	return out
}

// pidSockets returns the inodes of the sockets pid has descriptors on.
func pidSockets(t *testing.T, pid int) map[string]bool {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("descriptors of %d: %v", pid, err)
	}
	out := map[string]bool{}
	for _, e := range es {
		l, err := os.Readlink(filepath.Join(dir, e.Name()))
		if ino, ok := strings.CutPrefix(l, "socket:["); err == nil && ok {
			out[strings.TrimSuffix(ino, "]")] = true
		}
	}
	return out
}

// stayHeld waits until, of the sockets socks, the old agent holds
// wantOld and the new one wantNew, and none is in both.
func stayHeld(t *testing.T, what string, socks []string, oldPID, newPID, wantOld, wantNew int) {
	t.Helper()
	var inOld, inNew, both int
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		o, n := pidSockets(t, oldPID), pidSockets(t, newPID)
		inOld, inNew, both = 0, 0, 0
		for _, s := range socks {
			switch {
			case o[s] && n[s]:
				both++
			case o[s]:
				inOld++
			case n[s]:
				inNew++
			}
		}
		if inOld == wantOld && inNew == wantNew && both == 0 {
			return
		}
		if time.Now().After(deadline) {
			break
		}
	}
	t.Fatalf("%s: the old agent (pid %d) holds %d, the new one (pid %d) %d, both %d; want %d and %d",
		what, oldPID, inOld, newPID, inNew, both, wantOld, wantNew)
}
