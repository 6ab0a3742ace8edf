package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/wsplice/wsplice/pkg/agent"
	"github.com/wsplice/wsplice/pkg/proxy"
)

// These tests drive the old agent's side of a binary upgrade in process,
// through the proxy's hand-off API, the way pkg/agent's source does it
// (BeginHandoff, ListenerFiles, PauseAccepting, Detach/Handed batch after
// batch, ResumeHandoff), with the test playing the new agent: it rejects
// connections instead of adopting them. Nothing is ever Handed as
// adopted (that would let go of connections nobody serves); what was
// detached and not rejected goes back with ResumeHandoff, as after a
// failed upgrade.

const (
	rjConns = 10 // WebSocket connections per test
	rjBatch = 4  // connections per Detach
	rjCalls = 20 // Detach calls one hand-off may take before the test gives up
)

// rjClient is a WebSocket client with its own address, which the
// agent's connection records name (Conn.Client, the record's "client").
type rjClient struct {
	ws    *websocket.Conn
	local netip.AddrPort
}

// dialRecorded is dialWS that also notes the client's local address.
func dialRecorded(ctx context.Context, addr string) (*rjClient, error) {
	var local netip.AddrPort
	tr := &http.Transport{DialContext: func(ctx context.Context, network, a string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, a)
		if err == nil {
			local = c.LocalAddr().(*net.TCPAddr).AddrPort()
		}
		return c, err
	}}
	ws, _, err := websocket.Dial(ctx, "ws://"+addr+"/ws/echo", &websocket.DialOptions{HTTPClient: &http.Client{Transport: tr}})
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	if _, hello, err := ws.Read(ctx); err != nil || !strings.HasPrefix(string(hello), "hello from ") {
		ws.CloseNow()
		return nil, fmt.Errorf("greeting: %q %v", hello, err)
	}
	return &rjClient{ws: ws, local: local}, nil
}

func (c *rjClient) echo(ctx context.Context, msg string) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := c.ws.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	typ, got, err := c.ws.Read(ctx)
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if typ != websocket.MessageText || string(got) != msg {
		return fmt.Errorf("sent %q, came back %v %q", msg, typ, got)
	}
	return nil
}

// rjRecord is what the tests read of a hand-off record.
type rjRecord struct {
	ID     uint64         `json:"id"`
	Client netip.AddrPort `json:"client"`
	Plane  string         `json:"plane"`
}

func rjParse(t *testing.T, h *proxy.Handed) rjRecord {
	t.Helper()
	var r rjRecord
	if err := json.Unmarshal(h.Record, &r); err != nil || r.ID == 0 {
		t.Fatalf("hand-off record %s: id %d, %v", h.Record, r.ID, err)
	}
	if h.Client == nil || h.Backend == nil {
		t.Fatalf("connection %d handed without its sockets (client %v, backend %v)", r.ID, h.Client, h.Backend)
	}
	return r
}

// rjClosed checks that the hand-off API closed a file it took over.
func rjClosed(t *testing.T, what string, f *os.File) {
	t.Helper()
	if err := f.Close(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("%s: the hand-off left its file open (close: %v)", what, err)
	}
}

// rjHarness is an agent with rjConns echoing WebSocket clients.
type rjHarness struct {
	t       *testing.T
	ctx     context.Context
	a       *agent.Agent
	plane   string
	addr    string
	clients []*rjClient
	byAddr  map[netip.AddrPort]*rjClient
	ids     map[uint64]*rjClient // agent's connection id → client
	rounds  int
}

func startRejectHarness(t *testing.T, plane string) *rjHarness {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	t.Cleanup(cancel)
	a := startAgent(t, simpleConfig(plane, echoBackends(t, 2)...))
	h := &rjHarness{t: t, ctx: ctx, a: a, plane: plane, addr: a.Addr("ws").String(),
		byAddr: map[netip.AddrPort]*rjClient{}, ids: map[uint64]*rjClient{}}
	for range rjConns {
		h.dial()
	}
	waitFor(t, "every connection in the table", func() bool { return a.Proxy.Active() == rjConns })
	h.learnIDs()
	if len(h.ids) != rjConns {
		t.Fatalf("the agent's table names %d of the %d clients", len(h.ids), rjConns)
	}
	// The table lists a connection a moment before its plane does (the
	// sockmap plane registers it once its sockets are in the maps).
	waitFor(t, "every connection on its data plane", func() bool {
		for _, c := range a.Proxy.Conns() {
			if _, ok := a.Proxy.Stats(c); !ok {
				return false
			}
		}
		return true
	})
	for _, c := range a.Proxy.Conns() {
		if st, _ := a.Proxy.Stats(c); string(st.Plane) != plane {
			t.Fatalf("connection %d on the %q plane, want %s", c.ID, st.Plane, plane)
		}
	}
	h.echoAll("before the hand-off")
	return h
}

