package deploy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// doc is one YAML document of a manifest file.
type doc struct {
	file  string // relative to deploy/
	index int    // position in the file, from 0
	raw   []byte
	// APIVersion and Kind, read before the typed decode.
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
}

func (d doc) String() string { return fmt.Sprintf("%s#%d (%s)", d.file, d.index, d.Kind) }

// readDocs splits every .yaml file under dir (recursively) into documents,
// skipping empty ones (a file that is only comments) and kustomization.yaml,
// which is not an API object.
func readDocs(t *testing.T, dir string) []doc {
	t.Helper()
	var docs []doc
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".yaml") || d.Name() == "kustomization.yaml" {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
		for i := 0; ; i++ {
			raw, err := r.Read()
			if err == io.EOF {
				break
			}
			if err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			if len(bytes.TrimSpace(stripComments(raw))) == 0 {
				continue
			}
			dc := doc{file: path, index: i, raw: raw}
			if err := yaml.Unmarshal(raw, &dc); err != nil {
				return fmt.Errorf("%s#%d: %w", path, i, err)
			}
			docs = append(docs, dc)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(docs) == 0 {
		t.Fatalf("no manifests under %s", dir)
	}
	return docs
}

func stripComments(b []byte) []byte {
	var out [][]byte
	for _, l := range bytes.Split(b, []byte("\n")) {
		if s := bytes.TrimSpace(l); len(s) > 0 && s[0] != '#' && !bytes.Equal(s, []byte("---")) {
			out = append(out, l)
		}
	}
	return bytes.Join(out, []byte("\n"))
}

// decodeStrict decodes a document into a typed object, refusing unknown
// and duplicate fields: a misspelt or misplaced field in a manifest is an
// error here, where kubectl might only warn.
func decodeStrict(t *testing.T, d doc, into any) {
	t.Helper()
	if err := yaml.UnmarshalStrict(d.raw, into); err != nil {
		t.Fatalf("%s: %v", d, err)
	}
}

// agentConfig is the part of the agent's configuration the manifests depend
// on. It is read leniently on purpose: the full schema is the main module's
// (pkg/config), and TestImageBuildAndConfigCheck runs the real validator.
type agentConfig struct {
	Listeners []struct {
		Name    string `json:"name"`
		Address string `json:"address"`
		Mode    string `json:"mode"`
	} `json:"listeners"`
	Pools []struct {
		Name     string `json:"name"`
		Backends []struct {
			Address string `json:"address"`
		} `json:"backends"`
	} `json:"pools"`
	DrainTimeout string `json:"drain_timeout"`
	Metrics      struct {
		Address string `json:"address"`
	} `json:"metrics"`
	Admin struct {
		Socket         string `json:"socket"`
		TakeoverSocket string `json:"takeover_socket"`
	} `json:"admin"`
	Tune struct {
		Mode string `json:"mode"`
	} `json:"tune"`
}

// The defaults of pkg/config that the manifests rely on when a field is
// left out.
const (
	defaultDrainTimeout = 30 * time.Second
	defaultAdminSocket  = "/run/wsplice/admin.sock"
)

func parseAgentConfig(t *testing.T, name string, data []byte) agentConfig {
	t.Helper()
	var c agentConfig
	if err := yaml.Unmarshal(data, &c); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if len(c.Listeners) == 0 || len(c.Pools) == 0 {
		t.Fatalf("%s: no listeners or no pools", name)
	}
	return c
}

func (c agentConfig) drainTimeout(t *testing.T) time.Duration {
	t.Helper()
	if c.DrainTimeout == "" {
		return defaultDrainTimeout
	}
	d, err := parseConfigDuration(c.DrainTimeout)
	if err != nil {
		t.Fatalf("drain_timeout: %v", err)
	}
	return d
}

func (c agentConfig) adminSocket() string {
	if c.Admin.Socket == "" {
		return defaultAdminSocket
	}
	return c.Admin.Socket
}

// parseConfigDuration reads durations the way the agent's config does:
// Go syntax ("30s", "1m30s"), days ("7d") or plain seconds ("30").
func parseConfigDuration(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	if days, ok := strings.CutSuffix(s, "d"); ok {
		if n, err := strconv.ParseFloat(days, 64); err == nil && n >= 0 {
			return time.Duration(n * float64(24*time.Hour)), nil
		}
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("invalid duration %q", s)
	}
	return d, nil
}

// portOf returns the numeric port of a host:port address.
func portOf(t *testing.T, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		t.Fatalf("address %q: bad port", addr)
	}
	return int32(n)
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
