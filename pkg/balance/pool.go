// Package balance chooses a backend for each new connection: Maglev
// consistent hashing with weights and bounded load, smooth weighted round
// robin, weighted least connections, power of two random choices, and
// first-fit. It is pure and deterministic — no I/O, no clocks, no
// configuration parsing — so two agents with the same backend set and
// options send the same key to the same backend, and every behaviour can be
// tested in memory.
//
// A Pool holds its backends and an immutable snapshot of its lookup tables
// behind an atomic pointer: Pick never takes a lock, and Update, SetWeight
// and the rest build a new snapshot and swap it in without pausing picks.
// Per-backend state (active connections, health, drain) lives in *Backend
// objects that survive Update for addresses that stay.
package balance

import (
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
)

// Algorithm names a selection algorithm; the values are the config's
// balance field.
type Algorithm string

// The algorithms.
const (
	// RoundRobin is smooth weighted round robin (nginx's default,
	// HAProxy balance roundrobin).
	RoundRobin Algorithm = "round_robin"
	// LeastConn picks the lowest active/weight (nginx least_conn, HAProxy
	// balance leastconn).
	LeastConn Algorithm = "least_conn"
	// Maglev is consistent hashing of the request's Key through a Maglev
	// lookup table, optionally with bounded load.
	Maglev Algorithm = "maglev"
	// RandomTwo draws two backends at random by weight and takes the one
	// with fewer active connections per weight (nginx random two
	// least_conn).
	RandomTwo Algorithm = "random_two"
	// First fills backends in spec order, each up to its MaxConns (HAProxy
	// balance first).
	First Algorithm = "first"
)

func (a Algorithm) valid() bool {
	switch a {
	case RoundRobin, LeastConn, Maglev, RandomTwo, First:
		return true
	}
	return false
}

// ErrNoBackend is returned by Pick when no backend can take the
// connection: none is available, or every available one was skipped or is
// at its MaxConns. The proxy answers 502 or 503.
var ErrNoBackend = errors.New("balance: no backend available")

// BackendSpec is one configured backend.
type BackendSpec struct {
	// Address is host:port; it identifies the backend across Update and
	// seeds its Maglev permutation.
	Address string
	// Weight is the relative share (0 means 1).
	Weight int
	// Backup backends take connections only when no primary can.
	Backup bool
	// Down keeps the backend in the pool (and its Maglev slots in the table)
	// but gives it no new connections, like nginx's "down".
	Down bool
	// MaxConns caps the backend's active connections (0: no cap).
	MaxConns int
}

// Options choose a Pool's algorithm.
type Options struct {
	// Algorithm is the selection algorithm; empty means RoundRobin.
	Algorithm Algorithm
	// Fallback is used by Maglev for a Key with Present false; empty
	// means RoundRobin. It cannot be Maglev.
	Fallback Algorithm
	// TableSize is the Maglev table size M: a prime, at least 100 × the
	// number of backends, at most 2²⁴. 0 picks DefaultTableSize (65537, the
	// paper's M) while that is ≥ 100 × backends, else the next size on a
	// ladder of primes that roughly doubles, so that adding a backend
	// rarely changes M (which would reshuffle every key).
	TableSize int
	// BalanceFactor is ε of consistent hashing with bounded loads (Mirrokni,
	// Thorup, Zadimoghaddam): Maglev gives a backend a new connection only
	// while that keeps it at or below ⌈(1+ε)·m·w/W⌉ — m the pool's
	// connections counting the new one, w the backend's weight, W the
	// weight of the available backends of its tier — and otherwise tries
	// the key's next probe. HAProxy's hash-balance-factor 125 is ε = 0.25.
	// 0 turns it off for strict stickiness. Only Maglev uses it.
	BalanceFactor float64
}

// Pool is a named set of backends and the algorithm that chooses among
// them (an nginx upstream, a HAProxy backend). Its methods are safe for
// concurrent use.
type Pool struct {
	name     string
	opt      Options
	needSch  bool
	needTbl  bool
	mu       sync.Mutex // serialises Update, SetWeight and state changes
	tableFor int        // table size currently in use (for TableSize)
	snap     atomic.Pointer[snapshot]
	// total is written by every pick and release; the padding keeps it
	// off the cache line of snap, which every pick reads.
	_     [64]byte
	total atomic.Int64 // active connections on all backends the pool made
	_     [56]byte
}

// stateSnap returns the current snapshot.
func (p *Pool) stateSnap() *snapshot { return p.snap.Load() }

// snapshot is what Pick reads: immutable except for the atomics.
type snapshot struct {
	all   []*Backend // spec order
	tiers [2]tier    // primaries, backups
}

type tier struct {
	members []*Backend // spec order
	table   []uint32   // Maglev: slot → member index
	sched   []uint32   // weighted round-robin cycle of member indices
	// Available members and their total weight, refreshed under Pool.mu
	// whenever a member's availability changes.
	availN atomic.Int64
	availW atomic.Int64
	// next is the round-robin cursor, written by every round-robin and
	// least_conn pick: on its own cache line, away from what picks read.
	_    [64]byte
	next atomic.Uint64
	_    [56]byte
}