func (h *rjHarness) dial() *rjClient {
	h.t.Helper()
	c, err := dialRecorded(h.ctx, h.addr)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { c.ws.CloseNow() })
	h.add(c)
	return c
}

func (h *rjHarness) add(c *rjClient) {
	h.clients = append(h.clients, c)
	h.byAddr[c.local] = c
}

// learnIDs maps the agent's connection ids to the clients.
func (h *rjHarness) learnIDs() {
	for _, c := range h.a.Proxy.Conns() {
		if cl := h.byAddr[c.Client]; cl != nil {
			h.ids[c.ID] = cl
		}
	}
}

// echoAll checks that every client's messages come back.
func (h *rjHarness) echoAll(when string) {
	h.t.Helper()
	h.rounds++
	for i, c := range h.clients {
		if err := c.echo(h.ctx, fmt.Sprintf("client %d round %d", i, h.rounds)); err != nil {
			h.t.Errorf("%s: client %d (%v): %v", when, i, c.local, err)
		}
	}
}

// echoIDs checks the clients of the given connection ids.
func (h *rjHarness) echoIDs(when string, ids []uint64) {
	h.t.Helper()
	h.rounds++
	for _, id := range ids {
		c := h.ids[id]
		if c == nil {
			h.t.Errorf("%s: connection %d is none of the test's clients", when, id)
			continue
		}
		if err := c.echo(h.ctx, fmt.Sprintf("connection %d round %d", id, h.rounds)); err != nil {
			h.t.Errorf("%s: connection %d: %v", when, id, err)
		}
	}
}

// begin starts a hand-off as the old agent does and pauses the listeners.
func (h *rjHarness) begin() []proxy.ListenerFile {
	h.t.Helper()
	stay, err := h.a.Proxy.BeginHandoff(false)
	if err != nil {
		h.t.Fatalf("BeginHandoff: %v", err)
	}
	if stay != "" {
		h.t.Fatalf("BeginHandoff: connections that cannot move on the %s plane: %s", h.plane, stay)
	}
	ls, err := h.a.Proxy.ListenerFiles()
	if err != nil {
		h.a.Proxy.ResumeHandoff(nil, nil)
		h.t.Fatalf("ListenerFiles: %v", err)
	}
	if len(ls) != 1 || ls[0].Name != "ws" || ls[0].File == nil {
		h.a.Proxy.ResumeHandoff(ls, nil)
		h.t.Fatalf("ListenerFiles: %+v, want the one listener ws", ls)
	}
	pctx, cancel := context.WithTimeout(h.ctx, 2*time.Second)
	defer cancel()
	h.a.Proxy.PauseAccepting(pctx)
	return ls
}

// resume is ResumeHandoff, checked: errors, file ownership, and that
// every connection is back in the table.
func (h *rjHarness) resume(ls []proxy.ListenerFile, hs []*proxy.Handed, want int) {
	h.t.Helper()
	if err := h.a.Proxy.ResumeHandoff(ls, hs); err != nil {
		h.t.Errorf("ResumeHandoff: %v", err)
	}
	for _, l := range ls {
		rjClosed(h.t, "ResumeHandoff, listener "+l.Address, l.File)
	}
	for _, x := range hs {
		rjClosed(h.t, "ResumeHandoff, client socket", x.Client)
		rjClosed(h.t, "ResumeHandoff, backend socket", x.Backend)
	}
	if n := h.a.Proxy.Active(); n != want {
		h.t.Errorf("after ResumeHandoff the agent has %d connections, want %d", n, want)
	}
}

// detach is one Detach call, checked: at most rjBatch connections,
// distinct, on the test's plane, ids ascending.
func (h *rjHarness) detach() ([]*proxy.Handed, []uint64, time.Duration) {
	h.t.Helper()
	t0 := time.Now()
	hs, err := h.a.Proxy.Detach(rjBatch)
	took := time.Since(t0)
	if err != nil {
		h.t.Errorf("Detach(%d): %v", rjBatch, err)
	}
	if len(hs) > rjBatch {
		h.t.Errorf("Detach(%d) returned %d connections", rjBatch, len(hs))
	}
	ids := make([]uint64, len(hs))
	for i, x := range hs {
		r := rjParse(h.t, x)
		if r.Plane != h.plane {
			h.t.Errorf("connection %d handed as %q, want %s", r.ID, r.Plane, h.plane)
		}
		if c := h.ids[r.ID]; c != nil && c.local != r.Client {
			h.t.Errorf("connection %d: record names client %v, the test's client is %v", r.ID, r.Client, c.local)
		}
		ids[i] = r.ID
	}
	if !sort.SliceIsSorted(ids, func(i, j int) bool { return ids[i] < ids[j] }) {
		h.t.Errorf("Detach returned ids %v, want lowest first", ids)
	}
	return hs, ids, took
}

