package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Socket and directory modes: root and the group may use the API, nobody
// else may even reach the socket.
const (
	DirMode    fs.FileMode = 0o750
	SocketMode fs.FileMode = 0o660
)

// Server serves a Handler on a Unix socket.
type Server struct {
	path string
	ln   *net.UnixListener
	lock *os.File
	srv  *http.Server
	done chan struct{}
}

// ServerOptions configure Listen.
type ServerOptions struct {
	// Logger receives one line per change made through the API (drain,
	// weight, kill) with the caller's uid and pid. Nil discards.
	Logger *slog.Logger
}

// Listen checks that path is safe to serve, claims it and serves h there
// until Close.
//
// Safety: the socket's directory is created (mode 0750) if missing, and
// refused if it is world-writable without the sticky bit or owned by a user
// other than the agent's or root — anyone who can write there could replace
// the socket and impersonate the agent. A lock file next to the socket
// (path + ".lock", flock) makes a second agent fail with ErrAgentRunning
// even when both start at once. A leftover socket file that nothing answers
// on (the last agent died) is removed; one an agent answers on is
// ErrAgentRunning; anything else at path is an error and is left alone.
func Listen(path string, h Handler, opts ServerOptions) (*Server, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("admin socket %q: must be an absolute path", path)
	}
	dir := filepath.Dir(path)
	if err := ensureDir(dir); err != nil {
		return nil, err
	}
	lock, err := lockFile(path + ".lock")
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			lock.Close()
		}
	}()
	if err := clearStale(path); err != nil {
		return nil, err
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	// Between bind and this chmod the socket has the umask's mode; the
	// 0750 directory keeps others out meanwhile.
	if err := os.Chmod(path, SocketMode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket: setting mode %o: %w", SocketMode, err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{path: path, ln: ln, lock: lock, done: make(chan struct{})}
	s.srv = &http.Server{
		Handler:           routes(h, log),
		ReadHeaderTimeout: 5 * time.Second,
		ConnContext:       withPeer,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	go func() {
		defer close(s.done)
		_ = s.srv.Serve(ln)
	}()
	ok = true
	return s, nil
}

// Path returns the socket's path.
func (s *Server) Path() string { return s.path }

// Close stops serving (requests in progress get up to a second), removes
// the socket file and releases the lock.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		err = s.srv.Close()
	}
	<-s.done
	// The listener unlinks the socket on close; the lock file stays (a
	// lock file removed while another agent waits on it would let two
	// agents in).
	s.lock.Close()
	return err
}

// ensureDir creates dir (0750) if missing and refuses one where another
// user could replace the socket.
func ensureDir(dir string) error {
	st, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, DirMode); err != nil {
			return fmt.Errorf("admin socket: creating directory: %w", err)
		}
		// MkdirAll's mode is filtered by the umask; make it exact.
		if err := os.Chmod(dir, DirMode); err != nil {
			return fmt.Errorf("admin socket: %w", err)
		}
		st, err = os.Stat(dir)
	}
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	return checkDir(dir, st, os.Geteuid())
}

// checkDir refuses a socket directory that others could write to.
func checkDir(dir string, st fs.FileInfo, euid int) error {
	if !st.IsDir() {
		return fmt.Errorf("admin socket: %s is not a directory", dir)
	}
	mode := st.Mode()
	if mode.Perm()&0o002 != 0 && mode&fs.ModeSticky == 0 {
		return fmt.Errorf("admin socket: directory %s is world-writable without the sticky bit, so anyone could replace the socket: use a directory only the agent's user can write, e.g. /run/wsplice (mode 0750)", dir)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		if uid := int(sys.Uid); uid != euid && uid != 0 {
			return fmt.Errorf("admin socket: directory %s is owned by uid %d, not by the agent's user (uid %d) or root: that user could replace the socket; use a directory the agent's user owns", dir, uid, euid)
		}
	}
	return nil
}

// lockFile takes an exclusive, non-blocking flock on path, which the kernel
// releases when the agent exits however it exits.
func lockFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("admin socket: lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: it holds %s", ErrAgentRunning, path)
		}
		return nil, fmt.Errorf("admin socket: locking %s: %w", path, err)
	}
	return f, nil
}

// clearStale removes a socket file left by an agent that died.
func clearStale(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	if st.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("admin socket: %s exists and is not a socket; remove it or choose another admin.socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("%w: %s answers", ErrAgentRunning, path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("admin socket: checking whether %s is stale: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("admin socket: removing stale %s: %w", path, err)
	}
	return nil
}

// peer is the caller's credentials, for the log of changes.
type peer struct{ uid, pid int }

type peerKey struct{}

