package dataplane

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// smInherited builds a second plane on from's BPF objects, as a new agent
// does after an upgrade's exec: the exported files become the inherited
// descriptors. Call it on the namespace's thread.
func smInherited(t *testing.T, from *Sockmap, opts SockmapOptions) *Sockmap {
	t.Helper()
	e, err := from.Export()
	if err != nil {
		t.Fatalf("Export: %v", err)
	}
	defer e.Close()
	fds := make([]int, len(e.Files))
	for i, f := range e.Files {
		if fds[i], err = unix.Dup(int(f.Fd())); err != nil {
			t.Fatal(err)
		}
	}
	h, err := inheritSockmap(e.meta, fds)
	if err != nil {
		t.Fatalf("inherit: %v", err)
	}
	opts.Inherit = h
	return ptNewSockmap(t, opts)
}

// smHand detaches p from one plane and adopts it into another. It returns
// the state's phase ("live", "queued", "draining", "demoted") or "" when
// the connection had finished instead.
func smHand(t *testing.T, from, to *Sockmap, p *ptPair) string {
	t.Helper()
	ds, err := from.Detach([]uint64{p.id})
	if err != nil {
		t.Errorf("detach: %v", err)
		return ""
	}
	if len(ds) == 0 {
		return ""
	}
	d := ds[0]
	if d.ID != p.id || d.Kind != KindSockmap {
		t.Fatalf("detached %d/%s, want %d/sockmap", d.ID, d.Kind, p.id)
	}
	var st smHandoffState
	if err := json.Unmarshal(d.State, &st); err != nil {
		t.Fatal(err)
	}
	phase := st.Phase
	if st.Demoted != nil {
		phase = "demoted"
		var sp spHandoffState
		if err := json.Unmarshal(st.Demoted.Splice, &sp); err != nil {
			t.Fatal(err)
		}
		if sp.ClientToBack.EOFSent || sp.BackToClient.EOFSent {
			phase = "demoted-halfclosed"
		}
	}
	err = to.Adopt(&Conn{ID: p.id, Client: spFileConn(t, d.Client), Backend: spFileConn(t, d.Backend),
		IdleTimeout: d.IdleTimeout, Done: func(r Result) {
			select {
			case p.res <- r:
			default:
				t.Errorf("conn %d: Done called twice", p.id)
			}
		}}, d.State)
	if err != nil {
		t.Fatalf("adopt (%s): %v", phase, err)
	}
	return phase
}

// TestSockmapHandoffBulk moves a connection back and forth between an
// agent's plane and a plane built on its exported objects every few
// milliseconds while 128 MiB stream each way: every byte arrives once and
// in order, both EOFs pass, Done runs once (on the last plane), and the
// counters continue. With the default high-water mark the connection is
// demoted part-way, so hand-offs also catch it queued for demotion,
// draining and demoted; without demotion it stays on the kernel path and
// every hand-off is a pure change of owner.
func TestSockmapHandoffBulk(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts SockmapOptions
	}{
		{"kernel", SockmapOptions{ParkedHighWater: -1}},
		{"demoting", SockmapOptions{ParkedHighWater: 1 << 20}},
		{"rate", SockmapOptions{RateLimit: 20 << 20}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			smEnv(t, tc.opts, func(a *Sockmap, e *ptEnv) {
				b := smInherited(t, a, tc.opts)
				defer b.Close()
				p := e.pair(nil)
				defer p.close()
				n := int64(128 << 20)
				if testing.Short() {
					n = 8 << 20
				}
				stop := make(chan struct{})
				done := make(chan struct{})
				phases := map[string]int{}
				go func() {
					defer close(done)
					planes := [2]*Sockmap{a, b}
					for i := 0; ; i++ {
						select {
						case <-stop:
							return
						case <-time.After(time.Millisecond):
						}
						ph := smHand(t, planes[i%2], planes[(i+1)%2], p)
						if ph == "" {
							// Finished, or closing on this plane: it is
							// where Done runs.
							if planes[i%2].Len() == 0 {
								return
							}
							i-- // try the same direction again
							continue
						}
						phases[ph]++
					}
				}()
				err := ptBothWays(p, 77, n, 61<<10)
				r := p.wait(t, 10*time.Second)
				close(stop)
				<-done
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("hand-offs by phase: %v; result %s, demoted %v (%s)", phases, r.Reason, r.Demoted, r.DemoteReason)
				total := 0
				for _, k := range phases {
					total += k
				}
				if total < 10 {
					t.Errorf("only %d hand-offs during the transfer", total)
				}
				if tc.opts.ParkedHighWater < 0 && (phases["live"] != total || r.Demoted) {
					t.Errorf("without demotion every hand-off should be of a live kernel-path connection: %v, demoted %v", phases, r.Demoted)
				}
				if r.ClientToBackend.Bytes != uint64(n) || r.BackendToClient.Bytes != uint64(n) {
					t.Errorf("counters %d/%d, want %d each way (they must continue across hand-offs)", r.ClientToBackend.Bytes, r.BackendToClient.Bytes, n)
				}
				if r.Reason != ReasonClientFIN && r.Reason != ReasonBackendFIN {
					t.Errorf("reason %s (%v), want a FIN", r.Reason, r.Err)
				}
				for _, s := range []*Sockmap{a, b} {
					if s.Len() != 0 {
						t.Errorf("a plane still holds %d connections", s.Len())
					}
					if c := s.Counters(); c.IntegrityResets != 0 || c.RedirectResets != 0 {
						t.Errorf("counters %+v", c)
					}
				}
				if v, tg, err := b.MapEntries(); err != nil || v != 0 || tg != 0 {
					t.Errorf("map entries after the end: verdict %d target %d %v", v, tg, err)
				}
			})
		})
	}
}

