package deploy

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	cmd  string // upper case: FROM, RUN, …
	args string
	line int
}

func parseDockerfile(t *testing.T, file string) [][]instruction {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var stages [][]instruction
	var global []instruction
	var cur strings.Builder
	start := 0
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if cur.Len() == 0 && (line == "" || strings.HasPrefix(line, "#")) {
			continue
		}
		if cur.Len() == 0 {
			start = n
		}
		if strings.HasSuffix(line, "\\") {
			cur.WriteString(strings.TrimSuffix(line, "\\") + " ")
			continue
		}
		cur.WriteString(line)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		in := instruction{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args), line: start}
		cur.Reset()
		switch {
		case in.cmd == "FROM":
			stages = append(stages, []instruction{in})
		case len(stages) == 0:
			global = append(global, in)
		default:
			stages[len(stages)-1] = append(stages[len(stages)-1], in)
		}
	}
	if len(stages) > 0 {
		stages[0] = append(global, stages[0]...)
	}
	return stages
}

// goDirective returns the go line of the main module's go.mod ("1.26.0").
func goDirective(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(data)
	if m == nil {
		t.Fatal("../go.mod has no go directive")
	}
	return string(m[1])
}

func TestDockerfile(t *testing.T) {
	stages := parseDockerfile(t, "Dockerfile")
	if len(stages) < 2 {
		t.Fatalf("%d stages: want a multi-stage build (build, then a minimal runtime)", len(stages))
	}
	var all []instruction
	for _, s := range stages {
		all = append(all, s...)
	}

	// The Go version follows go.mod: major.minor of the go directive.
	goVersion := ""
	for _, in := range all {
		if v, ok := strings.CutPrefix(in.args, "GO_VERSION="); ok && in.cmd == "ARG" {
			goVersion = v
		}
	}
	want := goDirective(t)
	if parts := strings.SplitN(want, ".", 3); len(parts) >= 2 {
		want = parts[0] + "." + parts[1]
	}
	if goVersion != want {
		t.Errorf("ARG GO_VERSION=%s, but go.mod says go %s", goVersion, want)
	}

	var build *instruction
	for i, in := range all {
		if in.cmd == "RUN" && strings.Contains(in.args, "go build") {
			build = &all[i]
		}
	}
	if build == nil {
		t.Fatal("no RUN … go build")
	}
	for _, w := range []string{"CGO_ENABLED=0", "-trimpath", "./cmd/wsplice", "-o /out/wsplice"} {
		if !strings.Contains(build.args, w) {
			t.Errorf("line %d: the go build lacks %q (static, reproducible binary)", build.line, w)
		}
	}

	final := stages[len(stages)-1]
	from := strings.Fields(final[0].args)
	base := from[len(from)-1]
	if !strings.HasPrefix(base, "gcr.io/distroless/static") && base != "scratch" {
		t.Errorf("final stage FROM %s: want a libc-free base (distroless static or scratch)", base)
	}
	var user, entry string
	copied := false
	for _, in := range final {
		switch in.cmd {
		case "USER":
			user = in.args
		case "ENTRYPOINT":
			entry = in.args
		case "COPY":
			if strings.Contains(in.args, "--from=build") && strings.Contains(in.args, "/usr/local/bin/wsplice") {
				copied = true
			}
		case "RUN":
			t.Errorf("line %d: RUN in the runtime stage: it has no shell", in.line)
		}
	}
	if !copied {
		t.Error("the runtime stage does not COPY --from=build the binary to /usr/local/bin/wsplice")
	}
	if uid, _, _ := strings.Cut(user, ":"); user == "" || uid == "0" || uid == "root" {
		t.Errorf("USER %q: the image must default to a non-root user", user)
	}
	var argv []string
	if err := json.Unmarshal([]byte(entry), &argv); err != nil || len(argv) == 0 || argv[0] != "/usr/local/bin/wsplice" {
		t.Errorf("ENTRYPOINT %s: want exec form [\"/usr/local/bin/wsplice\"] (there is no shell)", entry)
	}

	// The manifests start the same binary path.
	m := loadManifests(t)
	_, c := m.daemonSet(t)
	if len(c.Command) == 0 || c.Command[0] != "/usr/local/bin/wsplice" {
		t.Errorf("DaemonSet command %q does not run the image's /usr/local/bin/wsplice", c.Command)
	}
}