type rjDialed struct {
	c   *rjClient
	err error
}

// pendingDial dials while the listeners are paused; the result arrives
// once the agent accepts again.
func (h *rjHarness) pendingDial() <-chan rjDialed {
	done := make(chan rjDialed, 1)
	go func() {
		c, err := dialRecorded(h.ctx, h.addr)
		done <- rjDialed{c, err}
	}()
	h.t.Cleanup(func() { // if the test ended before taking it
		select {
		case d := <-done:
			if d.c != nil {
				d.c.ws.CloseNow()
			}
		default:
		}
	})
	return done
}

func sortedIDs[V any](m map[uint64]V) []uint64 {
	var out []uint64
	for id := range m {
		out = append(out, id)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// TestHandoffRejectedNotOfferedAgain: connections the new agent rejects
// go back on their data plane at once and are not offered again in the
// same hand-off (they were, for ever: the upgrade never ended); the
// others are detached once each and the hand-off runs dry. After the
// hand-off is undone (ResumeHandoff) every connection echoes, the
// listener accepts (a client that waited in the backlog meanwhile too),
// and a second hand-off offers the previously rejected connections
// again: the rejected set is per hand-off.
func TestHandoffRejectedNotOfferedAgain(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		h := startRejectHarness(t, plane)
		p := h.a.Proxy
		all := sortedIDs(h.ids)

		// Hand-off 1: the first batch is rejected.
		ls := h.begin()
		var out []*proxy.Handed // detached, not yet re-attached
		resumed := false
		defer func() {
			if !resumed { // a Fatal on the way: leave the agent serving
				p.ResumeHandoff(ls, out)
			}
		}()
		waiting := h.pendingDial()

		first, rejected, _ := h.detach()
		if len(first) != rjBatch {
			out = append(out, first...)
			t.Fatalf("first Detach(%d) returned %d connections (ids %v)", rjBatch, len(first), rejected)
		}
		if fmt.Sprint(rejected) != fmt.Sprint(all[:rjBatch]) {
			t.Errorf("first batch %v, want the lowest ids %v", rejected, all[:rjBatch])
		}
		if n := p.Active(); n != rjConns-rjBatch {
			t.Errorf("with a batch detached the agent has %d connections, want %d", n, rjConns-rjBatch)
		}
		if err := p.Handed(nil, first); err != nil {
			t.Errorf("Handed(nil, rejected): %v", err)
		}
		for _, x := range first {
			rjClosed(t, "Handed, rejected client socket", x.Client)
			rjClosed(t, "Handed, rejected backend socket", x.Backend)
		}
		if n := p.Active(); n != rjConns {
			t.Errorf("after Handed(nil, rejected) the agent has %d connections, want %d", n, rjConns)
		}
		// Re-attached: they are served now, mid hand-off.
		h.echoIDs("rejected, during the hand-off", rejected)

		isRejected := map[uint64]bool{}
		for _, id := range rejected {
			isRejected[id] = true
		}
		seen := map[uint64]int{}
		var order []uint64
		calls, lastTook := 0, time.Duration(0)
	loop:
		for {
			if calls == rjCalls {
				t.Errorf("Detach still returns connections after %d calls: the hand-off would not end (detached %v)", rjCalls, order)
				break
			}
			calls++
			hs, ids, took := h.detach()
			out = append(out, hs...)
			lastTook = took
			if len(hs) == 0 {
				break
			}
			for _, id := range ids {
				seen[id]++
				order = append(order, id)
				if isRejected[id] {
					t.Errorf("Detach call %d offered connection %d again, which the new agent rejected in this hand-off (batch %v)", calls, id, ids)
					break loop
				}
				if seen[id] > 1 {
					t.Errorf("Detach call %d offered connection %d a second time (batch %v)", calls, id, ids)
					break loop
				}
			}
		}
		if !t.Failed() {
			if fmt.Sprint(order) != fmt.Sprint(all[rjBatch:]) {
				t.Errorf("after the rejected batch, Detach handed %v, want each of %v once, lowest first", order, all[rjBatch:])
			}
			// The empty answer comes at once: nothing left that is tried
			// (Detach retries for up to 5 s while candidates are closing).
			if lastTook > time.Second {
				t.Errorf("the last, empty Detach took %v", lastTook)
			}
			if n := p.Active(); n != rjBatch {
				t.Errorf("with the others detached the agent has %d connections, want the %d rejected", n, rjBatch)
			}
			h.echoIDs("rejected, with the others detached", rejected)
		}

		var early *rjDialed
		select {
		case d := <-waiting:
			early = &d
			t.Errorf("a client was served while the listeners were paused (err %v)", d.err)
		case <-time.After(200 * time.Millisecond):
		}

		// The upgrade failed: everything detached goes back.
		resumed = true
		h.resume(ls, out, rjConns)
		if t.Failed() {
			t.FailNow()
		}
		h.echoAll("after ResumeHandoff")
		if early == nil {
			d := <-waiting
			early = &d
		}
		if early.err != nil {
			t.Fatalf("the client that waited in the backlog: %v", early.err)
		}
		t.Cleanup(func() { early.c.ws.CloseNow() })
		h.add(early.c)
		h.dial()
		waitFor(t, "the new connections in the table", func() bool { return p.Active() == rjConns+2 })
		h.learnIDs()
		if len(h.ids) != rjConns+2 {
			t.Fatalf("the agent's table names %d of the %d clients", len(h.ids), rjConns+2)
		}
		h.echoAll("after ResumeHandoff, with two new clients")

		// Hand-off 2: the rejected set was hand-off 1's; everything is
		// offered, the previously rejected connections too, each once.
		ls2 := h.begin()
		var out2 []*proxy.Handed
		resumed2 := false
		defer func() {
			if !resumed2 {
				p.ResumeHandoff(ls2, out2)
			}
		}()
		got := map[uint64]int{}
		for calls = 0; ; calls++ {
			if calls == rjCalls {
				t.Fatalf("second hand-off: Detach still returns connections after %d calls", rjCalls)
			}
			hs, ids, _ := h.detach()
			out2 = append(out2, hs...)
			if len(hs) == 0 {
				break
			}
			for _, id := range ids {
				if got[id]++; got[id] > 1 {
					t.Fatalf("second hand-off: connection %d offered twice", id)
				}
			}
		}
		if want := sortedIDs(h.ids); fmt.Sprint(sortedIDs(got)) != fmt.Sprint(want) {
			t.Errorf("second hand-off detached %v, want every connection %v", sortedIDs(got), want)
		}
		for _, id := range rejected {
			if got[id] != 1 {
				t.Errorf("second hand-off: connection %d, rejected in the first, was not offered", id)
			}
		}
		if n := p.Active(); n != 0 {
			t.Errorf("second hand-off: %d connections left after detaching all", n)
		}
		resumed2 = true
		h.resume(ls2, out2, rjConns+2)
		h.echoAll("after the second ResumeHandoff")
		h.dial()
		waitFor(t, "a connection after the second hand-off", func() bool { return p.Active() == rjConns+3 })
		h.echoAll("after the second ResumeHandoff, with a new client")
	})
}

