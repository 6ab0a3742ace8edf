// Package tune reads, compares and applies the kernel settings and process
// limits that decide how many concurrent sockets a wsplice host can hold.
//
// One table, Settings, is the single source of truth: `wsplice tune check`
// compares the running kernel against it, `wsplice tune apply` writes what
// falls short, and the sysctl.d drop-in (sysctl/99-wsplice.conf) is rendered
// from it (a test compares the committed file byte for byte; regenerate it
// with `go generate ./pkg/tune` or `wsplice tune dropin`).
//
// The package knows nothing about sockets or the data plane; the agent asks
// it at start-up for the open-file limit it needs (RaiseNoFile), the listen
// backlog (Somaxconn) and a capacity report (Checker.Capacity).
package tune

import (
	"fmt"
	"strconv"
	"strings"
)

//go:generate go run ./internal/gendropin ../../sysctl/99-wsplice.conf

// TargetConns is the number of concurrent client connections per host the
// recommended values are sized for. Each proxied connection is two sockets
// (client and backend side), so two file descriptors, two epoll watches and,
// where connection tracking is on, two conntrack entries.
const TargetConns = 1_000_000

// Compare says how a current value is judged against a recommendation.
type Compare int

const (
	// AtLeast: every field of the current value must be ≥ the recommended
	// one. Used for sizes: apply never lowers a bigger value an operator chose.
	AtLeast Compare = iota + 1
	// AtMost: the current value must be ≤ the recommendation (timeouts).
	AtMost
	// Exact: the current value must equal the recommendation (switches).
	Exact
	// Range: a "low high" pair that must contain the recommended range.
	// Apply widens the current range to the union; it never narrows it.
	Range
	// Info: shown by check for the operator's judgement, never applied, and
	// written to the drop-in only as a comment.
	Info
)

// String returns the name used in tables, JSON and the drop-in.
func (c Compare) String() string {
	switch c {
	case AtLeast:
		return "at least"
	case AtMost:
		return "at most"
	case Exact:
		return "exact"
	case Range:
		return "range"
	case Info:
		return "info"
	}
	return "unknown"
}

// MarshalText makes Compare appear by name in JSON.
func (c Compare) MarshalText() ([]byte, error) { return []byte(c.String()), nil }

// Setting is one kernel setting wsplice has an opinion about.
type Setting struct {
	// Key is the dotted sysctl name, e.g. "net.core.somaxconn".
	Key string
	// Recommended is the value in sysctl's own syntax: an integer, or
	// space-separated integers for multi-field settings. For Info settings
	// it is empty (the kernel's default is the recommendation).
	Recommended string
	// Why is one line: what the setting bounds and why wsplice wants this.
	Why string
	// Compare says how the current value is judged.
	Compare Compare
	// PerNetNS is true when the kernel keeps one value per network
	// namespace: it applies to the namespace the agent runs in (with
	// hostNetwork that is the host's). Otherwise the setting is global; a
	// child network namespace sees it read-only or not at all.
	PerNetNS bool
	// Optional settings exist only when a module is loaded
	// (nf_conntrack); their absence is normal, reported as "not present".
	Optional bool
}

