package dataplane

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// spPipe is one pipe pair used as the kernel-side buffer of splice(2).
// n counts the bytes spliced in and not yet spliced out; it is exact because
// splice returns either a byte count or an error, never both.
type spPipe struct {
	r, w int // read and write ends, both O_NONBLOCK|O_CLOEXEC
	cap  int // capacity in bytes as reported by F_SETPIPE_SZ/F_GETPIPE_SZ
	n    int // bytes currently held
}

func (p *spPipe) spClose() {
	unix.Close(p.r)
	unix.Close(p.w)
}

// spPipePool lends pipes to the directions that are moving bytes right now.
// It keeps at most max empty pipes; a pipe is only ever put back while empty,
// anything else is closed, so a reused pipe never carries a stale byte of
// another connection into this one.
type spPipePool struct {
	size int // requested capacity (F_SETPIPE_SZ), best effort

	mu     sync.Mutex
	free   []*spPipe
	max    int
	closed bool
	live   int // pipes created and not yet closed (lent + free)
}

// spGet lends a pipe, creating one when the pool is empty.
func (pp *spPipePool) spGet() (*spPipe, error) {
	pp.mu.Lock()
	if k := len(pp.free); k > 0 {
		p := pp.free[k-1]
		pp.free[k-1] = nil
		pp.free = pp.free[:k-1]
		pp.mu.Unlock()
		return p, nil
	}
	pp.live++
	pp.mu.Unlock()

	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		pp.mu.Lock()
		pp.live--
		pp.mu.Unlock()
		return nil, fmt.Errorf("creating splice pipe: %w", err)
	}
	p := &spPipe{r: fds[0], w: fds[1]}
	// F_SETPIPE_SZ returns the size actually set (rounded up to a power of
	// two pages). It fails for an unprivileged user above
	// /proc/sys/fs/pipe-max-size or over pipe-user-pages-soft; the pipe then
	// keeps whatever the kernel gave it, so ask for that instead.
	c, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, pp.size)
	if err != nil {
		c, err = unix.FcntlInt(uintptr(p.w), unix.F_GETPIPE_SZ, 0)
	}
	if err != nil || c <= 0 {
		c = 4096 // one page: the kernel's floor for any pipe
	}
	p.cap = c
	return p, nil
}

// spPut takes back a lent pipe. A pipe that still holds bytes (its
// connection was torn down mid-copy) is closed, never reused.
func (pp *spPipePool) spPut(p *spPipe) {
	pp.mu.Lock()
	if p.n == 0 && !pp.closed && len(pp.free) < pp.max {
		pp.free = append(pp.free, p)
		pp.mu.Unlock()
		return
	}
	pp.live--
	pp.mu.Unlock()
	p.spClose()
}

// spCloseAll closes every idle pipe; pipes put back later are closed too.
func (pp *spPipePool) spCloseAll() {
	pp.mu.Lock()
	free := pp.free
	pp.free = nil
	pp.closed = true
	pp.live -= len(free)
	pp.mu.Unlock()
	for _, p := range free {
		p.spClose()
	}
}

// spCounts returns the idle pipes in the pool and all pipes alive.
func (pp *spPipePool) spCounts() (idle, live int) {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	return len(pp.free), pp.live
}