// TestHandoffRejectedAll: a new agent that rejects every connection (a
// sockmap agent without the old agent's maps) gets each offered once;
// the hand-off ends after ceil(n/batch) batches with every connection
// still served here.
func TestHandoffRejectedAll(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		h := startRejectHarness(t, plane)
		p := h.a.Proxy
		all := sortedIDs(h.ids)
		ls := h.begin()
		resumed := false
		defer func() {
			if !resumed {
				p.ResumeHandoff(ls, nil)
			}
		}()
		var order []uint64
		batches := 0
		for calls := 0; ; calls++ {
			if calls == rjCalls {
				t.Fatalf("Detach still returns connections after %d calls, all rejected: the hand-off would not end (offered %v)", rjCalls, order)
			}
			hs, ids, took := h.detach()
			if len(hs) == 0 {
				if took > time.Second {
					t.Errorf("the last, empty Detach took %v", took)
				}
				break
			}
			batches++
			order = append(order, ids...)
			if err := p.Handed(nil, hs); err != nil {
				t.Errorf("Handed(nil, rejected): %v", err)
			}
			for _, x := range hs {
				rjClosed(t, "Handed, rejected client socket", x.Client)
				rjClosed(t, "Handed, rejected backend socket", x.Backend)
			}
			if n := p.Active(); n != rjConns {
				t.Errorf("after rejected batch %d the agent has %d connections, want %d", batches, n, rjConns)
			}
		}
		if fmt.Sprint(order) != fmt.Sprint(all) {
			t.Errorf("offered %v, want each of %v once, lowest first", order, all)
		}
		if want := (rjConns + rjBatch - 1) / rjBatch; batches != want {
			t.Errorf("%d batches, want %d", batches, want)
		}
		h.echoAll("all rejected, during the hand-off")
		resumed = true
		h.resume(ls, nil, rjConns)
		h.echoAll("after ResumeHandoff")
		h.dial()
		waitFor(t, "a connection after the hand-off", func() bool { return p.Active() == rjConns+1 })
		h.echoAll("after ResumeHandoff, with a new client")
	})
}
