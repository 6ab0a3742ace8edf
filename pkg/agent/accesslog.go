package agent

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/wsplice/wsplice/pkg/config"
	"github.com/wsplice/wsplice/pkg/dataplane"
	"github.com/wsplice/wsplice/pkg/proxy"
)

// accessLog writes one line per connection at close, like nginx's
// access_log, with what an operator needs to explain a connection.
type accessLog struct {
	log  *slog.Logger // nil when off
	file *os.File     // owned, when writing to a file
}

func openAccessLog(c config.Log) (*accessLog, error) {
	var w io.Writer
	al := &accessLog{}
	switch c.Access {
	case "":
		return al, nil
	case "stdout":
		w = os.Stdout
	case "stderr":
		w = os.Stderr
	default:
		f, err := os.OpenFile(c.Access, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		if err != nil {
			return nil, fmt.Errorf("opening access log: %w", err)
		}
		al.file = f
		w = f
	}
	opts := &slog.HandlerOptions{ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		if a.Key == slog.LevelKey {
			return slog.Attr{}
		}
		return a
	}}
	if c.Format == "json" {
		al.log = slog.New(slog.NewJSONHandler(w, opts))
	} else {
		al.log = slog.New(slog.NewTextHandler(w, opts))
	}
	return al, nil
}

// write logs one closed connection.
func (al *accessLog) write(c *proxy.Conn, r dataplane.Result) {
	if al == nil || al.log == nil {
		return
	}
	al.log.Info("conn",
		"id", c.ID, "listener", c.Listener, "client", c.Client.String(), "route", c.Route,
		"pool", c.Pool, "backend", c.Backend, "status", c.Status, "dataplane", string(r.Plane),
		"demoted", r.Demoted, "bytes_in", r.ClientToBackend.Bytes, "bytes_out", r.BackendToClient.Bytes,
		"duration", time.Since(c.Start).Round(time.Microsecond).String(), "handshake", c.Handshake.Round(time.Microsecond).String(),
		"reason", string(r.Reason))
}

func (al *accessLog) close() {
	if al != nil && al.file != nil {
		al.file.Close()
	}
}
