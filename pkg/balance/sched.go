package balance

// maxSchedule bounds the length of a weighted round-robin cycle. Weights
// are divided by their greatest common divisor first, so equal weights give
// a cycle of one entry per backend; only unusual mixes (hundreds of
// backends with co-prime weights) reach the bound, and then weights are
// scaled down to fit, each share staying within 1/maxSchedule of its ideal.
const maxSchedule = 1 << 18

// buildSchedule returns one cycle of smooth weighted round robin over
// members: member i appears weights[i]/g times (g = gcd of the weights), and
// the appearances of every member are spread evenly over the cycle, so any
// window of the cycle gives each member its weighted share to within about
// one pick — the property of nginx's smooth weighted round robin. The exact
// interleaving can differ from nginx's: weights 5,1,1 give a a b a c a a
// there and a a a b c a a here.
//
// It lists appearances in order of due time — the k-th appearance of
// member i is due at (k+½)/w_i, ties by member index — which is
// earliest-deadline-first. Due times are bucketed by their position in the
// cycle, so it costs O(L + n) for a cycle of L, not a heap's O(L log n).
//
// Members with weight ≤ 0 do not appear. The result is nil when none has a
// positive weight.
func buildSchedule(weights []int64) []uint32 {
	var g, sum int64
	for _, w := range weights {
		if w > 0 {
			g = gcd(g, w)
			sum += w
		}
	}
	if sum == 0 {
		return nil
	}
	w := make([]int64, len(weights))
	var l int64
	for i, x := range weights {
		if x > 0 {
			w[i] = x / g
			l += w[i]
		}
	}
	if l > maxSchedule {
		l = 0
		for i, x := range weights {
			if x > 0 {
				w[i] = max(1, x*maxSchedule/sum)
				l += w[i]
			}
		}
	}
	// Appearance k of member i goes to bucket ⌊(2k+1)·l / (2·w_i)⌋ < l.
	// A bucket holds the appearances due in [b/l, (b+1)/l): at most one per
	// member, usually one or two in all.
	bucket := func(i int, k int64) int64 { return (2*k + 1) * l / (2 * w[i]) }
	start := make([]int32, l+1)
	for i, x := range w {
		for k := range x {
			start[bucket(i, k)+1]++
		}
	}
	for b := range l {
		start[b+1] += start[b]
	}
	type due struct{ i, k uint32 }
	ds := make([]due, l)
	fill := append([]int32(nil), start[:l]...)
	for i, x := range w {
		for k := range x {
			b := bucket(i, k)
			ds[fill[b]] = due{uint32(i), uint32(k)}
			fill[b]++
		}
	}
	// Order each bucket by exact due time (2k+1)/(2w), then member index;
	// members were placed in index order, so a stable insertion sort on
	// due time alone suffices.
	before := func(a, b due) bool { return (2*int64(a.k)+1)*w[b.i] < (2*int64(b.k)+1)*w[a.i] }
	out := make([]uint32, l)
	for b := range l {
		part := ds[start[b]:start[b+1]]
		for x := 1; x < len(part); x++ {
			for y := x; y > 0 && before(part[y], part[y-1]); y-- {
				part[y], part[y-1] = part[y-1], part[y]
			}
		}
	}
	for j := range ds {
		out[j] = ds[j].i
	}
	return out
}

func gcd(a, b int64) int64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}
