package main

// The targets: each one is a listening address in front of the echo
// backends. Proxies run as child processes in the foreground with configs
// written to a temporary directory, pinned to the proxy core, and are
// stopped by PID at the end.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	nginxBin   = "/usr/sbin/nginx"
	haproxyBin = "/usr/sbin/haproxy"
	// haproxyMaxconn is HAProxy's global maxconn: with 2 fds per
	// connection and maxpipes 500 it fits the 20000 hard limit.
	haproxyMaxconn = 9000
)

// target is one thing the generator talks to.
type target struct {
	Name string
	Desc string
	Addr string
	cmd  *exec.Cmd
	log  *bytes.Buffer
	// Skip says why the target is not measured ("" when it is).
	Skip string
	// BulkOnly targets take part in bulk and slow-reader tests only (they
	// differ from another target only in how bulk flows are handled).
	BulkOnly bool
	// TLS targets terminate TLS (clients do a TLS handshake first, with
	// the run's self-signed certificate); they take part in the idle test
	// only.
	TLS bool
}

// PID is the proxy's process ID (0 for direct).
func (t *target) PID() int {
	if t.cmd == nil || t.cmd.Process == nil {
		return 0
	}
	return t.cmd.Process.Pid
}

// freePort returns a loopback port nobody listens on right now.
func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// pinned prefixes argv with taskset when pinning is on.
func pinned(cpu string, argv ...string) []string {
	if cpu == "" {
		return argv
	}
	return append([]string{"taskset", "-c", cpu}, argv...)
}

// startProc starts argv with output captured, in its own process group so
// a Ctrl-C to the harness reaches the harness first and it stops the child
// by PID.
func (t *target) startProc(argv []string) error {
	t.log = &bytes.Buffer{}
	t.cmd = exec.Command(argv[0], argv[1:]...)
	t.cmd.Stdout = t.log
	t.cmd.Stderr = t.log
	t.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return t.cmd.Start()
}

// waitReady waits until a WebSocket echo through the target works.
func (t *target) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if t.cmd != nil && t.cmd.ProcessState != nil {
			break
		}
		c, br, _, err := wsDialTLS(t.Addr, "/echo", 2*time.Second, t.TLS)
		if err == nil {
			payload := make([]byte, 64)
			err = echoOnce(c, br, clientFrame(opBinary, payload), payload, make([]byte, 64), 7)
			c.Close()
			if err == nil {
				return nil
			}
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	out := ""
	if t.log != nil {
		out = tail(t.log.String(), 600)
	}
	return fmt.Errorf("not ready after %s: %v; output: %s", timeout, last, out)
}

func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		s = "…" + s[len(s)-n:]
	}
	return strings.ReplaceAll(s, "\n", " | ")
}

// stop ends the target's process by PID: SIGTERM, then SIGKILL after 5 s.
func (t *target) stop() {
	if t.cmd == nil || t.cmd.Process == nil {
		return
	}
	done := make(chan struct{})
	go func() { _ = t.cmd.Wait(); close(done) }()
	_ = t.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = t.cmd.Process.Kill()
		<-done
	}
}

// setup holds what starting targets needs.
type setup struct {
	dir      string   // temporary directory for configs
	wsplice  string   // agent binary ("" if it could not be built)
	backends []string // backend addresses
	proxyCPU string   // taskset CPU list for proxies ("" = unpinned)
	// cert and key are the PEM files of the self-signed certificate the
	// TLS targets serve (written to dir on first use).
	cert, key string
}

// tlsFiles writes the run's self-signed certificate (ECDSA P-256) and key
// into dir once, and returns their paths.
func (s *setup) tlsFiles() (cert, key string, err error) {
	if s.cert != "" {
		return s.cert, s.key, nil
	}
	certPEM, keyPEM, err := selfSigned()
	if err != nil {
		return "", "", err
	}
	cert, key = filepath.Join(s.dir, "tls-cert.pem"), filepath.Join(s.dir, "tls-key.pem")
	if err := os.WriteFile(cert, certPEM, 0o644); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(key, keyPEM, 0o600); err != nil {
		return "", "", err
	}
	s.cert, s.key = cert, key
	return cert, key, nil
}

// selfSigned returns a self-signed ECDSA P-256 certificate for localhost
// and 127.0.0.1, valid for a day, and its key, both PEM.
func selfSigned() (certPEM, keyPEM []byte, err error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "localhost"},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return nil, nil, err
	}
	kder, err := x509.MarshalECPrivateKey(priv)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), nil
}