// stubTools makes a PATH directory holding fake docker/podman/buildah that
// record their arguments; dockerEngine says whether `docker info` succeeds.
func stubTools(t *testing.T, tools []string, dockerEngine bool) (dir, log string) {
	t.Helper()
	dir = t.TempDir()
	log = filepath.Join(dir, "calls.log")
	for _, tool := range tools {
		script := "#!/bin/sh\necho \"" + tool + " $*\" >> " + log + "\n"
		if tool == "docker" {
			script += "if [ \"$1\" = info ]; then exit " + map[bool]string{true: "0", false: "1"}[dockerEngine] + "; fi\n"
		}
		if err := os.WriteFile(filepath.Join(dir, tool), []byte(script+"exit 0\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir, log
}

func TestImageScriptPicksATool(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	abs, _ := filepath.Abs("image.sh")
	for _, tc := range []struct {
		name      string
		tools     []string
		engine    bool
		env       []string
		wantRC    int
		wantBuild string // prefix of the recorded build call
		wantErr   []string
	}{
		{"docker with engine", []string{"docker", "podman"}, true, nil, 0, "docker build -f ", nil},
		{"docker client only, podman present", []string{"docker", "podman", "buildah"}, false, nil, 0, "podman build --ignorefile ",
			[]string{"no Docker engine answers", "building with podman instead"}},
		{"docker client only, buildah present", []string{"docker", "buildah"}, false, nil, 0, "buildah build --ignorefile ",
			[]string{"no Docker engine answers"}},
		{"docker client only", []string{"docker"}, false, nil, 1, "",
			[]string{"no Docker engine answers", "no tool here can build", "apt-get install -y podman", "apt-get install -y buildah"}},
		{"nothing", nil, false, nil, 1, "", []string{"docker:  not installed", "no tool here can build"}},
		{"forced", []string{"docker", "podman", "buildah"}, true, []string{"IMAGE_TOOL=buildah"}, 0, "buildah build ", nil},
		{"bad forced", []string{"docker"}, true, []string{"IMAGE_TOOL=kaniko"}, 2, "", []string{"use docker, podman or buildah"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, log := stubTools(t, tc.tools, tc.engine)
			cmd := exec.Command(sh, abs, "example/wsplice:test")
			// Only the stubs: a real engine on the machine must not be found.
			cmd.Env = append([]string{"PATH=" + dir, "VERSION=v0.0.0-test"}, tc.env...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			rc := 0
			if ee, ok := err.(*exec.ExitError); ok {
				rc = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if rc != tc.wantRC {
				t.Errorf("exit %d, want %d; stderr:\n%s", rc, tc.wantRC, stderr.String())
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr.String())
				}
			}
			calls, _ := os.ReadFile(log)
			var buildCall string
			for _, l := range strings.Split(string(calls), "\n") {
				if strings.Contains(l, " build") {
					buildCall = l
				}
			}
			if tc.wantBuild == "" {
				if buildCall != "" {
					t.Errorf("built although nothing should: %s", buildCall)
				}
				return
			}
			if !strings.HasPrefix(buildCall, tc.wantBuild) {
				t.Fatalf("build call %q, want prefix %q (all calls:\n%s)", buildCall, tc.wantBuild, calls)
			}
			root, _ := filepath.Abs("..")
			for _, w := range []string{"-f " + filepath.Join(root, "deploy", "Dockerfile"), "-t example/wsplice:test", "--build-arg VERSION=v0.0.0-test", " " + root} {
				if !strings.Contains(buildCall, w) {
					t.Errorf("build call %q lacks %q", buildCall, w)
				}
			}
		})
	}
}

// ignoreRules reads Dockerfile.dockerignore. Only the forms the file uses
// are understood ("*", "!dir/", "!file", "**/glob"); a new form fails the
// test so the copy below never silently diverges from a real build.
func ignoreRules(t *testing.T) func(rel string, dir bool) bool {
	t.Helper()
	data, err := os.ReadFile("Dockerfile.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	type rule struct {
		neg  bool
		glob string // matched against the base name when any, else the path
		any  bool   // "**/" prefix
	}
	var rules []rule
	for _, l := range strings.Split(string(data), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		r := rule{}
		if strings.HasPrefix(l, "!") {
			r.neg, l = true, l[1:]
		}
		l = strings.TrimSuffix(l, "/")
		if g, ok := strings.CutPrefix(l, "**/"); ok {
			r.any, l = true, g
		}
		if strings.Contains(l, "**") || (strings.Contains(l, "/") && !r.any) {
			t.Fatalf("Dockerfile.dockerignore: pattern %q is a form this test does not model; extend ignoreRules", l)
		}
		r.glob = l
		rules = append(rules, r)
	}
	// Docker semantics: the last matching rule wins; a path is also
	// excluded or included with its parent unless a later rule says otherwise.
	return func(rel string, _ bool) bool {
		excluded := false
		parts := strings.Split(rel, "/")
		for _, r := range rules {
			match := false
			if r.any {
				for _, p := range parts {
					if ok, _ := path.Match(r.glob, p); ok {
						match = true
					}
				}
			} else if ok, _ := path.Match(r.glob, parts[0]); ok {
				match = true
			}
			if match {
				excluded = !r.neg
			}
		}
		return excluded
	}
}

// TestImageBuildAndConfigCheck does what the Dockerfile's build stage does,
// without a container engine: it copies the build context as
// Dockerfile.dockerignore narrows it, builds ./cmd/wsplice with the same
// flags, and checks that the result is static. Then it runs that binary's
// own validator on both shipped configurations and checks that every
// command the manifests and the unit run exists.
func TestImageBuildAndConfigCheck(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the agent")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	root, _ := filepath.Abs("..")
	ctx := t.TempDir()
	excluded := ignoreRules(t)
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		if excluded(filepath.ToSlash(rel), d.IsDir()) {
			if d.IsDir() && !slices.Contains([]string{"cmd", "pkg"}, rel) {
				return filepath.SkipDir
			}
			return nil
		}
		dst := filepath.Join(ctx, rel)
		if d.IsDir() {
			return os.MkdirAll(dst, 0o755)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, data, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "wsplice")
	build := exec.Command(goBin, "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w -X main.version=test", "-o", bin, "./cmd/wsplice")
	build.Dir = ctx
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off", "GOFLAGS=-mod=readonly")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build in the image's context (only what Dockerfile.dockerignore lets in): %v\n%s", err, out)
	}

	ef, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ef.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the binary has a program interpreter: it is not static and will not run on a libc-free base")
		}
	}
	if libs, _ := ef.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("the binary links %v dynamically", libs)
	}
	ef.Close()

	// The agent's own validator, on both shipped configurations.
	m := loadManifests(t)
	cm, _ := m.agentConfig(t)
	embedded := filepath.Join(t.TempDir(), "configmap-wsplice.yaml")
	for k, v := range cm.Data {
		if strings.HasSuffix(k, ".yaml") {
			if err := os.WriteFile(embedded, []byte(v), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, file := range []string{embedded, unitConfig} {
		out, err := exec.Command(bin, "config", "check", "-c", file).CombinedOutput()
		if err != nil {
			t.Errorf("wsplice config check -c %s: %v\n%s", file, err, out)
		}
	}

	checkCommands(t, bin, m)
}

// pendingCommands are commands the deployment files run that the agent's
// CLI does not have yet. The test reports them instead of failing; when one
// appears, the test fails until it is removed from this list, so the list
// cannot go stale. Each entry is the argv after "wsplice" that must be
// accepted (its --help must succeed and list every flag given).
var pendingCommands = map[string]bool{}

// checkCommands runs `wsplice CMD --help` for every command the manifests
// and the unit use, and checks their flags are known.
func checkCommands(t *testing.T, bin string, m *manifests) {
	t.Helper()
	used := map[string]string{} // argv after wsplice → where
	add := func(where string, argv []string) {
		if len(argv) == 0 || argv[0] != agentBinary {
			return
		}
		// The subcommand words, then every flag (its name only): a word
		// after the first flag is a flag's value (-c FILE), which the
		// config check above covers.
		var words []string
		flags := false
		for _, a := range argv[1:] {
			if strings.HasPrefix(a, "-") {
				flags = true
				name, _, _ := strings.Cut(a, "=")
				words = append(words, name)
			} else if !flags {
				words = append(words, a)
			}
		}
		used[strings.Join(words, " ")] = where
	}
	ds, _ := m.daemonSet(t)
	for _, c := range append(slices.Clone(ds.Spec.Template.Spec.InitContainers), ds.Spec.Template.Spec.Containers...) {
		add("container "+c.Name, append(slices.Clone(c.Command), c.Args...))
		if c.Lifecycle != nil && c.Lifecycle.PreStop != nil && c.Lifecycle.PreStop.Exec != nil {
			add("preStop of "+c.Name, c.Lifecycle.PreStop.Exec.Command)
		}
		for _, p := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe, c.StartupProbe} {
			if p != nil && p.Exec != nil {
				add("probe of "+c.Name, p.Exec.Command)
			}
		}
	}
	u := parseUnit(t, unitFile)
	for _, key := range []string{"ExecStart", "ExecStartPre", "ExecReload", "ExecStop"} {
		for _, v := range u["Service"][key] {
			add(unitFile+" "+key, strings.Fields(strings.TrimLeft(v, "-+!@:")))
		}
	}
	used["upgrade"] = unitFile + " (documented upgrade path)"

	for _, cmdline := range sortedKeys(used) {
		words := strings.Fields(cmdline)
		var sub, flags []string
		for _, w := range words {
			if strings.HasPrefix(w, "-") {
				flags = append(flags, w)
			} else {
				sub = append(sub, w)
			}
		}
		out, err := exec.Command(bin, append(sub, "--help")...).CombinedOutput()
		ok := err == nil && bytes.Contains(out, []byte("Usage:"))
		// cobra prints the parent's help for an unknown subcommand: make
		// sure the usage line names the whole command.
		ok = ok && bytes.Contains(out, []byte("wsplice "+strings.Join(sub, " ")))
		for _, f := range flags {
			ok = ok && bytes.Contains(out, []byte(f))
		}
		switch {
		case ok && pendingCommands[cmdline]:
			t.Errorf("`wsplice %s` (used by %s) exists now: remove it from pendingCommands", cmdline, used[cmdline])
		case !ok && pendingCommands[cmdline]:
			t.Logf("pending: `wsplice %s`, used by %s, is not in the CLI yet", cmdline, used[cmdline])
		case !ok:
			t.Errorf("`wsplice %s`, used by %s, is not a command of the agent's CLI:\n%s", cmdline, used[cmdline], out)
		}
	}
}
