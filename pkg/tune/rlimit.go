package tune

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Headroom is the number of file descriptors RaiseNoFile reserves beyond
// two per connection: listeners, the admin socket and its clients, metrics
// and health-check connections, BPF map, program and link fds, epoll, log
// files, and the pipes the splice fallback borrows while bytes move (two
// per moving direction). 1024 covers a few hundred of those at once.
const Headroom = 1024

// FDsPerConn is the number of file descriptors one proxied connection holds
// on either data plane: the client socket and the backend socket.
const FDsPerConn = 2

// NoFileNeed returns the RLIMIT_NOFILE that conns connections need.
func NoFileNeed(conns int) uint64 { return uint64(FDsPerConn)*uint64(max(conns, 0)) + Headroom }

// ConnsForNoFile returns how many connections a limit of n descriptors
// holds: (n - Headroom) / 2, at least 0.
func ConnsForNoFile(n uint64) int {
	if n <= Headroom {
		return 0
	}
	return int((n - Headroom) / FDsPerConn)
}

// NoFileResult is what RaiseNoFile found and did.
type NoFileResult struct {
	WantConns  int    `json:"want_conns"`
	Need       uint64 `json:"need"` // NoFileNeed(WantConns)
	SoftBefore uint64 `json:"soft_before"`
	HardBefore uint64 `json:"hard_before"`
	Soft       uint64 `json:"soft"` // after
	Hard       uint64 `json:"hard"` // after
	// NrOpen is fs.nr_open, the ceiling of any hard limit (0 if unreadable).
	NrOpen uint64 `json:"nr_open"`
	// CapSysResource says whether the process may raise its hard limit.
	CapSysResource bool `json:"cap_sys_resource"`
	// MaxConns is the number of connections the agent may accept: WantConns
	// when the limit suffices, else ConnsForNoFile(Soft).
	MaxConns int  `json:"max_conns"`
	Capped   bool `json:"capped"`
	// Message says, when Capped, what limits the agent and how to fix it.
	Message string `json:"message,omitempty"`
}

// rlimitSys is the kernel interface RaiseNoFile uses; tests replace it.
type rlimitSys interface {
	get() (cur, max uint64, err error)
	set(cur, max uint64) error
	capSysResource() bool
	nrOpen() uint64
}

type realRlimit struct{}

func (realRlimit) get() (uint64, uint64, error) {
	var r unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &r); err != nil {
		return 0, 0, err
	}
	return r.Cur, r.Max, nil
}

func (realRlimit) set(cur, max uint64) error {
	return unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: cur, Max: max})
}

func (realRlimit) capSysResource() bool { return HasCap(unix.CAP_SYS_RESOURCE) }

func (realRlimit) nrOpen() uint64 {
	b, err := os.ReadFile("/proc/sys/fs/nr_open")
	if err != nil {
		return 0
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0
	}
	return n
}

// HasCap reports whether capability c (unix.CAP_*) is in the calling
// thread's effective set, as capget(2) reports it.
func HasCap(c uint) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[c/32].Effective&(1<<(c%32)) != 0
}

// RaiseNoFile makes RLIMIT_NOFILE big enough for wantConns connections:
// need = 2 × wantConns + Headroom. It raises the soft limit to need (never
// lowering it), and the hard limit too when it is below need and the
// process has CAP_SYS_RESOURCE (never above fs.nr_open, which the kernel
// enforces). When the limit stays below need, the result is Capped, its
// MaxConns is what the limit holds — the agent must cap its connections to
// it rather than fail at accept time — and Message says why and how to fix
// it. The error is for a failing getrlimit/setrlimit only.
func RaiseNoFile(wantConns int) (NoFileResult, error) {
	return raiseNoFile(realRlimit{}, wantConns)
}

