package balance

import (
	"math/rand/v2"
	"testing"
)

func TestTableSize(t *testing.T) {
	for _, tc := range []struct{ n, want int }{
		{0, 65537}, {1, 65537}, {655, 65537}, {656, 131101}, {1000, 131101}, {1311, 131101}, {1312, 262217}, {10000, 1048909},
	} {
		got := tableSize(tc.n)
		if got != tc.want || !IsPrime(got) || got < 100*tc.n {
			t.Errorf("tableSize(%d) = %d, want %d (a prime ≥ %d)", tc.n, got, tc.want, 100*tc.n)
		}
	}
	// The ladder does not depend on n between rungs: adding a backend
	// keeps M (and so every key's slot) unless the pool crosses a rung.
	for n := 1; n <= 655; n++ {
		if tableSize(n) != 65537 {
			t.Fatalf("tableSize(%d) = %d", n, tableSize(n))
		}
	}
}

func members(n int) []*Backend {
	out := make([]*Backend, n)
	for i := range out {
		out[i] = &Backend{addr: addr(i)}
	}
	return out
}

// TestTableShares checks that every member gets exactly its weighted quota
// of slots (to one slot), whatever the weights.
func TestTableShares(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct {
		n, m int
		maxW int64
	}{
		{1, 65537, 1}, {2, 65537, 1}, {10, 65537, 1}, {10, 65537, 1000},
		{100, 65537, 10}, {655, 65537, 1}, {1000, 131101, 1000}, {7, 701, 3},
	} {
		ms := members(tc.n)
		w := make([]int64, tc.n)
		var sum int64
		for i := range w {
			w[i] = 1 + r.Int64N(tc.maxW)
			sum += w[i]
		}
		table := buildTable(ms, w, tc.m)
		count := make([]int, tc.n)
		for _, e := range table {
			count[e]++
		}
		// Rounding gives each member its ideal ±1 slot; a member whose
		// ideal is below one slot is raised to one, taken from the largest.
		for i, c := range count {
			ideal := float64(tc.m) * float64(w[i]) / float64(sum)
			if d := float64(c) - ideal; d > 2 || d < -2 {
				t.Errorf("n=%d m=%d: member %d (weight %d) has %d slots, ideal %.2f", tc.n, tc.m, i, w[i], c, ideal)
			}
		}
	}
}

// TestTableOrderIndependent: the table depends on the set, not the order
// the specs come in (two agents with differently ordered configs agree).
func TestTableOrderIndependent(t *testing.T) {
	ms := members(50)
	w := make([]int64, 50)
	for i := range w {
		w[i] = int64(1 + i%4)
	}
	a := buildTable(ms, w, 65537)
	perm := rand.New(rand.NewPCG(3, 4)).Perm(50)
	ms2 := make([]*Backend, 50)
	w2 := make([]int64, 50)
	for i, j := range perm {
		ms2[i], w2[i] = ms[j], w[j]
	}
	b := buildTable(ms2, w2, 65537)
	for i := range a {
		if ms[a[i]] != ms2[b[i]] {
			t.Fatalf("slot %d: %s in spec order, %s in shuffled order", i, ms[a[i]].addr, ms2[b[i]].addr)
		}
	}
}

// TestTableGolden pins the table for a small set: like the hash, it is part
// of what a fleet must agree on across versions.
func TestTableGolden(t *testing.T) {
	ms := members(5)
	table := buildTable(ms, []int64{1, 1, 2, 3, 1}, 65537)
	var h uint64
	for _, e := range table {
		h = fmix(h ^ uint64(e))
	}
	const want = 0x967de42150c12aa5
	if h != want {
		t.Errorf("table digest = %#x, want %#x", h, uint64(want))
	}
}

func TestTableWeightZero(t *testing.T) {
	ms := members(3)
	table := buildTable(ms, []int64{1, 0, 1}, 101)
	for _, e := range table {
		if e == 1 {
			t.Fatalf("member with weight 0 got a slot")
		}
	}
	if buildTable(ms, []int64{0, 0, 0}, 101) != nil {
		t.Errorf("all-zero weights gave a table")
	}
}

func TestSchedule(t *testing.T) {
	for _, tc := range []struct {
		w    []int64
		want []uint32
	}{
		{[]int64{1, 1, 1}, []uint32{0, 1, 2}},
		{[]int64{2, 2, 2}, []uint32{0, 1, 2}},
		{[]int64{5, 1, 1}, []uint32{0, 0, 0, 1, 2, 0, 0}},
		{[]int64{2, 1}, []uint32{0, 1, 0}},
		{[]int64{0, 3}, []uint32{1}},
	} {
		got := buildSchedule(tc.w)
		if len(got) != len(tc.want) {
			t.Errorf("buildSchedule(%v) = %v, want %v", tc.w, got, tc.want)
			continue
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("buildSchedule(%v) = %v, want %v", tc.w, got, tc.want)
				break
			}
		}
	}
	if buildSchedule([]int64{0, 0}) != nil {
		t.Errorf("all-zero weights gave a schedule")
	}
	// Smoothness: in every prefix each member is within 1 of its share.
	w := []int64{7, 3, 11, 1, 5}
	s := buildSchedule(w)
	var sum int64
	for _, x := range w {
		sum += x
	}
	count := make([]int64, len(w))
	for k, e := range s {
		count[e]++
		for i := range w {
			ideal := float64(int64(k+1)*w[i]) / float64(sum)
			if d := float64(count[i]) - ideal; d > 1 || d < -1 {
				t.Fatalf("after %d picks member %d has %d, ideal %.2f", k+1, i, count[i], ideal)
			}
		}
	}
	// A huge co-prime mix is scaled to fit.
	big := make([]int64, 1000)
	for i := range big {
		big[i] = int64(500 + i)
	}
	if l := len(buildSchedule(big)); l > maxSchedule+len(big) {
		t.Errorf("schedule of %d entries, bound %d", l, maxSchedule)
	}
}
