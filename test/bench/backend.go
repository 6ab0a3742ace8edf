package main

// The echo backends: one subprocess serving several loopback ports, so the
// backends' CPU, memory and file descriptors are apart from the generator's
// and the proxy's. The request path picks what a connection does:
//
//	/echo                       echo every message back (and the close handshake)
//	/sink?tag=T                 discard; ack the byte count every ackEvery bytes
//	                            and add it to counter T (read on the stats port)
//	/slow?rate=B&dur=D&tag=T    like /sink, but read B bytes/s and close after D

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ackEvery is how often (in payload bytes) a sink reports what it received.
const ackEvery = 1 << 20

// received counts the payload bytes each sink connection read, by the tag
// in its URL, so the generator can measure at the receiver even when a
// proxy holds the reverse direction (the acks).
var received sync.Map // tag → *atomic.Uint64

func counter(tag string) *atomic.Uint64 {
	if tag == "" {
		return new(atomic.Uint64)
	}
	v, _ := received.LoadOrStore(tag, new(atomic.Uint64))
	return v.(*atomic.Uint64)
}

// serveStats answers "TAG\n" with the bytes the sinks tagged TAG read.
func serveStats(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			br := bufio.NewReader(c)
			for {
				tag, err := br.ReadString('\n')
				if err != nil {
					return
				}
				var total uint64
				if v, ok := received.Load(strings.TrimSpace(tag)); ok {
					total = v.(*atomic.Uint64).Load()
				}
				if _, err := fmt.Fprintf(c, "%d\n", total); err != nil {
					return
				}
			}
		}()
	}
}

// runBackend listens on n loopback ports and a stats port, prints "ready
// STATS ADDR..." and serves until stdin closes (the harness holds the other
// end of the pipe, so the backends die with it).
func runBackend(n int) error {
	stats, err := listenTCP("127.0.0.1:0")
	if err != nil {
		return err
	}
	go serveStats(stats)
	addrs := []string{stats.Addr().String()}
	var lns []net.Listener
	for range n {
		ln, err := listenTCP("127.0.0.1:0")
		if err != nil {
			return err
		}
		lns = append(lns, ln)
		addrs = append(addrs, ln.Addr().String())
	}
	for _, ln := range lns {
		go func(ln net.Listener) {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go serveWS(c)
			}
		}(ln)
	}
	fmt.Printf("ready %s\n", strings.Join(addrs, " "))
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// listenTCP listens with a large backlog and without MPTCP.
func listenTCP(addr string) (net.Listener, error) {
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	return lc.Listen(bgCtx, "tcp", addr)
}

func serveWS(c net.Conn) {
	defer c.Close()
	br := bufio.NewReaderSize(c, 16<<10)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	lines, err := readHead(br)
	if err != nil || len(lines) == 0 {
		return
	}
	parts := strings.Fields(lines[0])
	if len(parts) != 3 || parts[0] != "GET" {
		_, _ = io.WriteString(c, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		return
	}
	key := header(lines, "Sec-WebSocket-Key")
	if key == "" || !strings.EqualFold(header(lines, "Upgrade"), "websocket") {
		_, _ = io.WriteString(c, "HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	if _, err := io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "+acceptKey(key)+"\r\n\r\n"); err != nil {
		return
	}
	u, err := url.ParseRequestURI(parts[1])
	if err != nil {
		return
	}
	switch u.Path {
	case "/sink":
		sink(c, br, 0, 0, counter(u.Query().Get("tag")))
	case "/slow":
		q := u.Query()
		rate, _ := strconv.ParseInt(q.Get("rate"), 10, 64)
		dur, _ := time.ParseDuration(q.Get("dur"))
		sink(c, br, rate, dur, counter(q.Get("tag")))
	default:
		echo(c, br)
	}
}

// echo sends every data frame back unmasked and answers close and ping.
func echo(c net.Conn, br *bufio.Reader) {
	in := make([]byte, 4096)
	out := make([]byte, 14+4096)
	for {
		f, err := readFrameHeader(br)
		if err != nil {
			return
		}
		if f.n > len(in) {
			in = make([]byte, f.n)
			out = make([]byte, 14+f.n)
		}
		p := in[:f.n]
		if _, err := io.ReadFull(br, p); err != nil {
			return
		}
		if f.masked {
			maskBytes(p, f.key[:])
		}
		switch f.op {
		case opClose:
			_, _ = c.Write(closeFrame(false))
			return // the server closes the TCP connection first (RFC 6455 7.1.1)
		case opPong:
			continue
		case opPing:
			f.op = opPong
		}
		h := frameHeader(out, f.op, f.n, nil)
		copy(out[h:], p)
		if _, err := c.Write(out[:h+f.n]); err != nil {
			return
		}
	}
}

// sink discards data frames, reading at most rate bytes/s when rate > 0,
// and acks the payload total every ackEvery bytes. With dur > 0 it closes
// the connection after dur (a slow reader gives up; the unread bytes make
// the close an RST, which frees whatever a proxy parked for it). Every
// payload byte read is added to count.
func sink(c net.Conn, br *bufio.Reader, rate int64, dur time.Duration, count *atomic.Uint64) {
	var wmu sync.Mutex
	ack := func(total uint64) bool {
		var b [10]byte
		frameHeader(b[:], opBinary, 8, nil)
		binary.BigEndian.PutUint64(b[2:], total)
		wmu.Lock()
		defer wmu.Unlock()
		_, err := c.Write(b[:])
		return err == nil
	}
	if dur > 0 {
		t := time.AfterFunc(dur, func() { c.Close() })
		defer t.Stop()
	}
	buf := make([]byte, 256<<10)
	chunk := len(buf)
	if rate > 0 && int64(chunk) > rate/20 {
		chunk = max(int(rate/20), 1024) // about 20 reads a second
	}
	start := time.Now()
	var total, nextAck uint64 = 0, ackEvery
	for {
		f, err := readFrameHeader(br)
		if err != nil {
			return
		}
		left := f.n
		for left > 0 {
			n, err := br.Read(buf[:min(left, chunk)])
			if err != nil {
				return
			}
			left -= n
			total += uint64(n)
			count.Add(uint64(n))
			if rate > 0 {
				due := start.Add(time.Duration(float64(total) / float64(rate) * float64(time.Second)))
				if d := time.Until(due); d > 0 {
					time.Sleep(d)
				}
			}
			if total >= nextAck {
				if !ack(total) {
					return
				}
				nextAck = total + ackEvery
			}
		}
		if f.op == opClose {
			wmu.Lock()
			_, _ = c.Write(closeFrame(false))
			wmu.Unlock()
			return
		}
	}
}