func withPeer(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *unix.Ucred
	_ = rc.Control(func(fd uintptr) { cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if cred == nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, peer{uid: int(cred.Uid), pid: int(cred.Pid)})
}

func peerAttrs(ctx context.Context) []any {
	p, ok := ctx.Value(peerKey{}).(peer)
	if !ok {
		return nil
	}
	return []any{"uid", p.uid, "pid", p.pid}
}

// maxBody bounds request bodies: they are a few fields.
const maxBody = 64 << 10

func routes(h Handler, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	p := "/" + Version
	mux.HandleFunc("GET "+p+"/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := h.Status(r.Context())
		reply(w, st, err)
	})
	mux.HandleFunc("GET "+p+"/conns", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		tcp, _ := strconv.ParseBool(q.Get("tcp"))
		cs, err := h.Conns(r.Context(), ConnQuery{Backend: q.Get("backend"), Client: q.Get("client"), Route: q.Get("route"), TCP: tcp})
		if cs == nil {
			cs = []Conn{}
		}
		reply(w, cs, err)
	})
	mux.HandleFunc("POST "+p+"/conns/{id}/kill", func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
		if err != nil {
			reply(w, nil, Invalidf("connection id %q is not a number", r.PathValue("id")))
			return
		}
		err = h.Kill(r.Context(), id)
		if err == nil {
			log.Info("admin: connection killed", append([]any{"id", id}, peerAttrs(r.Context())...)...)
		}
		reply(w, struct {
			ID uint64 `json:"id"`
		}{id}, err)
	})
	mux.HandleFunc("GET "+p+"/backends", func(w http.ResponseWriter, r *http.Request) {
		bs, err := h.Backends(r.Context())
		if bs == nil {
			bs = []Backend{}
		}
		reply(w, bs, err)
	})
	for _, verb := range []string{"drain", "undrain", "weight"} {
		mux.HandleFunc("POST "+p+"/backends/"+verb, func(w http.ResponseWriter, r *http.Request) {
			var req backendRequest
			if err := decode(r, &req); err != nil {
				reply(w, nil, err)
				return
			}
			if req.Backend == "" {
				reply(w, nil, Invalidf("name a backend (host:port, host, or pool/host:port)"))
				return
			}
			var bs []Backend
			var err error
			attrs := []any{"backend", req.Backend}
			switch verb {
			case "weight":
				if req.Weight == nil {
					reply(w, nil, Invalidf("weight is missing"))
					return
				}
				if *req.Weight < 0 || *req.Weight > MaxWeight {
					reply(w, nil, Invalidf("weight %d is out of range: use 0 to %d (0 takes the backend out of new selections)", *req.Weight, MaxWeight))
					return
				}
				attrs = append(attrs, "weight", *req.Weight)
				bs, err = h.SetWeight(r.Context(), req.Backend, *req.Weight)
			default:
				var over time.Duration
				if req.CloseOver != "" {
					if over, err = time.ParseDuration(req.CloseOver); err != nil || over < 0 {
						reply(w, nil, Invalidf("close_over %q: write a duration like 5m", req.CloseOver))
						return
					}
					attrs = append(attrs, "close_over", over)
				}
				bs, err = h.Drain(r.Context(), req.Backend, verb == "drain", over)
			}
			if err == nil {
				log.Info("admin: backend "+verb, append(attrs, peerAttrs(r.Context())...)...)
			}
			reply(w, bs, err)
		})
	}
	mux.HandleFunc("POST "+p+"/reload", func(w http.ResponseWriter, r *http.Request) {
		err := h.Reload(r.Context())
		if err == nil {
			log.Info("admin: configuration reloaded", peerAttrs(r.Context())...)
		}
		reply(w, struct{}{}, err)
	})
	for _, verb := range []string{"lameduck", "unlameduck"} {
		mux.HandleFunc("POST "+p+"/"+verb, func(w http.ResponseWriter, r *http.Request) {
			err := h.LameDuck(r.Context(), verb == "lameduck")
			if err == nil {
				log.Info("admin: "+verb, peerAttrs(r.Context())...)
			}
			reply(w, struct{}{}, err)
		})
	}
	mux.HandleFunc("POST "+p+"/upgrade", func(w http.ResponseWriter, r *http.Request) {
		var req UpgradeRequest
		if err := decode(r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		// The new binary runs with the agent's privileges: only those who
		// have them already may choose it (the socket's group may not).
		if req.Binary != "" {
			if p, ok := r.Context().Value(peerKey{}).(peer); !ok || (p.uid != 0 && p.uid != os.Geteuid()) {
				reply(w, nil, Invalidf("only root or the agent's own user may choose the binary (--binary); without it the agent runs its own executable path again"))
				return
			}
		}
		log.Info("admin: upgrade requested", append([]any{"binary", req.Binary}, peerAttrs(r.Context())...)...)
		res, err := h.Upgrade(r.Context(), req)
		if err == nil {
			log.Info("admin: upgraded", append([]any{"new_pid", res.NewPID, "connections", res.Connections}, peerAttrs(r.Context())...)...)
		}
		reply(w, res, err)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, errorBody{Error: fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path)})
	})
	return mux
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return Invalidf("body: %v", err)
	}
	return nil
}

// reply writes v, or err with the status its kind calls for.
func reply(w http.ResponseWriter, v any, err error) {
	switch {
	case err == nil:
		writeJSON(w, http.StatusOK, v)
	case errors.Is(err, ErrNotFound):
		writeJSON(w, http.StatusNotFound, errorBody{Error: err.Error()})
	case errors.Is(err, ErrInvalid):
		writeJSON(w, http.StatusBadRequest, errorBody{Error: err.Error()})
	default:
		writeJSON(w, http.StatusInternalServerError, errorBody{Error: err.Error()})
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
