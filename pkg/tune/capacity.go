package tune

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultSomaxconn is what Somaxconn returns when it cannot read the
// sysctl: the kernel's default since Linux 5.4.
const DefaultSomaxconn = 4096

// Somaxconn returns net.core.somaxconn of the calling thread's network
// namespace: the listen backlog the agent uses, since the kernel caps any
// bigger backlog to it. DefaultSomaxconn if it cannot be read.
func Somaxconn() int { return (&Checker{}).Somaxconn() }

// Somaxconn is Somaxconn under the checker's root.
func (c *Checker) Somaxconn() int {
	s := Setting{Key: "net.core.somaxconn"}
	v, err := c.read(s)
	if err != nil {
		return DefaultSomaxconn
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return DefaultSomaxconn
	}
	return n
}

// PerConnMemory is the kernel and agent memory budgeted per idle proxied
// connection when estimating capacity. Measured here (Linux 6.18, 8,000
// idle loopback TCP sockets each watched by epoll): about 4.3 KiB of slab
// per socket, so 8.6 KiB for the two sockets of a connection; add the
// sockmap psock and map entries, two conntrack entries (~0.3 KiB each) and
// the agent's ~0.85 KiB (DESIGN.md) and round up to 16 KiB. Bytes in
// flight are extra: a busy connection can hold up to its socket buffers,
// and bytes parked by sockmap are bounded only by the demotion mark.
const PerConnMemory = 16 << 10

// Limit is one resource that bounds concurrent connections.
type Limit struct {
	// Name is stable: "fds", "memory", "ports", "conntrack", "epoll",
	// "file-max".
	Name string `json:"name"`
	// MaxConns is how many connections this resource allows.
	MaxConns int `json:"max_conns"`
	// Detail says how MaxConns was computed.
	Detail string `json:"detail"`
}

// CapacityInput says what to estimate capacity for.
type CapacityInput struct {
	// WantConns is the configured global connection limit.
	WantConns int
	// Backends is the number of distinct backend address:port pairs
	// connections are spread over; 0 if unknown (the port limit is then
	// reported per backend but does not bound the total).
	Backends int
	// SourceAddrs is the number of local addresses the agent dials
	// backends from; 0 means 1.
	SourceAddrs int
}

// Capacity is how many connections the host can hold and what limits it.
type Capacity struct {
	WantConns int `json:"want_conns"`
	// MaxConns is the smallest of the limits (and WantConns).
	MaxConns int `json:"max_conns"`
	// LimitedBy names the limit that gives MaxConns, or "config" when the
	// configured WantConns is the smallest.
	LimitedBy string `json:"limited_by"`
	// PortsPerBackend is the size of ip_local_port_range: connections one
	// source address can hold to one backend address:port (0 if unknown).
	PortsPerBackend int     `json:"ports_per_backend"`
	Limits          []Limit `json:"limits"`
}

// String is a one-line summary for a start-up log.
func (c Capacity) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "can hold %d connections (configured %d, limited by %s)", c.MaxConns, c.WantConns, c.LimitedBy)
	for _, l := range c.Limits {
		fmt.Fprintf(&b, "; %s: %d", l.Name, l.MaxConns)
	}
	return b.String()
}