// recount refreshes the availability totals of every tier. Called with
// Pool.mu held.
func (s *snapshot) recount() {
	for i := range s.tiers {
		t := &s.tiers[i]
		var n, w int64
		for _, b := range t.members {
			if b.available() {
				n++
				w += b.weight.Load()
			}
		}
		t.availN.Store(n)
		t.availW.Store(w)
	}
}

// NewPool builds a pool. It fails when an option or spec is invalid: an
// unknown algorithm, a Maglev fallback, a negative balance factor, a table
// size that is not a prime of at least 100 × backends, an empty or
// repeated address, or a negative weight or MaxConns.
func NewPool(name string, specs []BackendSpec, opt Options) (*Pool, error) {
	if opt.Algorithm == "" {
		opt.Algorithm = RoundRobin
	}
	if opt.Fallback == "" {
		opt.Fallback = RoundRobin
	}
	if !opt.Algorithm.valid() {
		return nil, fmt.Errorf("pool %s: algorithm %q: use round_robin, least_conn, maglev, random_two or first", name, opt.Algorithm)
	}
	if !opt.Fallback.valid() || opt.Fallback == Maglev {
		return nil, fmt.Errorf("pool %s: fallback %q: use round_robin, least_conn, random_two or first", name, opt.Fallback)
	}
	if opt.BalanceFactor < 0 || math.IsNaN(opt.BalanceFactor) || math.IsInf(opt.BalanceFactor, 0) {
		return nil, fmt.Errorf("pool %s: balance factor %g: use 0 (off) or a positive ε such as 0.25", name, opt.BalanceFactor)
	}
	if opt.TableSize < 0 {
		return nil, fmt.Errorf("pool %s: table size %d is negative: use 0 to pick one", name, opt.TableSize)
	}
	if opt.TableSize != 0 && (opt.TableSize > maxTableSize || !IsPrime(opt.TableSize)) {
		return nil, fmt.Errorf("pool %s: table size %d: use a prime up to %d, e.g. %d, or 0 to pick one", name, opt.TableSize, maxTableSize, NextPrime(min(opt.TableSize, maxTableSize-1000)))
	}
	p := &Pool{name: name, opt: opt}
	p.needTbl = opt.Algorithm == Maglev
	p.needSch = opt.Algorithm == RoundRobin || opt.Algorithm == RandomTwo ||
		(opt.Algorithm == Maglev && (opt.Fallback == RoundRobin || opt.Fallback == RandomTwo))
	p.snap.Store(&snapshot{})
	if err := p.Update(specs); err != nil {
		return nil, err
	}
	return p, nil
}

// Name returns the pool's name.
func (p *Pool) Name() string { return p.name }

// Options returns the pool's options with defaults filled in.
func (p *Pool) Options() Options { return p.opt }

// TableSize returns the Maglev table size in use (0 unless the algorithm
// is Maglev).
func (p *Pool) TableSize() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tableFor
}

// Backends returns the pool's backends in spec order. The slice is a copy;
// the *Backend values are live.
func (p *Pool) Backends() []*Backend {
	return append([]*Backend(nil), p.stateSnap().all...)
}

