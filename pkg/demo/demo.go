// Package demo is `wsplice demo`: it starts WebSocket echo backends, an
// agent on the built-in configuration, and real WebSocket clients, then
// shows where each connection went and what moved. It is the quick start's
// first command, so it needs nothing but the binary (and root for the
// kernel path; without it the agent says why and uses splice).
package demo

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/coder/websocket"
	"github.com/wsplice/wsplice/pkg/agent"
	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/proxy"
)

// Options size the demo.
type Options struct {
	Backends   int
	Clients    int
	TLSClients int    // of which connect with wss:// to the TLS listener
	Messages   int    // per client, each way
	Dataplane  string // auto, sockmap or splice
	Out        io.Writer
	Log        *slog.Logger
}

// EchoServer is a WebSocket echo backend that greets each client with its
// name, so a client can tell where it landed.
type EchoServer struct {
	Name string
	Addr string
	srv  *http.Server
}

// StartEcho starts an echo backend on a loopback port.
func StartEcho(name string) (*EchoServer, error) { return StartEchoAt(name, "127.0.0.1:0") }

// StartEchoAt starts an echo backend on addr.
func StartEchoAt(name, addr string) (*EchoServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	e := &EchoServer{Name: name, Addr: ln.Addr().String()}
	e.srv = &http.Server{Handler: http.HandlerFunc(e.serve), ReadHeaderTimeout: 5 * time.Second}
	go e.srv.Serve(ln)
	return e, nil
}

func (e *EchoServer) serve(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Upgrade") == "" {
		fmt.Fprintf(w, "%s: xff=%s\n", e.Name, r.Header.Get("X-Forwarded-For"))
		return
	}
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		return
	}
	defer c.CloseNow()
	c.SetReadLimit(64 << 20)
	ctx := r.Context()
	if err := c.Write(ctx, websocket.MessageText, []byte("hello from "+e.Name)); err != nil {
		return
	}
	for {
		typ, msg, err := c.Read(ctx)
		if err != nil {
			return
		}
		if err := c.Write(ctx, typ, msg); err != nil {
			return
		}
	}
}

// Close stops the backend.
func (e *EchoServer) Close() { e.srv.Close() }

// Config is the demo's built-in configuration: a websocket listener on a
// loopback port, a route for /chat/ with Maglev on the X-User-Id header,
// and, when certFile is set, a wss:// listener terminating TLS in front of
// the same pool.
func Config(backends []string, dataplane, certFile, keyFile string) *config.Config {
	cfg := &config.Config{
		Dataplane: dataplane,
		Tune:      config.Tune{Mode: "off"}, // the demo reports traffic, not host settings
		Admin:     config.Admin{Socket: "none"},
		Limits:    config.Limits{MaxConns: 1000}, // within any open-file limit: no capping warning
		Listeners: []config.Listener{{Name: "ws", Address: "127.0.0.1:0", Routes: []config.Route{{Path: "/chat/", Pool: "chat"}}}},
		Pools:     []config.Pool{{Name: "chat", Balance: "maglev", HashKey: "header:X-User-Id"}},
	}
	for _, b := range backends {
		cfg.Pools[0].Backends = append(cfg.Pools[0].Backends, config.Backend{Address: b})
	}
	if certFile != "" {
		// 127.0.0.2: listeners are keyed by address, so two ":0" on one IP would clash.
		cfg.Listeners = append(cfg.Listeners, config.Listener{Name: "wss", Address: "127.0.0.2:0",
			Routes: []config.Route{{Path: "/chat/", Pool: "chat"}},
			TLS:    &config.TLS{Certificates: []config.Certificate{{Cert: certFile, Key: keyFile}}}})
	}
	cfg.SetDefaults()
	return cfg
}

type clientResult struct {
	user    string
	scheme  string
	backend string
	conns   []*proxy.Conn
	sent    int
	ok      bool
	err     error
}

