package admin

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// WriteJSON writes v as indented JSON, the -o json output.
func WriteJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0) }

// WriteStatus writes s for people: one aspect per line.
func WriteStatus(w io.Writer, s Status, now time.Time) error {
	tw := newTable(w)
	state := "running"
	if s.Draining {
		state = "draining"
	}
	fmt.Fprintf(tw, "agent\t%s (pid %d, version %s, up %s)\n", state, s.PID, s.Version, Age(now.Sub(s.Started)))
	plane := s.Dataplane
	if plane == "sockmap" {
		plane = "sockmap (in-kernel), splice as fallback"
	}
	fmt.Fprintf(tw, "dataplane\t%s\n", plane)
	for i, l := range s.Listeners {
		label := ""
		if i == 0 {
			label = "listeners"
		}
		fmt.Fprintf(tw, "%s\t%s %s (%s, %s)\n", label, l.Name, l.Address, l.Mode, l.Dataplane)
	}
	c := s.Connections
	fmt.Fprintf(tw, "connections\t%d established (sockmap %d, splice %d, demoted %d, tls %d)\n", c.Active, c.Sockmap, c.Splice, c.Demoted, c.TLS)
	k := s.Counters
	fmt.Fprintf(tw, "since start\t%d accepted, %d established, %d backend connect failures, %d sockmap→splice fallbacks\n",
		k.Accepted, k.Established, k.ConnectFails, k.PlaneFallbacks)
	fmt.Fprintf(tw, "refusals\t%s\n", countList(k.Refusals))
	for i, p := range s.Pools {
		label := ""
		if i == 0 {
			label = "pools"
		}
		extra := ""
		if p.Draining > 0 {
			extra = fmt.Sprintf(", %d draining", p.Draining)
		}
		fmt.Fprintf(tw, "%s\t%s: %d/%d backends up%s, %d connections\n", label, p.Name, p.Up, p.Backends, extra, p.Active)
	}
	if sm := s.Sockmap; sm != nil {
		fmt.Fprintf(tw, "sockmap\t%d on the kernel path, %d demoted, %s parked; demotions: %s; integrity resets %d, insert failures %d, redirect failures %d\n",
			sm.Active, sm.Demoted, Bytes(uint64(max(sm.ParkedBytes, 0))), countList(sm.Demotions), sm.IntegrityResets, sm.InsertFailures, sm.RedirectFailures)
	}
	if s.Metrics != "" {
		fmt.Fprintf(tw, "metrics\thttp://%s/metrics\n", s.Metrics)
	}
	return tw.Flush()
}

