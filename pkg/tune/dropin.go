package tune

import (
	"bytes"
	"fmt"
)

// DropIn renders Settings as a sysctl.d drop-in: each setting preceded by
// its why, how it is compared and its scope. Info settings are written as
// comments only. Optional settings carry the "-" prefix, which tells
// sysctl(8) and systemd-sysctl to ignore a key the kernel does not have.
//
// sysctl/99-wsplice.conf is this output; a test keeps them identical.
func DropIn() []byte { return renderDropIn(Settings) }

func renderDropIn(ss []Setting) []byte {
	var b bytes.Buffer
	b.WriteString(`# wsplice: kernel settings for holding many concurrent WebSocket connections.
#
# Generated from the table in pkg/tune/settings.go (go generate ./pkg/tune, or
# wsplice tune dropin > 99-wsplice.conf); edit the table, not this file.
# Install: cp 99-wsplice.conf /etc/sysctl.d/ && sysctl --system
# Check a running host: wsplice tune check
#
`)
	b.WriteString("# Sized for about a million connections per host (TargetConns). \"at least\" values are minimums:\n")
	b.WriteString(`# keep any bigger value you already have (wsplice tune apply never lowers one).
# Scope "netns": the kernel keeps one value per network namespace and this file
# sets the host's (init) namespace; an agent in a pod network namespace needs
# them set there. Scope "global": one value for the whole host.
`)
	for _, s := range ss {
		b.WriteString("\n")
		fmt.Fprintf(&b, "# %s\n", s.Why)
		sc := "global"
		if s.PerNetNS {
			sc = "netns"
		}
		if s.Compare == Info {
			fmt.Fprintf(&b, "# (%s; info) %s is not set here: the kernel's value is the recommendation.\n", sc, s.Key)
			continue
		}
		fmt.Fprintf(&b, "# (%s; %s)\n", sc, s.Compare)
		prefix := ""
		if s.Optional {
			prefix = "-"
		}
		fmt.Fprintf(&b, "%s%s = %s\n", prefix, s.Key, s.Recommended)
	}
	return b.Bytes()
}
