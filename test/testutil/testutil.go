// Package testutil holds helpers shared by wsplice's tests: the privilege
// gate that skips on a laptop but fails in CI, and per-test network
// namespaces so tests that change sysctls never touch the host.
package testutil

import (
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// InCI reports whether the CI environment variable is set (to anything but
// "" or "false").
func InCI() bool {
	v := os.Getenv("CI")
	return v != "" && v != "false" && v != "0"
}

// RequirePrivileged skips the test unless the process has the capabilities
// wsplice's privileged paths need (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and
// CAP_SYS_ADMIN for namespaces). In CI a missing privilege is a failure:
// privileged tests must run there.
func RequirePrivileged(tb testing.TB) {
	tb.Helper()
	missing := missingCaps()
	if missing == "" {
		return
	}
	if InCI() {
		tb.Fatalf("privileged test cannot run: missing %s (CI must run as root)", missing)
	}
	tb.Skipf("skipping privileged test: missing %s (run as root)", missing)
}

func missingCaps() string {
	var hdr = unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return "capget: " + err.Error()
	}
	has := func(c uint) bool { return data[c/32].Effective&(1<<(c%32)) != 0 }
	for _, c := range []struct {
		n    uint
		name string
	}{{unix.CAP_NET_ADMIN, "CAP_NET_ADMIN"}, {unix.CAP_SYS_ADMIN, "CAP_SYS_ADMIN"}, {unix.CAP_BPF, "CAP_BPF"}, {unix.CAP_PERFMON, "CAP_PERFMON"}} {
		if !has(c.n) {
			return c.name
		}
	}
	return ""
}

// InNetNS runs fn on a locked OS thread inside a new network namespace with
// loopback up, then returns the thread to the original namespace. Anything
// fn opens on that thread (sockets, /proc/sys/net files) belongs to the new
// namespace; goroutines fn starts do not, so keep namespace work on fn's
// own goroutine. The namespace disappears when its last socket closes.
func InNetNS(tb testing.TB, fn func()) {
	tb.Helper()
	RequirePrivileged(tb)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		// The thread is not unlocked: if restoring the namespace failed it
		// must die with the goroutine rather than serve other goroutines.
		orig, err := netns.Get()
		if err != nil {
			tb.Errorf("netns get: %v", err)
			return
		}
		defer orig.Close()
		ns, err := netns.New()
		if err != nil {
			tb.Errorf("netns new: %v", err)
			return
		}
		defer ns.Close()
		ok := false
		defer func() {
			if err := netns.Set(orig); err == nil && ok {
				runtime.UnlockOSThread()
			}
		}()
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			tb.Errorf("lo: %v", err)
			return
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			tb.Errorf("lo up: %v", err)
			return
		}
		fn()
		ok = true
	}()
	<-done
	if tb.Failed() {
		tb.FailNow()
	}
}