// countList formats a map of counts as "a 1, b 2", sorted, or "none".
func countList(m map[string]uint64) string {
	var parts []string
	for _, k := range sortedKeys(m) {
		if m[k] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
		}
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

func sortedKeys(m map[string]uint64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// ConnSortKeys are the keys SortConns accepts.
var ConnSortKeys = []string{"id", "age", "idle", "in", "out", "bytes", "rtt", "client", "backend"}

// SortConns sorts cs by key: id (oldest first), client, backend, or
// largest first for age, idle, in (bytes to the backend), out (bytes to
// the client), bytes (both) and rtt (client side).
func SortConns(cs []Conn, key string) error {
	var f func(a, b Conn) int
	desc := func(g func(Conn) float64) func(a, b Conn) int {
		return func(a, b Conn) int { return cmp.Compare(g(b), g(a)) }
	}
	switch key {
	case "", "id":
		f = func(a, b Conn) int { return cmp.Compare(a.ID, b.ID) }
	case "age":
		f = desc(func(c Conn) float64 { return c.AgeSeconds })
	case "idle":
		f = desc(func(c Conn) float64 { return c.IdleSeconds })
	case "in":
		f = desc(func(c Conn) float64 { return float64(c.BytesToBackend) })
	case "out":
		f = desc(func(c Conn) float64 { return float64(c.BytesToClient) })
	case "bytes":
		f = desc(func(c Conn) float64 { return float64(c.BytesToBackend + c.BytesToClient) })
	case "rtt":
		f = desc(func(c Conn) float64 {
			if c.ClientTCP == nil {
				return -1
			}
			return float64(c.ClientTCP.RTTMicros)
		})
	case "client":
		f = func(a, b Conn) int { return cmp.Compare(a.Client, b.Client) }
	case "backend":
		f = func(a, b Conn) int { return cmp.Compare(a.Backend, b.Backend) }
	default:
		return Invalidf("cannot sort by %q: use one of %s", key, strings.Join(ConnSortKeys, ", "))
	}
	slices.SortStableFunc(cs, f)
	return nil
}

// WriteConns writes cs like ss: one connection per line. IN is bytes from
// the client to the backend, OUT from the backend to the client; RTT is
// the smoothed round-trip time of the client's and the backend's socket.
func WriteConns(w io.Writer, cs []Conn) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "ID\tCLIENT\tBACKEND\tROUTE\tPLANE\tAGE\tIDLE\tIN\tOUT\tRTT(C)\tRTT(B)\tRETR")
	for _, c := range cs {
		plane := c.Dataplane
		if c.Demoted {
			plane += "*"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", c.ID, c.Client, c.Backend, c.Route, plane,
			Age(secs(c.AgeSeconds)), Age(secs(c.IdleSeconds)), Bytes(c.BytesToBackend), Bytes(c.BytesToClient),
			rtt(c.ClientTCP), rtt(c.BackendTCP), retr(c.ClientTCP, c.BackendTCP))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, c := range cs {
		if c.Demoted {
			_, err := fmt.Fprintln(w, "* demoted from sockmap to splice")
			return err
		}
	}
	return nil
}

func secs(f float64) time.Duration { return time.Duration(f * float64(time.Second)) }

func rtt(t *TCPInfo) string {
	if t == nil {
		return "-"
	}
	return fmt.Sprintf("%.2fms", float64(t.RTTMicros)/1000)
}

func retr(c, b *TCPInfo) string {
	if c == nil && b == nil {
		return "-"
	}
	n := uint32(0)
	if c != nil {
		n += c.Retransmits
	}
	if b != nil {
		n += b.Retransmits
	}
	return fmt.Sprint(n)
}

// WriteBackends writes bs, one backend per line, with its last state
// changes.
func WriteBackends(w io.Writer, bs []Backend, now time.Time) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "POOL\tBACKEND\tSTATE\tWEIGHT\tACTIVE\tHISTORY")
	for _, b := range bs {
		state := b.State
		if b.Backup {
			state += " (backup)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\n", b.Pool, b.Address, state, b.Weight, b.Active, history(b.History, now))
	}
	return tw.Flush()
}

// history formats the last three transitions, newest first:
// "draining 2m ago (admin), up 1h ago".
func history(h []Transition, now time.Time) string {
	if len(h) == 0 {
		return "-"
	}
	var parts []string
	for i, t := range h {
		if i == 3 {
			parts = append(parts, fmt.Sprintf("+%d more", len(h)-3))
			break
		}
		s := fmt.Sprintf("%s %s ago", t.State, Age(now.Sub(t.Time)))
		switch {
		case t.Cause == "admin" && t.Reason != "":
			s += " (admin: " + t.Reason + ")"
		case t.Cause == "admin":
			s += " (admin)"
		case t.Reason != "":
			s += " (" + t.Reason + ")"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}

// Age formats a duration the way ss and kubectl do: two units at most.
func Age(d time.Duration) string {
	switch {
	case d < 0:
		d = 0
		fallthrough
	case d < time.Second:
		return fmt.Sprintf("%dms", d.Milliseconds())
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh%dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd%dh", int(d.Hours())/24, int(d.Hours())%24)
}

// Bytes formats n with binary units: 512B, 1.5K, 3.2M, 1.0G.
func Bytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%c", float64(n)/float64(div), "KMGTP"[exp])
}