// TestSockmapHandoffMany hands 200 connections exchanging messages over
// in one Detach, closes the old plane, and checks that the adopted ones
// keep moving in the kernel (the attachment and the maps outlive the old
// plane), that a FIN sent while a connection belonged to nobody is
// forwarded, and that the maps are empty at the end.
func TestSockmapHandoffMany(t *testing.T) {
	const n = 200
	smEnv(t, SockmapOptions{}, func(a *Sockmap, e *ptEnv) {
		b := smInherited(t, a, SockmapOptions{})
		defer b.Close()
		pairs := make([]*ptPair, n)
		ids := make([]uint64, n)
		for i := range pairs {
			pairs[i] = e.pair(nil)
			ids[i] = pairs[i].id
			defer pairs[i].close()
		}
		echo := func(p *ptPair, k int) error {
			msg := []byte(fmt.Sprintf("msg %d of %d;", k, p.id))
			for _, dir := range [][2]*net.TCPConn{{p.client, p.backend}, {p.backend, p.client}} {
				if _, err := dir[0].Write(msg); err != nil {
					return err
				}
				buf := make([]byte, len(msg))
				dir[1].SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.ReadFull(dir[1], buf); err != nil || string(buf) != string(msg) {
					return fmt.Errorf("conn %d: got %q, %v; want %q", p.id, buf, err, msg)
				}
			}
			return nil
		}
		for _, p := range pairs {
			if err := echo(p, 0); err != nil {
				t.Fatal(err)
			}
		}
		// Bytes in flight while detaching: they keep moving.
		var wg sync.WaitGroup
		var werr atomic.Value
		for _, p := range pairs[:50] {
			wg.Go(func() {
				for k := 1; k <= 20; k++ {
					if err := echo(p, k); err != nil {
						werr.Store(err)
						return
					}
				}
			})
		}
		ds, err := a.Detach(ids)
		if err != nil || len(ds) != n {
			t.Fatalf("detach: %d of %d, %v", len(ds), n, err)
		}
		wg.Wait()
		if err, _ := werr.Load().(error); err != nil {
			t.Fatalf("while detached: %v", err)
		}
		// A FIN while the connection has no owner.
		if err := pairs[0].client.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if err := a.Close(); err != nil {
			t.Fatalf("closing the old plane: %v", err)
		}
		byID := map[uint64]*ptPair{}
		for _, p := range pairs {
			byID[p.id] = p
		}
		for _, d := range ds {
			p := byID[d.ID]
			err := b.Adopt(&Conn{ID: d.ID, Client: spFileConn(t, d.Client), Backend: spFileConn(t, d.Backend),
				Done: func(r Result) { p.res <- r }}, d.State)
			if err != nil {
				t.Fatalf("adopt %d: %v", d.ID, err)
			}
		}
		if c := b.Counters(); c.Active != n || c.Started != 0 {
			t.Fatalf("adopting plane: %d active, %d started; want %d adopted, none started", c.Active, c.Started, n)
		}
		p0 := pairs[0]
		p0.backend.SetReadDeadline(time.Now().Add(5 * time.Second))
		if k, err := p0.backend.Read(make([]byte, 1)); k != 0 || err == nil {
			t.Fatalf("the FIN sent during the hand-off did not reach the backend: %d, %v", k, err)
		}
		for _, p := range pairs[1:] {
			if err := echo(p, 100); err != nil {
				t.Fatal(err)
			}
		}
		st, ok := b.Stats(pairs[1].id)
		if !ok || st.Plane != KindSockmap || st.ClientToBackend.Bytes != st.BackendToClient.Bytes || st.ClientToBackend.Bytes < 20 {
			t.Fatalf("stats of an adopted connection: %+v %v", st, ok)
		}
		for _, p := range pairs {
			p.close()
		}
		for _, p := range pairs {
			r := p.wait(t, 10*time.Second)
			if r.Reason == ReasonError || r.Reason == ReasonIntegrity {
				t.Fatalf("conn %d: %s %v", p.id, r.Reason, r.Err)
			}
		}
		if v, tg, err := b.MapEntries(); err != nil || v != 0 || tg != 0 {
			t.Fatalf("map entries at the end: verdict %d target %d %v", v, tg, err)
		}
	})
}

