package admin

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"unsafe"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// SockDiag looks up TCP sockets by their 4-tuple with NETLINK_SOCK_DIAG
// (what ss uses) and returns their tcp_info. It needs no file descriptor of
// the socket, so it works for sockets the data planes own, and no
// privilege for sockets of its own network namespace.
//
// It does not use netlink.SocketGet: that asks for a dump (the kernel then
// filters by port only and may return several sockets), does not request
// INET_DIAG_INFO (so no RTT), and picks AF_INET for an IPv4-mapped address
// although a dual-stack listener's sockets are AF_INET6. Here the request
// is an exact lookup (no NLM_F_DUMP) in the socket's own family.
//
// A SockDiag reuses one netlink socket and is safe for concurrent use.
type SockDiag struct {
	mu sync.Mutex
	h  *nl.SocketHandle
}

// OpenSockDiag opens the netlink socket.
func OpenSockDiag() (*SockDiag, error) {
	s, err := nl.GetNetlinkSocketAt(netns.None(), netns.None(), unix.NETLINK_INET_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	tv := unix.Timeval{Sec: 2}
	if err := s.SetReceiveTimeout(&tv); err != nil {
		s.Close()
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	return &SockDiag{h: &nl.SocketHandle{Socket: s}}, nil
}

// Close closes the netlink socket.
func (d *SockDiag) Close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.h != nil {
		d.h.Close()
		d.h = nil
	}
}

// ErrNoSocket is returned by Lookup when no TCP socket has the 4-tuple
// (it closed meanwhile).
var ErrNoSocket = errors.New("sock_diag: no such socket")

// inet_diag constants (linux/inet_diag.h).
const (
	inetDiagInfo    = 2 // INET_DIAG_INFO: struct tcp_info
	sizeofDiagReq   = 56
	sizeofDiagMsg   = 72
	tcpDiagNoCookie = ^uint32(0)
)

// diagReq is struct inet_diag_req_v2 for one socket.
type diagReq struct {
	family        uint8
	local, remote netip.AddrPort
}

func (r *diagReq) Len() int { return sizeofDiagReq }

func (r *diagReq) Serialize() []byte {
	b := make([]byte, sizeofDiagReq)
	b[0] = r.family
	b[1] = unix.IPPROTO_TCP
	b[2] = 1 << (inetDiagInfo - 1) // idiag_ext
	ne := nl.NativeEndian()
	ne.PutUint32(b[4:], 0xfff) // every state
	// struct inet_diag_sockid: ports and addresses in network order.
	binary.BigEndian.PutUint16(b[8:], r.local.Port())
	binary.BigEndian.PutUint16(b[10:], r.remote.Port())
	putAddr(b[12:28], r.local.Addr(), r.family)
	putAddr(b[28:44], r.remote.Addr(), r.family)
	ne.PutUint32(b[44:], 0) // idiag_if
	ne.PutUint32(b[48:], tcpDiagNoCookie)
	ne.PutUint32(b[52:], tcpDiagNoCookie)
	return b
}

func putAddr(b []byte, a netip.Addr, family uint8) {
	if family == unix.AF_INET {
		v4 := a.Unmap().As4()
		copy(b, v4[:])
		return
	}
	v6 := a.As16()
	copy(b, v6[:])
}

// Lookup returns the TCP state of the socket whose own address is local and
// whose peer is remote. The family follows the addresses as Go reports
// them: IPv4 for an AF_INET socket, IPv4-mapped IPv6 (::ffff:a.b.c.d) for
// an IPv4 peer of a dual-stack AF_INET6 socket, IPv6 otherwise.
func (d *SockDiag) Lookup(local, remote netip.AddrPort) (*TCPInfo, error) {
	if !local.IsValid() || !remote.IsValid() {
		return nil, fmt.Errorf("sock_diag: incomplete address %s → %s", local, remote)
	}
	family := uint8(unix.AF_INET6)
	if local.Addr().Is4() && remote.Addr().Is4() {
		family = unix.AF_INET
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.h == nil {
		return nil, errors.New("sock_diag: closed")
	}
	req := nl.NewNetlinkRequest(nl.SOCK_DIAG_BY_FAMILY, 0)
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_INET_DIAG: d.h}
	req.AddData(&diagReq{family: family, local: local, remote: remote})
	msgs, err := req.Execute(unix.NETLINK_INET_DIAG, nl.SOCK_DIAG_BY_FAMILY)
	if errors.Is(err, unix.ENOENT) {
		return nil, ErrNoSocket
	}
	if err != nil {
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	if len(msgs) == 0 {
		return nil, ErrNoSocket
	}
	return parseDiagMsg(msgs[0])
}

// parseDiagMsg reads struct inet_diag_msg and its INET_DIAG_INFO attribute.
func parseDiagMsg(m []byte) (*TCPInfo, error) {
	if len(m) < sizeofDiagMsg {
		return nil, fmt.Errorf("sock_diag: short message (%d bytes)", len(m))
	}
	ne := nl.NativeEndian()
	info := &TCPInfo{
		State:     tcpState(m[1]),
		RecvQueue: ne.Uint32(m[56:]),
		SendQueue: ne.Uint32(m[60:]),
	}
	attrs, err := nl.ParseRouteAttr(m[sizeofDiagMsg:])
	if err != nil {
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	for _, a := range attrs {
		if a.Attr.Type != inetDiagInfo {
			continue
		}
		// The kernel's tcp_info may be shorter (older kernel) or longer
		// (newer) than x/sys's: copy what both know, the rest stays 0.
		var ti unix.TCPInfo
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&ti)), unsafe.Sizeof(ti)), a.Value)
		info.RTTMicros = ti.Rtt
		info.RTTVarUs = ti.Rttvar
		info.MinRTTUs = ti.Min_rtt
		info.Retransmits = ti.Total_retrans
		info.Lost = ti.Lost
		info.Unacked = ti.Unacked
		info.Cwnd = ti.Snd_cwnd
		info.BytesAcked = ti.Bytes_acked
		info.BytesReceived = ti.Bytes_received
	}
	return info, nil
}

// tcpState names a TCP state as ss does.
func tcpState(s uint8) string {
	names := [...]string{1: "ESTAB", 2: "SYN-SENT", 3: "SYN-RECV", 4: "FIN-WAIT-1", 5: "FIN-WAIT-2",
		6: "TIME-WAIT", 7: "CLOSE", 8: "CLOSE-WAIT", 9: "LAST-ACK", 10: "LISTEN", 11: "CLOSING"}
	if int(s) < len(names) && names[s] != "" {
		return names[s]
	}
	return fmt.Sprintf("state-%d", s)
}