func raiseNoFile(sys rlimitSys, wantConns int) (NoFileResult, error) {
	res := NoFileResult{WantConns: wantConns, Need: NoFileNeed(wantConns), MaxConns: wantConns}
	cur, hard, err := sys.get()
	if err != nil {
		return res, fmt.Errorf("reading RLIMIT_NOFILE: %w", err)
	}
	res.SoftBefore, res.HardBefore, res.Soft, res.Hard = cur, hard, cur, hard
	res.CapSysResource = sys.capSysResource()
	res.NrOpen = sys.nrOpen()

	var raiseErr error
	if hard < res.Need && res.CapSysResource {
		newHard := res.Need
		if res.NrOpen > 0 && newHard > res.NrOpen {
			newHard = res.NrOpen
		}
		if newHard > hard {
			if err := sys.set(max(cur, newHard), newHard); err != nil {
				raiseErr = err
			} else {
				cur, hard = max(cur, newHard), newHard
			}
		}
	}
	if want := min(res.Need, hard); cur < want {
		if err := sys.set(want, hard); err != nil {
			return res, fmt.Errorf("raising the RLIMIT_NOFILE soft limit from %d to %d: %w", cur, want, err)
		}
		cur = want
	}
	res.Soft, res.Hard = cur, hard
	if cur >= res.Need {
		return res, nil
	}
	res.Capped = true
	res.MaxConns = ConnsForNoFile(cur)
	res.Message = noFileMessage(res, raiseErr)
	return res, nil
}

func noFileMessage(r NoFileResult, raiseErr error) string {
	var b strings.Builder
	fmt.Fprintf(&b, "the open-file hard limit (RLIMIT_NOFILE) is %d but the agent needs %d for %d connections (%d per connection + %d headroom)",
		r.Hard, r.Need, r.WantConns, FDsPerConn, Headroom)
	switch {
	case !r.CapSysResource:
		b.WriteString("; CAP_SYS_RESOURCE is missing, so the agent cannot raise the hard limit itself")
	case raiseErr != nil:
		fmt.Fprintf(&b, "; raising it failed: %v", raiseErr)
	case r.NrOpen > 0 && r.NrOpen < r.Need:
		fmt.Fprintf(&b, "; the agent has CAP_SYS_RESOURCE but fs.nr_open (%d) stops the hard limit there", r.NrOpen)
	}
	fmt.Fprintf(&b, ". Max connections capped to %d. ", r.MaxConns)
	fmt.Fprintf(&b, "To fix, raise the hard limit to at least %d where wsplice is started: ", r.Need)
	fmt.Fprintf(&b, "systemd: LimitNOFILE=%d in the unit's [Service] section (systemctl edit wsplice); ", r.Need)
	fmt.Fprintf(&b, "Docker: --ulimit nofile=%d:%d; ", r.Need, r.Need)
	b.WriteString("Kubernetes: a pod spec cannot set rlimits (securityContext has no such field), containers inherit the container runtime's limit — " +
		"set LimitNOFILE= in containerd.service (containerd 2.0 dropped its own, leaving systemd's default 1024:524288) or default_ulimits in CRI-O's crio.conf, " +
		"or add CAP_SYS_RESOURCE to the container's securityContext.capabilities (a privileged container has it) so the agent raises the limit itself; ")
	fmt.Fprintf(&b, "shell: ulimit -Hn %d (as root) in the shell that starts it. ", r.Need)
	if r.NrOpen > 0 {
		fmt.Fprintf(&b, "No hard limit can exceed fs.nr_open (now %d)", r.NrOpen)
		if r.NrOpen < r.Need {
			fmt.Fprintf(&b, ": raise it first, e.g. sysctl -w fs.nr_open=%d or the sysctl/99-wsplice.conf drop-in", nextPow2(r.Need))
		}
		b.WriteString(".")
	} else {
		b.WriteString("No hard limit can exceed fs.nr_open.")
	}
	return b.String()
}

func nextPow2(n uint64) uint64 {
	p := uint64(1)
	for p < n {
		p <<= 1
	}
	return p
}
