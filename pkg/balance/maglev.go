package balance

import (
	"slices"
	"sort"
)

// Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable
// Software Network Load Balancer", NSDI 2016, §3.4).
//
// Every member b gets a permutation of the M slots from two hashes of its
// address: offset = h1 mod M, skip = h2 mod (M−1) + 1, permutation[j] =
// (offset + j·skip) mod M; M prime makes every skip coprime to M, so the
// permutation visits every slot. Members then take turns claiming their
// most-preferred slot that is still empty until the table is full. The paper
// weights backends "by altering the relative frequency of the backends'
// turns" without details; here each member has a quota of slots
// proportional to its weight (largest-remainder rounding, every member at
// least one), and in round r a member may hold up to ⌈r·quota/maxQuota⌉
// slots, so heavy members claim early and often and light ones are spread
// over the whole population instead of all coming last. Shares are then
// exact to one slot: a member's share of keys is quota/M.
//
// Members take their turns in a canonical order — by address hash, then
// address — not in spec order, so two agents whose configs list the same
// backends in different orders still build the same table.

// DefaultTableSize is the smallest table size Pool uses when
// Options.TableSize is 0; it is the paper's M.
const DefaultTableSize = 65537

// maxTableSize bounds Options.TableSize (a []uint32 of this many entries is
// 64 MiB).
const maxTableSize = 1 << 24

// tableSize picks M for n backends: the paper's 65537 while that is at
// least 100·n (n ≤ 655), else the first entry of a fixed ladder of primes,
// each about twice the one before, that is ≥ 100·n. A ladder rather than
// "the next prime ≥ 100·n" because M changing reshuffles every key: with the
// ladder, adding or removing a backend changes M only when the pool crosses
// a doubling, and operators who cannot afford even that pin TableSize.
func tableSize(n int) int {
	m := DefaultTableSize
	for m < 100*n {
		m = NextPrime(2*(m-1) + 1)
	}
	return m
}

// IsPrime reports whether n is prime (Maglev table sizes must be).
func IsPrime(n int) bool {
	if n < 2 {
		return false
	}
	for _, p := range []int{2, 3, 5, 7} {
		if n%p == 0 {
			return n == p
		}
	}
	for d := 11; d*d <= n; d += 2 {
		if n%d == 0 {
			return false
		}
	}
	return true
}

// NextPrime returns the smallest prime ≥ n.
func NextPrime(n int) int {
	for !IsPrime(n) {
		n++
	}
	return n
}

// buildTable returns the Maglev table of size m over members with the given
// weights; entry i is an index into members. Members with weight ≤ 0 get no
// slots. It returns nil when no member has a positive weight.
func buildTable(members []*Backend, weights []int64, m int) []uint32 {
	type cand struct {
		idx          uint32
		key          uint64
		next, skip   int // next slot to try, step
		quota, taken int
	}
	var cs []cand
	var wsum int64
	for i, b := range members {
		if weights[i] <= 0 {
			continue
		}
		wsum += weights[i]
		cs = append(cs, cand{
			idx:  uint32(i),
			key:  hashStr(seedOffset, b.addr),
			next: reduce(hashStr(seedOffset, b.addr), m),
			skip: reduce(hashStr(seedSkip, b.addr), m-1) + 1,
		})
	}
	if len(cs) == 0 {
		return nil
	}
	slices.SortFunc(cs, func(a, b cand) int {
		switch {
		case a.key < b.key:
			return -1
		case a.key > b.key:
			return 1
		}
		return compareStr(members[a.idx].addr, members[b.idx].addr)
	})

	// Quotas: floor shares, then the remaining slots to the largest
	// remainders (ties in canonical order), then at least one slot each.
	type rem struct {
		r int64
		i int
	}
	rems := make([]rem, len(cs))
	given := 0
	for i := range cs {
		w := weights[cs[i].idx]
		q := int64(m) * w / wsum
		cs[i].quota = int(q)
		given += int(q)
		rems[i] = rem{int64(m)*w - q*wsum, i}
	}
	sort.SliceStable(rems, func(a, b int) bool { return rems[a].r > rems[b].r })
	for k := 0; given < m; k++ {
		cs[rems[k%len(rems)].i].quota++
		given++
	}
	for i := range cs {
		if cs[i].quota == 0 {
			// Take the slot from the member with the largest quota.
			j := 0
			for k := range cs {
				if cs[k].quota > cs[j].quota {
					j = k
				}
			}
			cs[j].quota--
			cs[i].quota++
		}
	}
	qmax := 0
	for i := range cs {
		qmax = max(qmax, cs[i].quota)
	}

	const empty = ^uint32(0)
	table := make([]uint32, m)
	for i := range table {
		table[i] = empty
	}
	// Round r lets member c hold up to ⌈r·quota/qmax⌉ slots. The member
	// with the largest quota claims one slot a round, so qmax rounds fill
	// the table exactly (Σ quota = m).
	for r := 1; r <= qmax; r++ {
		for i := range cs {
			c := &cs[i]
			target := (r*c.quota + qmax - 1) / qmax
			for c.taken < target {
				for table[c.next] != empty {
					c.next += c.skip
					if c.next >= m {
						c.next -= m
					}
				}
				table[c.next] = c.idx
				c.taken++
			}
		}
	}
	return table
}

func compareStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