// prebuilt is bin/wsplice when it is newer than every source it is built
// from (make bench builds it first), else "".
func prebuilt() string {
	const bin = "bin/wsplice"
	st, err := os.Stat(bin)
	if err != nil {
		return ""
	}
	stale := false
	for _, root := range []string{"cmd", "pkg", "bpf", "go.mod", "go.sum"} {
		_ = filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err != nil || stale {
				return nil
			}
			if d.IsDir() {
				return nil
			}
			if fi, err := d.Info(); err == nil && fi.ModTime().After(st.ModTime()) {
				stale = true
			}
			return nil
		})
	}
	if stale {
		return ""
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		return ""
	}
	return abs
}

// buildWsplice builds the agent from the module in the working directory.
func buildWsplice(dir string) (string, error) {
	out := filepath.Join(dir, "wsplice")
	ctx, cancel := context.WithTimeout(bgCtx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", out, "./cmd/wsplice")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/wsplice: %v: %s", err, tail(string(b), 400))
	}
	return out, nil
}

// newTargets lists every target in the order of the table.
func newTargets() []*target {
	return []*target{
		{Name: "direct", Desc: "no proxy: client to backend"},
		{Name: "wsplice-sockmap", Desc: "wsplice, sockmap data plane, default config (demotes bulk flows to splice at 4 MiB parked)"},
		{Name: "wsplice-sockmap-pure", Desc: "wsplice, sockmap with sockmap.parked_high_water = 1 TiB (never demotes)", BulkOnly: true},
		{Name: "wsplice-splice", Desc: "wsplice, splice data plane"},
		{Name: "nginx", Desc: "nginx, WebSocket guide config (proxy_buffering off, 3600s timeouts, worker_processes auto)"},
		{Name: "nginx-tuned", Desc: "nginx as above with proxy_buffer_size 256k, proxy_buffers 8 256k"},
		{Name: "haproxy", Desc: "HAProxy, mode http, timeout tunnel 3600s"},
		{Name: "haproxy-splice", Desc: "HAProxy as above with option splice-auto"},
		{Name: "wsplice-tls", Desc: "wsplice terminating TLS on the listener (self-signed ECDSA P-256 certificate; terminated connections move on the copy plane), splice as the default plane; idle test only", TLS: true},
		{Name: "nginx-tls", Desc: "nginx as the nginx target with `listen … ssl` and the same certificate; idle test only", TLS: true},
	}
}

// start starts t (or sets t.Skip) and waits until it proxies.
func (s *setup) start(t *target) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	t.Addr = port
	switch {
	case t.Name == "direct":
		t.Addr = s.backends[0]
		return t.waitReady(5 * time.Second)
	case strings.HasPrefix(t.Name, "wsplice"):
		if s.wsplice == "" {
			t.Skip = "the wsplice binary could not be built"
			return nil
		}
		// A config file per agent: each needs its own admin socket (or
		// none), or the second agent refuses to start.
		plane, parked := strings.TrimPrefix(t.Name, "wsplice-"), int64(0)
		if t.Name == "wsplice-sockmap-pure" {
			plane, parked = "sockmap", int64(1)<<40
		}
		cfg := ""
		if t.TLS {
			cert, key, err := s.tlsFiles()
			if err != nil {
				return err
			}
			cfg = wspliceConfig(t.Addr, s.backends, "splice", 0, cert, key)
		} else {
			cfg = wspliceConfig(t.Addr, s.backends, plane, parked, "", "")
		}
		file := filepath.Join(s.dir, t.Name+".yaml")
		if err := os.WriteFile(file, []byte(cfg), 0o644); err != nil {
			return err
		}
		argv := []string{s.wsplice, "run", "-c", file}
		if err := t.startProc(pinned(s.proxyCPU, argv...)); err != nil {
			return err
		}
	case strings.HasPrefix(t.Name, "nginx"):
		if !haveBinary(nginxBin) {
			t.Skip = nginxBin + " is not installed (make deps installs it)"
			return nil
		}
		dir := filepath.Join(s.dir, t.Name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		var cert, key string
		if t.TLS {
			if cert, key, err = s.tlsFiles(); err != nil {
				return err
			}
		}
		file := filepath.Join(dir, "nginx.conf")
		if err := os.WriteFile(file, []byte(nginxConfig(dir, t.Addr, s.backends, t.Name == "nginx-tuned", cert, key)), 0o644); err != nil {
			return err
		}
		if err := t.startProc(pinned(s.proxyCPU, nginxBin, "-g", "daemon off;", "-c", file, "-p", dir, "-e", filepath.Join(dir, "error.log"))); err != nil {
			return err
		}
	case strings.HasPrefix(t.Name, "haproxy"):
		if !haveBinary(haproxyBin) {
			t.Skip = haproxyBin + " is not installed (make deps installs it)"
			return nil
		}
		file := filepath.Join(s.dir, t.Name+".cfg")
		if err := os.WriteFile(file, []byte(haproxyConfig(t.Addr, s.backends, t.Name == "haproxy-splice")), 0o644); err != nil {
			return err
		}
		if err := t.startProc(pinned(s.proxyCPU, haproxyBin, "-f", file, "-db")); err != nil {
			return err
		}
	default:
		return errors.New("unknown target " + t.Name)
	}
	return t.waitReady(10 * time.Second)
}