// Settings is the table `tune check`, `tune apply` and the drop-in are made
// from. Order is the order of the drop-in and of check's output.
var Settings = []Setting{
	// Accepting many connections.
	{
		Key: "net.core.somaxconn", Recommended: "65535", Compare: AtLeast, PerNetNS: true,
		Why: "caps every listen(2) backlog (wsplice listens with it): a reconnect storm overflows a short accept queue and clients wait for SYN retransmits (1 s, 3 s, 7 s)",
	},
	{
		Key: "net.ipv4.tcp_max_syn_backlog", Recommended: "65535", Compare: AtLeast, PerNetNS: true,
		Why: "half-open (SYN_RECV) connections: with syncookies off, unproven SYNs are dropped as the queue nears this (with them on, the listen backlog bounds it); kept equal to somaxconn",
	},
	{
		Key: "net.ipv4.tcp_syncookies", Recommended: "1", Compare: Exact, PerNetNS: true,
		Why: "when the SYN queue overflows (a flood or a reconnect storm), answer with cookies instead of dropping new clients; 2 would send cookies even without overflow",
	},
	{
		Key: "net.core.netdev_max_backlog", Recommended: "16384", Compare: AtLeast,
		Why: "per-CPU queue of received packets waiting for the stack (loopback, veth, RPS); a burst past it is dropped (column 2 of /proc/net/softnet_stat)",
	},
	// Connections to backends.
	{
		Key: "net.ipv4.ip_local_port_range", Recommended: "1024 65535", Compare: Range, PerNetNS: true,
		Why: "ephemeral ports for dials to backends: one source address holds at most this many connections to one backend address:port",
	},
	{
		Key: "net.ipv4.tcp_tw_reuse", Recommended: "1", Compare: Exact, PerNetNS: true,
		Why: "lets dials to backends reuse a TIME_WAIT port when timestamps prove it safe (default 2 allows it only on loopback); tcp_tw_recycle is gone since Linux 4.12 because it broke clients behind NAT",
	},
	{
		Key: "net.ipv4.tcp_timestamps", Recommended: "1", Compare: AtLeast, PerNetNS: true,
		Why: "tcp_tw_reuse relies on TCP timestamps to reuse TIME_WAIT ports safely (1 or 2 both enable them)",
	},
	{
		Key: "net.ipv4.tcp_fin_timeout", Recommended: "15", Compare: AtMost, PerNetNS: true,
		Why: "seconds an orphaned (already closed) socket waits in FIN_WAIT_2 for a vanished peer; half-closes the agent still holds are not affected; TIME_WAIT stays 60 s whatever this says",
	},
	// Long-lived, bursty streams.
	{
		Key: "net.ipv4.tcp_slow_start_after_idle", Recommended: "0", Compare: Exact, PerNetNS: true,
		Why: "WebSockets idle between bursts; with 1 every burst after an idle RTO restarts from the initial congestion window",
	},
	// Socket memory.
	{
		Key: "net.core.rmem_max", Recommended: "1048576", Compare: AtLeast,
		Why: "caps SO_RCVBUF: the sockmap data plane sets 1 MiB on both sockets and would silently get less",
	},
	{
		Key: "net.core.wmem_max", Recommended: "1048576", Compare: AtLeast,
		Why: "caps SO_SNDBUF; kept equal to rmem_max so a buffer size set by the data plane or an operator is honoured both ways",
	},
	{
		Key: "net.ipv4.tcp_rmem", Compare: Info, PerNetNS: true,
		Why: "min/default/max receive buffer; keep the kernel's: an idle WebSocket holds no buffer memory, raising the default raises every busy connection's cost",
	},
	{
		Key: "net.ipv4.tcp_wmem", Compare: Info, PerNetNS: true,
		Why: "min/default/max send buffer; keep the kernel's for the same reason as tcp_rmem",
	},
	{
		Key: "net.ipv4.tcp_mem", Compare: Info,
		Why: "pages of memory all TCP sockets may use (low/pressure/max), sized from RAM at boot; raise only if dmesg says \"TCP: out of memory\" (bytes parked by sockmap are not counted here)",
	},
	// Connection tracking, when the module is loaded.
	{
		Key: "net.netfilter.nf_conntrack_max", Recommended: "1048576", Compare: AtLeast, Optional: true,
		Why: "each proxied connection is two tracked flows; when the table is full new connections are dropped (\"nf_conntrack: table full\")",
	},
	// Files and epoll.
	{
		Key: "fs.nr_open", Recommended: "2097152", Compare: AtLeast,
		Why: "ceiling for any process's RLIMIT_NOFILE: 2 fds per connection plus headroom for a million connections",
	},
	{
		Key: "fs.file-max", Recommended: "4194304", Compare: AtLeast,
		Why: "open files on the whole host: the agent's two million plus everything else; a file costs memory only while open",
	},
	{
		Key: "fs.epoll.max_user_watches", Recommended: "4194304", Compare: AtLeast,
		Why: "the agent watches both sockets of every connection with epoll (close detection); the limit is per user, shared with other processes of that user",
	},
}

// Lookup returns the setting named key from Settings.
func Lookup(key string) (Setting, bool) {
	for _, s := range Settings {
		if s.Key == key {
			return s, true
		}
	}
	return Setting{}, false
}

// path returns the file of key under root: dots become slashes.
func (s Setting) path(root string) string {
	return root + "/" + strings.ReplaceAll(s.Key, ".", "/")
}

// parseFields parses a sysctl value: whitespace-separated integers.
func parseFields(v string) ([]int64, error) {
	fs := strings.Fields(v)
	if len(fs) == 0 {
		return nil, fmt.Errorf("empty value")
	}
	out := make([]int64, len(fs))
	for i, f := range fs {
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("field %d of %q is not an integer", i+1, v)
		}
		out[i] = n
	}
	return out, nil
}

func formatFields(v []int64) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.FormatInt(n, 10)
	}
	return strings.Join(s, " ")
}

// normalize returns v with its fields separated by single spaces (the
// kernel prints tabs between fields).
func normalize(v string) string { return strings.Join(strings.Fields(v), " ") }

// judge compares current with the recommendation. It returns whether the
// current value is good enough and, when it is not, the value apply writes:
// for AtLeast the field-wise maximum, for Range the union of both ranges,
// otherwise the recommendation.
func (s Setting) judge(current string) (ok bool, target string, err error) {
	if s.Compare == Info {
		return true, "", nil
	}
	cur, err := parseFields(current)
	if err != nil {
		return false, "", fmt.Errorf("reading %s: %w", s.Key, err)
	}
	rec, err := parseFields(s.Recommended)
	if err != nil {
		return false, "", fmt.Errorf("bad recommendation for %s: %w", s.Key, err)
	}
	if len(cur) != len(rec) {
		return false, "", fmt.Errorf("%s has %d fields, expected %d", s.Key, len(cur), len(rec))
	}
	want := make([]int64, len(rec))
	ok = true
	switch s.Compare {
	case AtLeast:
		for i := range rec {
			want[i] = max(cur[i], rec[i])
			ok = ok && cur[i] >= rec[i]
		}
	case AtMost:
		for i := range rec {
			want[i] = min(cur[i], rec[i])
			ok = ok && cur[i] <= rec[i]
		}
	case Exact:
		for i := range rec {
			want[i] = rec[i]
			ok = ok && cur[i] == rec[i]
		}
	case Range:
		if len(rec) != 2 {
			return false, "", fmt.Errorf("range %s needs two fields", s.Key)
		}
		want[0], want[1] = min(cur[0], rec[0]), max(cur[1], rec[1])
		ok = cur[0] <= rec[0] && cur[1] >= rec[1]
	default:
		return false, "", fmt.Errorf("%s: unknown comparison %d", s.Key, s.Compare)
	}
	if ok {
		return true, "", nil
	}
	return false, formatFields(want), nil
}