// Capacity estimates how many connections this process can hold, from its
// current RLIMIT_NOFILE (call RaiseNoFile first), memory available to it,
// the ephemeral port range, and, where present, the conntrack table, the
// epoll watch limit and fs.file-max. Unreadable sources are left out.
func (c *Checker) Capacity(in CapacityInput) Capacity {
	capa := Capacity{WantConns: in.WantConns}
	add := func(name string, n int, detail string, args ...any) {
		capa.Limits = append(capa.Limits, Limit{Name: name, MaxConns: max(n, 0), Detail: fmt.Sprintf(detail, args...)})
	}

	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil {
		add("fds", ConnsForNoFile(rl.Cur), "RLIMIT_NOFILE %d: %d per connection + %d headroom", rl.Cur, FDsPerConn, Headroom)
	}

	if avail, src, ok := c.memAvailable(); ok {
		add("memory", int(avail/PerConnMemory), "%d MiB available (%s) / %d KiB per idle connection", avail>>20, src, PerConnMemory>>10)
	}

	if v, err := c.read(Setting{Key: "net.ipv4.ip_local_port_range"}); err == nil {
		if f, err := parseFields(v); err == nil && len(f) == 2 && f[1] >= f[0] {
			capa.PortsPerBackend = int(f[1] - f[0] + 1)
			if in.Backends > 0 {
				src := max(in.SourceAddrs, 1)
				add("ports", capa.PortsPerBackend*in.Backends*src, "ip_local_port_range %s: %d ports × %d backends × %d source addresses", v, capa.PortsPerBackend, in.Backends, src)
			}
		}
	}

	if n, ok := c.readInt("net.netfilter.nf_conntrack_max"); ok {
		used, _ := c.readInt("net.netfilter.nf_conntrack_count")
		add("conntrack", int((n-used)/2), "nf_conntrack_max %d, %d in use, 2 entries per connection (shared with the whole host)", n, used)
	}

	if n, ok := c.readInt("fs.epoll.max_user_watches"); ok {
		add("epoll", int(n/2), "fs.epoll.max_user_watches %d, 2 per connection (shared with the user's other processes)", n)
	}

	if v, err := c.read(Setting{Key: "fs.file-nr"}); err == nil {
		if f, err := parseFields(v); err == nil && len(f) == 3 && f[2] > f[0] {
			add("file-max", int((f[2]-f[0])/FDsPerConn), "fs.file-max %d, %d open on the host, %d per connection", f[2], f[0], FDsPerConn)
		}
	}

	capa.MaxConns, capa.LimitedBy = in.WantConns, "config"
	for _, l := range capa.Limits {
		if l.MaxConns < capa.MaxConns {
			capa.MaxConns, capa.LimitedBy = l.MaxConns, l.Name
		}
	}
	return capa
}

func (c *Checker) readInt(key string) (int64, bool) {
	v, err := c.read(Setting{Key: key})
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return n, err == nil
}

// memAvailable returns MemAvailable from meminfo, or the room left under
// this process's cgroup memory limit if that is smaller: sockets are
// charged to the cgroup of the process that created them.
func (c *Checker) memAvailable() (uint64, string, bool) {
	avail, ok := meminfoAvailable(c.procRoot() + "/meminfo")
	if !ok {
		return 0, "", false
	}
	src := "MemAvailable"
	if room, ok := c.cgroupRoom(); ok && room < avail {
		avail, src = room, "cgroup memory limit"
	}
	return avail, src, true
}

func meminfoAvailable(path string) (uint64, bool) {
	f, err := os.Open(path)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 2 && fs[0] == "MemAvailable:" {
			kb, err := strconv.ParseUint(fs[1], 10, 64)
			return kb << 10, err == nil
		}
	}
	return 0, false
}

// cgroupRoom returns limit − usage of this process's memory cgroup (v2
// memory.max/memory.current, or v1 memory.limit_in_bytes/usage_in_bytes).
func (c *Checker) cgroupRoom() (uint64, bool) {
	b, err := os.ReadFile(c.procRoot() + "/self/cgroup")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		// hierarchy-ID:controller-list:path
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		var limitF, usageF string
		switch {
		case parts[0] == "0" && parts[1] == "":
			limitF = "/sys/fs/cgroup" + parts[2] + "/memory.max"
			usageF = "/sys/fs/cgroup" + parts[2] + "/memory.current"
		case hasController(parts[1], "memory"):
			limitF = "/sys/fs/cgroup/memory" + parts[2] + "/memory.limit_in_bytes"
			usageF = "/sys/fs/cgroup/memory" + parts[2] + "/memory.usage_in_bytes"
		default:
			continue
		}
		limit, ok1 := readUint(limitF)
		usage, ok2 := readUint(usageF)
		if ok1 && ok2 && limit > usage && limit < 1<<60 {
			return limit - usage, true
		}
	}
	return 0, false
}

func hasController(list, name string) bool {
	for _, c := range strings.Split(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}

func readUint(path string) (uint64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return n, err == nil
}