// TestSockmapAdoptNeedsTheMaps: a plane that loaded its own objects (an
// agent of another hand-off ABI, or one whose inheritance failed) refuses
// a kernel-path connection, leaving it untouched; the old plane takes it
// back and it still works. An unknown state version is refused too.
func TestSockmapAdoptNeedsTheMaps(t *testing.T) {
	smEnv(t, SockmapOptions{}, func(a *Sockmap, e *ptEnv) {
		other := ptNewSockmap(t, SockmapOptions{})
		defer other.Close()
		p := e.pair(nil)
		defer p.close()
		ds, err := a.Detach([]uint64{p.id})
		if err != nil || len(ds) != 1 {
			t.Fatalf("detach: %v %d", err, len(ds))
		}
		d := ds[0]
		cl, be := spFileConn(t, d.Client), spFileConn(t, d.Backend)
		done := func(r Result) { p.res <- r }
		err = other.Adopt(&Conn{ID: p.id, Client: cl, Backend: be, Done: done}, d.State)
		if err == nil || !strings.Contains(err.Error(), "not in this agent's BPF maps") {
			t.Fatalf("adopt into a plane with its own maps: %v", err)
		}
		bad := strings.Replace(string(d.State), `"v":1`, `"v":99`, 1)
		if err := a.Adopt(&Conn{ID: p.id, Client: cl, Backend: be, Done: done}, json.RawMessage(bad)); err == nil || !strings.Contains(err.Error(), "version 99") {
			t.Fatalf("state version 99: %v", err)
		}
		if err := a.Adopt(&Conn{ID: p.id, Client: cl, Backend: be, Done: done}, d.State); err != nil {
			t.Fatalf("taking it back: %v", err)
		}
		if err := ptBothWays(p, 5, 4<<20, 32<<10); err != nil {
			t.Fatal(err)
		}
		if r := p.wait(t, 5*time.Second); r.ClientToBackend.Bytes != 4<<20 {
			t.Fatalf("result %+v", r)
		}
	})
}

// TestInheritSockmapRefuses: a bad environment value, another ABI or a
// wrong object list is refused with the reason, and the descriptors are
// closed.
func TestInheritSockmapRefuses(t *testing.T) {
	if _, err := InheritSockmap(json.RawMessage("{"), nil); err == nil || !strings.Contains(err.Error(), "description") {
		t.Fatalf("bad JSON: %v", err)
	}
	pipeFDs := func() []int {
		var fds []int
		for len(fds) < len(smObjects)+1 {
			var p [2]int
			if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
				t.Fatal(err)
			}
			fds = append(fds, p[0], p[1])
		}
		return fds[:len(smObjects)+1]
	}
	names := append(append([]string(nil), smObjects...), "verdict_link")
	for _, tc := range []struct {
		meta smExportMeta
		want string
	}{
		{smExportMeta{ABI: smHandoffABI, Step: 1, Objects: names[:3]}, "descriptors for"},
		{smExportMeta{ABI: smHandoffABI, Step: 1, Objects: append([]string{"x"}, names[1:]...)}, `want "verdict_map"`},
		{smExportMeta{ABI: smHandoffABI, Step: 1, Objects: names}, "verdict_map"}, // a pipe is no map
	} {
		fds := pipeFDs()
		_, err := inheritSockmap(tc.meta, fds)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want %q", tc.meta.Objects, err, tc.want)
		}
		for _, fd := range fds {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
				t.Errorf("descriptor %d still open after a refused inheritance", fd)
			}
		}
	}
}

// TestSockmapHandoffABI: objects exported under another ABI are refused
// (and released), so the new agent loads its own.
func TestSockmapHandoffABI(t *testing.T) {
	smEnv(t, SockmapOptions{}, func(a *Sockmap, e *ptEnv) {
		x, err := a.Export()
		if err != nil {
			t.Fatal(err)
		}
		defer a.Unexport()
		defer x.Close()
		fds := make([]int, len(x.Files))
		for i, f := range x.Files {
			fds[i], _ = unix.Dup(int(f.Fd()))
		}
		m := x.meta
		m.ABI = smHandoffABI + 1
		if _, err := inheritSockmap(m, fds); err == nil || !strings.Contains(err.Error(), "ABI") {
			t.Fatalf("another ABI: %v", err)
		}
		if _, err := a.Export(); err == nil {
			t.Fatal("a second Export while exported succeeded")
		}
	})
}
