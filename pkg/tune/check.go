package tune

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultRoot is where the kernel's sysctls live.
const DefaultRoot = "/proc/sys"

// DefaultStatePath is where apply records the values it replaced.
const DefaultStatePath = "/var/lib/wsplice/tune-originals.json"

// Verdict is the outcome of checking one setting. Values are stable: they
// appear in tables, JSON and logs.
type Verdict string

const (
	// VerdictOK: the current value meets the recommendation.
	VerdictOK Verdict = "ok"
	// VerdictLow: the current value falls short (below an "at least", above
	// an "at most", different from an "exact", narrower than a range);
	// apply will change it.
	VerdictLow Verdict = "low"
	// VerdictMissing: the kernel has no such file here — a module is not
	// loaded, or the setting is global and invisible in this network
	// namespace. Never fatal.
	VerdictMissing Verdict = "missing"
	// VerdictReadOnly: the value falls short but cannot be written here
	// (a global setting seen from a child network namespace, /proc/sys
	// mounted read-only, no permission). Never fatal.
	VerdictReadOnly Verdict = "read-only"
	// VerdictError: the file could not be read or parsed.
	VerdictError Verdict = "error"
	// VerdictInfo: shown for the operator's judgement only (Compare Info).
	VerdictInfo Verdict = "info"
)

// Result is one setting as check found it.
type Result struct {
	Key         string  `json:"key"`
	Scope       string  `json:"scope"` // "netns" (per network namespace) or "global"
	Current     string  `json:"current"`
	Recommended string  `json:"recommended"`
	Compare     Compare `json:"compare"`
	Verdict     Verdict `json:"verdict"`
	// Target is the value apply writes; set only when Verdict is low or
	// read-only.
	Target string `json:"target,omitempty"`
	// Detail explains a missing, read-only or error verdict.
	Detail string `json:"detail,omitempty"`
	Why    string `json:"why"`
}

// Checker reads, compares, applies and reverts Settings under a sysctl
// root. The zero value uses /proc/sys, Settings and DefaultStatePath.
//
// Files under /proc/sys/net belong to the network namespace of the thread
// that opens them. A Checker does all its work on the calling goroutine, so
// a caller that has locked its thread into a namespace gets that namespace.
type Checker struct {
	// Root is the sysctl tree; "" means DefaultRoot. Tests point it at a
	// fake tree so global (fs.*) settings are never written.
	Root string
	// Settings is the table to use; nil means Settings.
	Settings []Setting
	// StatePath is the JSON file apply records originals in and revert
	// restores from; "" means DefaultStatePath.
	StatePath string
	// ProcRoot is where meminfo and sys/fs/… for Capacity are read; ""
	// means "/proc".
	ProcRoot string

	// Hooks for tests; nil means the real thing.
	writeFile func(path string, data []byte) error
	writable  func(path string) error
	netnsID   func() string
}

func (c *Checker) root() string {
	if c.Root == "" {
		return DefaultRoot
	}
	return strings.TrimRight(c.Root, "/")
}

func (c *Checker) settings() []Setting {
	if c.Settings == nil {
		return Settings
	}
	return c.Settings
}

func (c *Checker) statePath() string {
	if c.StatePath == "" {
		return DefaultStatePath
	}
	return c.StatePath
}

func (c *Checker) procRoot() string {
	if c.ProcRoot == "" {
		return "/proc"
	}
	return strings.TrimRight(c.ProcRoot, "/")
}

func (c *Checker) write(path, value string) error {
	data := []byte(value + "\n")
	if c.writeFile != nil {
		return c.writeFile(path, data)
	}
	return writeSysctl(path, data)
}

// writeSysctl writes data with one write at offset 0: the kernel parses a
// sysctl per write call. O_TRUNC matters only for a fake tree.
func writeSysctl(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// canWrite reports whether path may be written, without writing it.
// access(2) on /proc/sys asks the sysctl's own permission check, which
// denies a 0444 file even to root, and reports EROFS for a read-only mount.
func (c *Checker) canWrite(path string) error {
	if c.writable != nil {
		return c.writable(path)
	}
	return unix.Access(path, unix.W_OK)
}

// NetNSID returns the network namespace of the calling thread as the kernel
// names it ("net:[4026531840]"), or "" if it cannot be read.
func NetNSID() string {
	id, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		return ""
	}
	return id
}

func (c *Checker) nsID() string {
	if c.netnsID != nil {
		return c.netnsID()
	}
	return NetNSID()
}

func scope(s Setting) string {
	if s.PerNetNS {
		return "netns"
	}
	return "global"
}

func isReadOnlyErr(err error) bool {
	return errors.Is(err, fs.ErrPermission) || errors.Is(err, unix.EROFS) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES)
}

// read returns the current value of s, normalized, and an error wrapping
// fs.ErrNotExist when the kernel has no such file.
func (c *Checker) read(s Setting) (string, error) {
	b, err := os.ReadFile(s.path(c.root()))
	if err != nil {
		return "", err
	}
	return normalize(string(b)), nil
}

func missingDetail(s Setting) string {
	switch {
	case s.Optional:
		return "not present (the module that provides it is not loaded)"
	case !s.PerNetNS && strings.HasPrefix(s.Key, "net."):
		return "not present in this network namespace: the setting is global, set it on the host"
	}
	return "not present in this kernel"
}

// checkOne judges one setting. It never fails: problems become verdicts.
func (c *Checker) checkOne(s Setting) Result {
	r := Result{Key: s.Key, Scope: scope(s), Recommended: s.Recommended, Compare: s.Compare, Why: s.Why}
	cur, err := c.read(s)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		r.Verdict, r.Detail = VerdictMissing, missingDetail(s)
		return r
	case err != nil:
		r.Verdict, r.Detail = VerdictError, err.Error()
		return r
	}
	r.Current = cur
	if s.Compare == Info {
		r.Verdict = VerdictInfo
		return r
	}
	ok, target, err := s.judge(cur)
	switch {
	case err != nil:
		r.Verdict, r.Detail = VerdictError, err.Error()
	case ok:
		r.Verdict = VerdictOK
	default:
		r.Target = target
		r.Verdict = VerdictLow
		if werr := c.canWrite(s.path(c.root())); werr != nil {
			r.Verdict = VerdictReadOnly
			r.Detail = readOnlyDetail(s, werr)
		}
	}
	return r
}

func readOnlyDetail(s Setting, err error) string {
	if !s.PerNetNS && strings.HasPrefix(s.Key, "net.") {
		return fmt.Sprintf("cannot write here (%v): the setting is global, set it on the host", err)
	}
	return fmt.Sprintf("cannot write here (%v)", err)
}

// Check reads every setting and compares it with the recommendation. A
// missing, read-only or unreadable setting is a verdict, never an error.
func (c *Checker) Check() []Result {
	ss := c.settings()
	out := make([]Result, 0, len(ss))
	for _, s := range ss {
		out = append(out, c.checkOne(s))
	}
	return out
}

// NeedsChange reports whether any result falls short of its recommendation
// (low or read-only).
func NeedsChange(rs []Result) bool {
	for _, r := range rs {
		if r.Verdict == VerdictLow || r.Verdict == VerdictReadOnly {
			return true
		}
	}
	return false
}
