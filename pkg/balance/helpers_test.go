package balance

import (
	"fmt"
	"strconv"
	"testing"
)

// specs returns n backend specs 10.0.x.y:8080 with weight 1.
func specs(n int) []BackendSpec {
	s := make([]BackendSpec, n)
	for i := range s {
		s[i] = BackendSpec{Address: addr(i), Weight: 1}
	}
	return s
}

func addr(i int) string { return fmt.Sprintf("10.0.%d.%d:8080", i/256, i%256) }

func mustPool(t testing.TB, s []BackendSpec, opt Options) *Pool {
	t.Helper()
	p, err := NewPool("test", s, opt)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// key returns the Key of "user-i", the way a header key is hashed.
func key(i int) Key {
	var buf [32]byte
	b := append(buf[:0], "user-"...)
	return HashBytes(strconv.AppendInt(b, int64(i), 10))
}

// owner picks for k and releases at once: where k goes on an idle pool.
func owner(t testing.TB, p *Pool, k Key) string {
	t.Helper()
	b, err := p.Pick(k, nil)
	if err != nil {
		t.Fatalf("Pick(%v): %v", k, err)
	}
	b.Release()
	return b.Address()
}

// owners maps keys 0..n-1 to backend addresses on an idle pool.
func owners(t testing.TB, p *Pool, n int) []string {
	t.Helper()
	out := make([]string, n)
	for i := range out {
		out[i] = owner(t, p, key(i))
	}
	return out
}

func byAddr(p *Pool) map[string]*Backend {
	m := map[string]*Backend{}
	for _, b := range p.Backends() {
		m[b.Address()] = b
	}
	return m
}

// checkIdle fails if any backend still counts connections.
func checkIdle(t testing.TB, p *Pool) {
	t.Helper()
	for _, b := range p.Backends() {
		if b.Active() != 0 {
			t.Errorf("%s: %d active after all releases", b.Address(), b.Active())
		}
	}
	if n := p.total.Load(); n != 0 {
		t.Errorf("pool total %d after all releases", n)
	}
}
