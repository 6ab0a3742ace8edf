package balance

import (
	"container/heap"
)

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
// It is built by earliest-deadline-first: the k-th appearance of member i
// is due at (k+½)/w_i, and the cycle lists appearances in order of due time,
// ties by member index. A heap makes it O(L log n) for a cycle of L.
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
	h := make(edfHeap, 0, len(w))
	for i, x := range w {
		if x > 0 {
			h = append(h, edfItem{i: uint32(i), w: x})
		}
	}
	heap.Init(&h)
	out := make([]uint32, 0, l)
	for int64(len(out)) < l {
		it := &h[0]
		out = append(out, it.i)
		it.k++
		if it.k == it.w {
			heap.Pop(&h)
		} else {
			heap.Fix(&h, 0)
		}
	}
	return out
}

func gcd(a, b int64) int64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// edfItem is a member with weight w that has had k appearances; its next
// appearance is due at (2k+1)/(2w).
type edfItem struct {
	i    uint32
	w, k int64
}

type edfHeap []edfItem

func (h edfHeap) Len() int { return len(h) }

// Less compares due times (2a.k+1)/a.w < (2b.k+1)/b.w exactly, in integers.
func (h edfHeap) Less(a, b int) bool {
	x := (2*h[a].k + 1) * h[b].w
	y := (2*h[b].k + 1) * h[a].w
	if x != y {
		return x < y
	}
	return h[a].i < h[b].i
}
func (h edfHeap) Swap(a, b int) { h[a], h[b] = h[b], h[a] }
func (h *edfHeap) Push(x any)   { *h = append(*h, x.(edfItem)) }
func (h *edfHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}