// Update replaces the backend set and swaps in new tables atomically;
// concurrent picks see either the old set or the new one. A *Backend whose
// address stays is kept with its active count, health and drain state, and
// takes the new spec's Backup, Down and MaxConns; its weight is reset to
// the spec's only if the spec's weight changed (so a reload does not undo a
// slow start). Removed backends keep counting their connections until they
// are released. On error nothing changes.
//
// Removing a backend from the set rebuilds the Maglev table, which moves
// that backend's keys and, as Maglev trades a little disruption for exact
// balance, a small fraction of other keys too (see README). To take a
// backend out without moving any other key, mark it Down (or drain it)
// first and delete it later.
func (p *Pool) Update(specs []BackendSpec) error {
	seen := make(map[string]bool, len(specs))
	for i, s := range specs {
		switch {
		case s.Address == "":
			return fmt.Errorf("pool %s: backend %d: empty address", p.name, i)
		case seen[s.Address]:
			return fmt.Errorf("pool %s: backend %s is listed twice: use weight to give it a larger share", p.name, s.Address)
		case s.Weight < 0 || s.Weight > math.MaxInt32:
			return fmt.Errorf("pool %s: backend %s: weight %d: use 1 to %d", p.name, s.Address, s.Weight, math.MaxInt32)
		case s.MaxConns < 0:
			return fmt.Errorf("pool %s: backend %s: max conns %d is negative: use 0 for no cap", p.name, s.Address, s.MaxConns)
		}
		seen[s.Address] = true
	}
	if p.needTbl && p.opt.TableSize != 0 && p.opt.TableSize < 100*len(specs) {
		return fmt.Errorf("pool %s: table size %d is less than 100 × %d backends: use %d or more, or 0 to pick one",
			p.name, p.opt.TableSize, len(specs), NextPrime(100*len(specs)))
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	old := make(map[string]*Backend)
	for _, b := range p.stateSnap().all {
		old[b.addr] = b
	}
	all := make([]*Backend, len(specs))
	for i, s := range specs {
		w := s.Weight
		if w == 0 {
			w = 1
		}
		b := old[s.Address]
		if b == nil {
			b = &Backend{addr: s.Address, pool: p}
			b.weight.Store(int64(w))
			b.specWeight = w
		} else {
			delete(old, s.Address)
			if b.specWeight != w {
				b.specWeight = w
				b.weight.Store(int64(w))
			}
		}
		b.member = true
		b.backup.Store(s.Backup)
		b.maxConns.Store(int64(s.MaxConns))
		st := b.state.Load() &^ stDown
		if s.Down {
			st |= stDown
		}
		b.state.Store(st)
		all[i] = b
	}
	for _, b := range old {
		b.member = false
	}
	p.installLocked(all)
	return nil
}

// rebuildLocked rebuilds the tables over the current set (after SetWeight).
func (p *Pool) rebuildLocked() { p.installLocked(p.stateSnap().all) }

// installLocked builds a snapshot over all and swaps it in. Called with
// p.mu held.
func (p *Pool) installLocked(all []*Backend) {
	s := &snapshot{all: all}
	m := 0
	if p.needTbl {
		m = p.opt.TableSize
		if m == 0 {
			m = tableSize(len(all))
		}
	}
	p.tableFor = m
	for _, b := range all {
		i := 0
		if b.backup.Load() {
			i = 1
		}
		s.tiers[i].members = append(s.tiers[i].members, b)
	}
	for i := range s.tiers {
		t := &s.tiers[i]
		if len(t.members) == 0 {
			continue
		}
		w := make([]int64, len(t.members))
		for j, b := range t.members {
			w[j] = b.weight.Load()
		}
		if p.needTbl {
			t.table = buildTable(t.members, w, m)
		}
		if p.needSch {
			t.sched = buildSchedule(w)
		}
	}
	// Round robin carries on where it was rather than restarting every
	// agent at the first backend after each reload.
	if old := p.stateSnap(); old != nil {
		for i := range s.tiers {
			s.tiers[i].next.Store(old.tiers[i].next.Load())
		}
	}
	s.recount()
	p.snap.Store(s)
}

// maglevProbes is how many slots Maglev tries for one key before scanning
// the members in order. With a fraction a of the table's weight available,
// all probes miss with probability (1−a)³²: 10⁻¹⁰ at a = ½, 3% at a = 0.1.
const maglevProbes = 32

// rrTries bounds the round-robin and random draws before a scan.
const rrTries = 32

// Pick chooses a backend for key, skipping any for which skip returns true
// (skip may be nil): the proxy passes the backends it already tried for
// this connection, as nginx proxy_next_upstream does. Pick counts the
// connection on the chosen backend before returning, so bounded load and
// least_conn see it at once; the caller calls Release when the connection
// ends or connecting failed. Primaries are tried first; backups only when no
// primary can take the connection (none available, or all skipped or at
// MaxConns). It returns ErrNoBackend when no backend can. Pick takes no
// lock and does not allocate.
//
// With Maglev, key picks a table slot; when the slot's backend cannot take
// the connection (unhealthy, draining, down, skipped, at MaxConns, or over
// the bounded-load cap) Pick tries the key's next probe — an independent
// rehash of the key to another slot — up to 32 probes, then the members in
// order from a key-derived start. Rehash probes, rather than walking to
// the adjacent slot, spread a failed backend's keys over the survivors in
// proportion to their shares, and the sequence depends only on the key and
// the table, so every agent makes the same second choice.
func (p *Pool) Pick(key Key, skip func(*Backend) bool) (*Backend, error) {
	s := p.stateSnap()
	algo := p.opt.Algorithm
	if algo == Maglev && !key.Present {
		algo = p.opt.Fallback
	}
	for i := range s.tiers {
		t := &s.tiers[i]
		if t.availN.Load() == 0 {
			continue
		}
		var b *Backend
		switch algo {
		case Maglev:
			b = p.pickMaglev(t, key.Hash, skip)
		case RoundRobin:
			b = pickRoundRobin(t, skip)
		case LeastConn:
			b = pickLeastConn(t, skip)
		case RandomTwo:
			b = pickRandomTwo(t, skip)
		case First:
			b = pickFirst(t, skip)
		}
		if b != nil {
			return b, nil
		}
	}
	return nil, ErrNoBackend
}

// usable reports whether b may be offered a new connection, MaxConns
// aside.
func usable(b *Backend, skip func(*Backend) bool) bool {
	return b.available() && (skip == nil || !skip(b))
}