// Run runs the demo and writes its report to o.Out.
func Run(ctx context.Context, o Options) error {
	out := o.Out
	var names, addrs []string
	for i := range o.Backends {
		e, err := StartEcho(fmt.Sprintf("echo-%d", i+1))
		if err != nil {
			return err
		}
		defer e.Close()
		names = append(names, e.Name)
		addrs = append(addrs, e.Addr)
	}
	byAddr := map[string]string{}
	for i := range addrs {
		byAddr[addrs[i]] = names[i]
	}
	dir, err := os.MkdirTemp("", "wsplice-demo")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	certFile, keyFile, tlsClient, err := selfSigned(dir)
	if err != nil {
		return err
	}
	cfg := Config(addrs, o.Dataplane, certFile, keyFile)
	if err := cfg.Validate(); err != nil {
		return err
	}
	ready := make(chan *agent.Agent, 1)
	actx, stop := context.WithCancel(ctx)
	defer stop()
	errc := make(chan error, 1)
	go func() {
		errc <- agent.Run(actx, agent.Options{Config: cfg, Logger: o.Log, Ready: func(a *agent.Agent) { ready <- a }})
	}()
	var a *agent.Agent
	select {
	case a = <-ready:
	case err := <-errc:
		return err
	}
	addr := a.Addr("ws").String()
	plane := "splice"
	if a.Sockmap != nil {
		plane = "sockmap (in-kernel forwarding)"
	}
	wssAddr := a.Addr("wss").String()
	fmt.Fprintf(out, "wsplice demo: %d echo backends; agent on ws://%s/chat/ (data plane %s)\n", o.Backends, addr, plane)
	fmt.Fprintf(out, "and on wss://%s/chat/ (TLS terminated, self-signed certificate; userspace copy plane)\n", wssAddr)
	fmt.Fprintf(out, "pool chat: maglev consistent hash on the X-User-Id header\n\n")
	wss := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsClient}}

	// Each user connects twice: consistent hashing sends both to the same backend.
	results := make([]clientResult, o.Clients)
	var wg sync.WaitGroup
	hold := make(chan struct{})
	var connected sync.WaitGroup
	for i := range o.Clients {
		wg.Add(1)
		connected.Add(1)
		go func(i int) {
			defer wg.Done()
			user := fmt.Sprintf("user-%02d", i+1)
			url, hc := "ws://"+addr+"/chat/", (*http.Client)(nil)
			if i >= o.Clients-o.TLSClients {
				url, hc = "wss://"+wssAddr+"/chat/", wss // SNI "localhost" from the TLS config
			}
			results[i] = runClient(ctx, url, hc, user, o.Messages, &connected, hold)
		}(i)
	}
	connected.Wait()
	// While every client is connected, show the agent's connection table.
	time.Sleep(50 * time.Millisecond)
	conns := a.Proxy.Conns()
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CONN\tCLIENT\tROUTE\tBACKEND\tPLANE\tBYTES IN\tBYTES OUT")
	for _, c := range conns {
		st, _ := a.Proxy.Stats(c)
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s (%s)\t%s\t%d\t%d\n", c.ID, c.Client, c.Route, c.Backend, byAddr[c.Backend], st.Plane,
			st.ClientToBackend.Bytes, st.BackendToClient.Bytes)
	}
	tw.Flush()
	close(hold)
	wg.Wait()

	fmt.Fprintln(out)
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "USER\tURL\tBACKEND (1st, 2nd connection)\tMESSAGES ECHOED\tRESULT")
	perBackend := map[string]int{}
	failed := 0
	for _, r := range results {
		res := "ok: every byte came back"
		if !r.ok {
			res = "FAILED: " + fmt.Sprint(r.err)
			failed++
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", r.user, r.scheme, r.backend, r.sent, res)
		for _, b := range strings.Split(r.backend, ", ") {
			perBackend[b]++
		}
	}
	tw.Flush()
	fmt.Fprintln(out)
	var keys []string
	for k := range perBackend {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(out, "%-8s %d connections\n", k, perBackend[k])
	}
	if a.Sockmap != nil {
		c := a.Sockmap.Counters()
		fmt.Fprintf(out, "\nkernel path: %d connections joined the sockmap; demoted to splice: %d (parked bytes %d, rate %d); integrity resets: %d; redirect failures: %d\n",
			c.Started, c.DemotedParked+c.DemotedRate+c.DemotedInsert, c.DemotedParked, c.DemotedRate, c.IntegrityResets, c.RedirectFailures)
	}
	stop()
	if err := <-errc; err != nil {
		return err
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d clients failed", failed, len(results))
	}
	fmt.Fprintln(out, "\ndemo ok")
	return nil
}

// runClient connects twice as user, echoes messages of growing size, text
// and binary, and checks each one came back intact.
func runClient(ctx context.Context, url string, hc *http.Client, user string, msgs int, connected *sync.WaitGroup, hold chan struct{}) clientResult {
	r := clientResult{user: user, scheme: strings.SplitN(url, ":", 2)[0]}
	var landed []string
	defer func() {
		if connected != nil {
			connected.Done()
		}
	}()
	for round := 0; round < 2; round++ {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		c, _, err := websocket.Dial(cctx, url, &websocket.DialOptions{HTTPClient: hc, HTTPHeader: http.Header{"X-User-Id": {user}}})
		if err != nil {
			cancel()
			r.err = err
			return r
		}
		c.SetReadLimit(64 << 20)
		_, hello, err := c.Read(cctx)
		if err != nil {
			cancel()
			r.err = err
			return r
		}
		landed = append(landed, strings.TrimPrefix(string(hello), "hello from "))
		for i := range msgs {
			typ := websocket.MessageText
			size := 1 << (i % 17) // 1 B … 64 KiB
			if i%2 == 1 {
				typ = websocket.MessageBinary
			}
			msg := make([]byte, size)
			for j := range msg {
				msg[j] = byte('a' + (i+j)%26)
			}
			if err := c.Write(cctx, typ, msg); err != nil {
				r.err = err
				cancel()
				return r
			}
			gotTyp, got, err := c.Read(cctx)
			if err != nil || gotTyp != typ || sha256.Sum256(got) != sha256.Sum256(msg) {
				r.err = fmt.Errorf("message %d (%d bytes) did not come back intact: %v", i, size, err)
				cancel()
				return r
			}
			r.sent++
		}
		if round == 0 && connected != nil {
			connected.Done()
			connected = nil
			<-hold
		}
		c.Close(websocket.StatusNormalClosure, "bye")
		cancel()
	}
	r.backend = strings.Join(landed, ", ")
	r.ok = len(landed) == 2 && landed[0] == landed[1]
	if !r.ok && r.err == nil {
		r.err = fmt.Errorf("the same user landed on two backends: %s", r.backend)
	}
	return r
}