// wspliceConfig is an agent on one data plane with round robin over the
// backends, no admin socket and no host tuning. parked > 0 sets
// sockmap.parked_high_water (1 TiB = "pure sockmap": demotion by parked
// bytes effectively off; the rate trigger is off by default). cert and key,
// when set, add a tls block that terminates TLS on the listener.
func wspliceConfig(addr string, backends []string, plane string, parked int64, cert, key string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "dataplane: %s\n", plane)
	if parked > 0 {
		fmt.Fprintf(&b, "sockmap:\n  parked_high_water: %d\n  rate_limit: 0\n", parked)
	}
	fmt.Fprintf(&b, "admin:\n  socket: none\ntune:\n  mode: \"off\"\nlog:\n  level: warn\n")
	fmt.Fprintf(&b, "listeners:\n  - address: %q\n    pool: p\n", addr)
	if cert != "" {
		fmt.Fprintf(&b, "    tls:\n      certificates:\n        - cert: %q\n          key: %q\n", cert, key)
	}
	fmt.Fprintf(&b, "pools:\n  - name: p\n    balance: round_robin\n    backends:\n")
	for _, be := range backends {
		fmt.Fprintf(&b, "      - address: %q\n", be)
	}
	return b.String()
}

// nginxConfig follows the nginx WebSocket proxying guide; tuned adds
// larger proxy buffers; cert and key, when set, terminate TLS (listen …
// ssl). The file limits fit the 20000 hard limit.
func nginxConfig(dir, addr string, backends []string, tuned bool, cert, key string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `worker_processes auto;
worker_rlimit_nofile 20000;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events {
    worker_connections 19000;
    multi_accept on;
}
http {
    access_log off;
    client_body_temp_path %[1]s/client_body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
    map $http_upgrade $connection_upgrade {
        default upgrade;
        ''      close;
    }
    upstream ws {
`, dir)
	for _, be := range backends {
		fmt.Fprintf(&b, "        server %s;\n", be)
	}
	ssl := ""
	if cert != "" {
		ssl = " ssl"
	}
	fmt.Fprintf(&b, `    }
    server {
        listen %s%s backlog=4096;
`, addr, ssl)
	if cert != "" {
		// nginx 1.22's default ssl_protocols lacks TLSv1.3, which the
		// idle clients require (both TLS targets are measured on 1.3).
		fmt.Fprintf(&b, "        ssl_certificate %s;\n        ssl_certificate_key %s;\n        ssl_protocols TLSv1.2 TLSv1.3;\n", cert, key)
	}
	b.WriteString(`        location / {
            proxy_pass http://ws;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
`)
	if tuned {
		b.WriteString(`            proxy_buffer_size 256k;
            proxy_buffers 8 256k;
            proxy_busy_buffers_size 512k;
`)
	}
	b.WriteString("        }\n    }\n}\n")
	return b.String()
}

// haproxyConfig is HAProxy in http mode with a long tunnel timeout (the
// WebSocket setup of HAProxy's documentation); splice adds option
// splice-auto. HAProxy refuses to start unless 2 × maxconn + 2 × maxpipes
// (+ a few) fds fit the 20000 hard limit.
func haproxyConfig(addr string, backends []string, splice bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "global\n    maxconn %d\n", haproxyMaxconn)
	b.WriteString(`    maxpipes 500
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout tunnel 3600s
`)
	if splice {
		b.WriteString("    option splice-auto\n")
	}
	fmt.Fprintf(&b, `frontend fe
    bind %s
    default_backend be
backend be
    balance roundrobin
`, addr)
	for i, be := range backends {
		fmt.Fprintf(&b, "    server b%d %s\n", i+1, be)
	}
	return b.String()
}

// startBackends starts the echo backend subprocess (not pinned: it shares
// the machine with whichever side is less busy, the same for every target).
// It returns the backend addresses and the stats address.
func startBackends(n int) (*exec.Cmd, []string, string, func(), error) {
	cmd := exec.Command(selfExe(), "-role", "backend", "-n", strconv.Itoa(n))
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, "", nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, "", nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, "", nil, err
	}
	stop := func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	line := make([]byte, 512)
	n2, err := stdout.Read(line)
	if err != nil {
		stop()
		return nil, nil, "", nil, fmt.Errorf("backends: %w", err)
	}
	f := strings.Fields(string(line[:n2]))
	if len(f) < 3 || f[0] != "ready" {
		stop()
		return nil, nil, "", nil, fmt.Errorf("backends said %q", string(line[:n2]))
	}
	return cmd, f[2:], f[1], stop, nil
}
