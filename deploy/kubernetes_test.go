package deploy

import (
	"encoding/json"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

const (
	k8sDir    = "kubernetes"
	namespace = "wsplice"
	// drainMargin is how much longer than drain_timeout the kubelet must
	// wait before SIGKILL: the preStop hook, the agent's shutdown after the
	// drain, and scheduling slack all come out of the grace period.
	drainMargin = 10 * time.Second
	// minTakeoverWait is the least minReadySeconds that covers a take-over
	// (a few seconds for thousands of connections) with room to spare: until
	// it ends, the new pod's probes are answered by the old agent.
	minTakeoverWait = 10 * time.Second
)

// agentCaps are the capabilities the agent container adds: exactly these.
var agentCaps = []string{"BPF", "NET_ADMIN", "NET_BIND_SERVICE", "PERFMON", "SYS_RESOURCE"}

// manifests is every object of deploy/kubernetes, decoded strictly.
type manifests struct {
	docs            []doc
	namespaces      []corev1.Namespace
	serviceAccounts []corev1.ServiceAccount
	configMaps      []corev1.ConfigMap
	services        map[string]corev1.Service // by file-less key namespace/name
	daemonSets      []appsv1.DaemonSet
	serviceMonitors []unstructured.Unstructured
}

func loadManifests(t *testing.T) *manifests {
	t.Helper()
	m := &manifests{services: map[string]corev1.Service{}}
	m.docs = readDocs(t, k8sDir)
	for _, d := range m.docs {
		switch d.APIVersion + "/" + d.Kind {
		case "v1/Namespace":
			var o corev1.Namespace
			decodeStrict(t, d, &o)
			m.namespaces = append(m.namespaces, o)
		case "v1/ServiceAccount":
			var o corev1.ServiceAccount
			decodeStrict(t, d, &o)
			m.serviceAccounts = append(m.serviceAccounts, o)
		case "v1/ConfigMap":
			var o corev1.ConfigMap
			decodeStrict(t, d, &o)
			m.configMaps = append(m.configMaps, o)
		case "v1/Service":
			var o corev1.Service
			decodeStrict(t, d, &o)
			m.services[o.Namespace+"/"+o.Name] = o
		case "apps/v1/DaemonSet":
			var o appsv1.DaemonSet
			decodeStrict(t, d, &o)
			m.daemonSets = append(m.daemonSets, o)
		case "monitoring.coreos.com/v1/ServiceMonitor":
			// No Go types without importing the operator: check it as
			// unstructured, with the fields we use spelled out below.
			var o unstructured.Unstructured
			if err := yaml.Unmarshal(d.raw, &o.Object); err != nil {
				t.Fatalf("%s: %v", d, err)
			}
			m.serviceMonitors = append(m.serviceMonitors, o)
		default:
			t.Fatalf("%s: unexpected kind %s %s: add it to loadManifests so it is checked", d, d.APIVersion, d.Kind)
		}
	}
	return m
}

// daemonSet returns the one DaemonSet and its agent container.
func (m *manifests) daemonSet(t *testing.T) (*appsv1.DaemonSet, *corev1.Container) {
	t.Helper()
	if len(m.daemonSets) != 1 {
		t.Fatalf("want one DaemonSet, have %d", len(m.daemonSets))
	}
	ds := &m.daemonSets[0]
	for i := range ds.Spec.Template.Spec.Containers {
		if c := &ds.Spec.Template.Spec.Containers[i]; c.Name == "wsplice" {
			return ds, c
		}
	}
	t.Fatal("DaemonSet has no container named wsplice")
	return nil, nil
}

// agentConfig returns the ConfigMap the DaemonSet mounts, the key of the
// file the agent is started with, and that file parsed.
func (m *manifests) agentConfig(t *testing.T) (*corev1.ConfigMap, agentConfig) {
	t.Helper()
	ds, c := m.daemonSet(t)
	cfgPath := flagValue(t, c.Args, "-c")
	var cm *corev1.ConfigMap
	var key string
	for _, vm := range c.VolumeMounts {
		if !strings.HasPrefix(cfgPath, vm.MountPath+"/") {
			continue
		}
		for _, v := range ds.Spec.Template.Spec.Volumes {
			if v.Name != vm.Name || v.ConfigMap == nil {
				continue
			}
			for i := range m.configMaps {
				if m.configMaps[i].Name == v.ConfigMap.Name {
					cm = &m.configMaps[i]
				}
			}
			if cm == nil {
				t.Fatalf("volume %s refers to ConfigMap %q, which is not in %s", v.Name, v.ConfigMap.Name, k8sDir)
			}
			if !vm.ReadOnly {
				t.Errorf("the config volume is mounted writable: mount it readOnly")
			}
			if vm.SubPath != "" {
				t.Errorf("the config volume is mounted with subPath: the kubelet never updates such a file, so a reload would re-read the old config")
			}
			key = strings.TrimPrefix(cfgPath, vm.MountPath+"/")
		}
	}
	if cm == nil {
		t.Fatalf("the agent's config %s is not on a ConfigMap volume", cfgPath)
	}
	data, ok := cm.Data[key]
	if !ok {
		t.Fatalf("ConfigMap %s has no key %q (the agent reads %s); keys: %v", cm.Name, key, cfgPath, sortedKeys(cm.Data))
	}
	return cm, parseAgentConfig(t, "ConfigMap "+cm.Name+" "+key, []byte(data))
}

// flagValue returns the argument after flag in args.
func flagValue(t *testing.T, args []string, flag string) string {
	t.Helper()
	i := slices.Index(args, flag)
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("args %q have no %s VALUE", args, flag)
	}
	return args[i+1]
}

func TestManifestsDecodeStrictly(t *testing.T) {
	m := loadManifests(t)
	for _, d := range m.docs {
		var meta struct {
			Metadata struct {
				Name      string            `json:"name"`
				Namespace string            `json:"namespace"`
				Labels    map[string]string `json:"labels"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(d.raw, &meta); err != nil {
			t.Fatalf("%s: %v", d, err)
		}
		md := meta.Metadata
		if errs := validation.IsDNS1123Subdomain(md.Name); len(errs) > 0 {
			t.Errorf("%s: name %q: %v", d, md.Name, errs)
		}
		if d.Kind != "Namespace" {
			if md.Namespace == "" {
				t.Errorf("%s: no metadata.namespace: every object names its namespace so kubectl apply -f puts it in the right place", d)
			}
			// Everything but the examples (which belong to the backend
			// application) lives in the agent's namespace.
			if !strings.Contains(d.file, "/examples/") && md.Namespace != namespace {
				t.Errorf("%s: namespace %q, want %q", d, md.Namespace, namespace)
			}
		}
		for k, v := range md.Labels {
			if errs := validation.IsQualifiedName(k); len(errs) > 0 {
				t.Errorf("%s: label key %q: %v", d, k, errs)
			}
			if errs := validation.IsValidLabelValue(v); len(errs) > 0 {
				t.Errorf("%s: label %s value %q: %v", d, k, v, errs)
			}
		}
	}
	if len(m.configMaps) != 1 || len(m.daemonSets) != 1 || len(m.serviceMonitors) != 1 {
		t.Errorf("want one ConfigMap, DaemonSet and ServiceMonitor; have %d, %d, %d",
			len(m.configMaps), len(m.daemonSets), len(m.serviceMonitors))
	}
}

func TestNamespaceAllowsPrivilegedPods(t *testing.T) {
	m := loadManifests(t)
	for _, ns := range m.namespaces {
		if ns.Name != namespace {
			continue
		}
		// hostNetwork, hostPath and added capabilities are all refused by
		// the baseline Pod Security Standard.
		if got := ns.Labels["pod-security.kubernetes.io/enforce"]; got != "privileged" {
			t.Errorf("namespace %s: pod-security.kubernetes.io/enforce=%q, want privileged (the DaemonSet would be rejected)", ns.Name, got)
		}
		return
	}
	t.Fatalf("no Namespace %s in %s", namespace, k8sDir)
}

func TestDaemonSetHostNetworkAndDNS(t *testing.T) {
	m := loadManifests(t)
	ds, _ := m.daemonSet(t)
	spec := ds.Spec.Template.Spec

	sel, err := metav1.LabelSelectorAsSelector(ds.Spec.Selector)
	if err != nil {
		t.Fatal(err)
	}
	if !sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("selector %v does not match the pod template's labels %v", ds.Spec.Selector, ds.Spec.Template.Labels)
	}
	if !spec.HostNetwork {
		t.Error("hostNetwork is not true: the agent must listen on the node's addresses and see its sockets")
	}
	if spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("dnsPolicy %q: a host-network pod needs ClusterFirstWithHostNet to resolve headless Service names", spec.DNSPolicy)
	}
	if spec.HostPID || spec.HostIPC {
		t.Error("hostPID/hostIPC are set: the agent needs neither")
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Error("automountServiceAccountToken is not false: the agent never calls the API server")
	}
	found := false
	for _, sa := range m.serviceAccounts {
		if sa.Name == spec.ServiceAccountName && sa.Namespace == ds.Namespace {
			found = true
			if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
				t.Errorf("ServiceAccount %s mounts its token by default", sa.Name)
			}
		}
	}
	if !found {
		t.Errorf("serviceAccountName %q is not defined in %s", spec.ServiceAccountName, k8sDir)
	}
}

// TestDaemonSetTakeOverUpdate: a rolling update starts the next pod beside
// the running one, whose agent hands it everything over the take-over
// socket, and deletes the old pod only after that.
func TestDaemonSetTakeOverUpdate(t *testing.T) {
	m := loadManifests(t)
	ds, c := m.daemonSet(t)
	_, cfg := m.agentConfig(t)

	// New pod first (surge), never a node without a serving agent, and one
	// node at a time.
	ru := ds.Spec.UpdateStrategy.RollingUpdate
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || ru == nil ||
		!isInt(ru.MaxSurge, 1) || !isInt(ru.MaxUnavailable, 0) {
		t.Errorf("updateStrategy %s: want RollingUpdate with maxSurge 1 and maxUnavailable 0 (the next pod takes over from the running one)", jsonOf(ds.Spec.UpdateStrategy))
	}
	// The new pod's probes reach the old agent (same host network) until
	// the take-over ends: only minReadySeconds keeps the controller from
	// deleting the old pod mid-take-over.
	if got := time.Duration(ds.Spec.MinReadySeconds) * time.Second; got < minTakeoverWait {
		t.Errorf("minReadySeconds %s: want at least %s, or the old pod may be deleted before the new one has taken over", got, minTakeoverWait)
	}

	if !slices.Contains(c.Args, "--take-over") {
		t.Errorf("agent args %q lack --take-over: the next pod would start afresh beside the running one", c.Args)
	}

	// The take-over socket: configured, in a host directory the agent
	// container mounts writable at the same path (so both pods of a node
	// meet there), and apart from the admin socket.
	ts := cfg.Admin.TakeoverSocket
	if ts == "" || !path.IsAbs(ts) {
		t.Fatalf("admin.takeover_socket %q: want an absolute path (--take-over needs it)", ts)
	}
	tsDir := path.Dir(ts)
	vm, v := volumeAt(ds, c, tsDir)
	switch {
	case vm == nil:
		t.Errorf("admin.takeover_socket %s: its directory is not a volume of the agent container", ts)
	case vm.ReadOnly:
		t.Errorf("the take-over socket's volume %s is mounted read-only: the agent binds the socket there", vm.Name)
	case v.HostPath == nil:
		t.Errorf("the take-over socket's volume %s is not a hostPath: the next pod would not see the running agent's socket", vm.Name)
	case v.HostPath.Path != vm.MountPath:
		t.Errorf("take-over volume: host path %s mounted at %s: keep them the same, so the socket has one name on the node", v.HostPath.Path, vm.MountPath)
	case v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectoryOrCreate:
		t.Errorf("take-over hostPath %s: type %s, want DirectoryOrCreate (nothing else creates it on the node)", v.HostPath.Path, jsonOf(v.HostPath.Type))
	}

	// The admin socket stays per pod: during an update both pods run, and
	// each one's preStop and kubectl exec must reach its own agent.
	if avm, av := volumeAt(ds, c, path.Dir(cfg.adminSocket())); avm == nil || av.EmptyDir == nil {
		t.Errorf("admin socket %s: its directory is not an emptyDir of the pod: two pods on a node would share one admin socket", cfg.adminSocket())
	}
	if path.Dir(ts) == path.Dir(cfg.adminSocket()) {
		t.Errorf("admin.takeover_socket %s and admin.socket %s share a directory: one must be per pod, the other per node", ts, cfg.adminSocket())
	}

	// After a take-over the old pod's agent has closed its admin socket:
	// its preStop must not fail for that.
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Exec == nil ||
		!slices.Contains(c.Lifecycle.PreStop.Exec.Command, "--if-running") {
		t.Error("the preStop drain lacks --if-running: after a take-over it would fail (FailedPreStopHook)")
	}

	// On the host network a declared port becomes a hostPort, which the
	// scheduler grants to one pod per node: the surge pod would stay
	// Pending.
	for _, ct := range append(slices.Clone(ds.Spec.Template.Spec.InitContainers), ds.Spec.Template.Spec.Containers...) {
		for _, p := range ct.Ports {
			t.Errorf("container %s declares port %d (%s): with hostNetwork it becomes a hostPort, and the update's second pod on the node could not be scheduled", ct.Name, p.ContainerPort, p.Name)
		}
	}
}

// isInt reports whether v is the plain number n (not a percentage).
func isInt(v *intstr.IntOrString, n int32) bool {
	return v != nil && v.Type == intstr.Int && v.IntVal == n
}

func jsonOf(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// volumeAt returns the volume mount of container c whose mount path is dir
// or a parent of it, and its volume.
func volumeAt(ds *appsv1.DaemonSet, c *corev1.Container, dir string) (*corev1.VolumeMount, *corev1.Volume) {
	for i := range c.VolumeMounts {
		vm := &c.VolumeMounts[i]
		if dir != vm.MountPath && !strings.HasPrefix(dir, vm.MountPath+"/") {
			continue
		}
		for j := range ds.Spec.Template.Spec.Volumes {
			if v := &ds.Spec.Template.Spec.Volumes[j]; v.Name == vm.Name {
				return vm, v
			}
		}
	}
	return nil, nil
}

func TestDaemonSetLeastPrivilege(t *testing.T) {
	m := loadManifests(t)
	ds, c := m.daemonSet(t)
	spec := ds.Spec.Template.Spec

	sc := c.SecurityContext
	if sc == nil {
		t.Fatal("agent container has no securityContext")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("agent container is privileged: grant named capabilities instead")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("agent container: allowPrivilegeEscalation is not false")
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("agent container: readOnlyRootFilesystem is not true")
	}
	if sc.Capabilities == nil {
		t.Fatal("agent container: no capabilities: drop ALL and add the named ones")
	}
	if !slices.Contains(sc.Capabilities.Drop, "ALL") {
		t.Errorf("agent container drops %v, want ALL", sc.Capabilities.Drop)
	}
	var added []string
	for _, cp := range sc.Capabilities.Add {
		added = append(added, strings.TrimPrefix(string(cp), "CAP_"))
	}
	slices.Sort(added)
	if !slices.Equal(added, agentCaps) {
		t.Errorf("agent container adds %v, want exactly %v", added, agentCaps)
	}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("agent container seccomp %+v, want RuntimeDefault", sc.SeccompProfile)
	}
	if psc := spec.SecurityContext; psc != nil && psc.SeccompProfile != nil && psc.SeccompProfile.Type == corev1.SeccompProfileTypeUnconfined {
		t.Error("the pod turns seccomp off")
	}
	// AppArmor: left to the runtime's default profile. Unconfined was only
	// for pinning below /sys/fs/bpf, which the agent no longer does; and a
	// named RuntimeDefault makes the kubelet refuse the pod on nodes
	// without AppArmor, while leaving it out applies the same profile
	// wherever AppArmor is on.
	if sc.AppArmorProfile != nil {
		t.Errorf("agent container appArmorProfile %s: leave it out (the runtime default applies where AppArmor is on; a named profile is refused on nodes without it)", jsonOf(sc.AppArmorProfile))
	}
	if psc := spec.SecurityContext; psc != nil && psc.AppArmorProfile != nil {
		t.Errorf("pod appArmorProfile %s: leave it out", jsonOf(psc.AppArmorProfile))
	}
	for k, v := range ds.Spec.Template.Annotations {
		if strings.HasPrefix(k, "container.apparmor.security.beta.kubernetes.io/") {
			t.Errorf("pod annotation %s=%s: leave AppArmor to the runtime default", k, v)
		}
	}

	// The only privileged container may be the short-lived init container
	// that writes sysctls, and it must do nothing else.
	for _, ic := range spec.InitContainers {
		if ic.SecurityContext == nil || ic.SecurityContext.Privileged == nil || !*ic.SecurityContext.Privileged {
			continue
		}
		if got := strings.Join(append(slices.Clone(ic.Command), ic.Args...), " "); got != "/usr/local/bin/wsplice tune apply" {
			t.Errorf("init container %s is privileged and runs %q: only `wsplice tune apply` may", ic.Name, got)
		}
		for _, vm := range ic.VolumeMounts {
			if vm.MountPath != "/var/lib/wsplice" {
				t.Errorf("privileged init container %s mounts %s: it needs only /var/lib/wsplice", ic.Name, vm.MountPath)
			}
		}
	}
	for _, other := range spec.Containers {
		if other.Name != c.Name && other.SecurityContext != nil && other.SecurityContext.Privileged != nil && *other.SecurityContext.Privileged {
			t.Errorf("container %s is privileged", other.Name)
		}
	}
}

func TestDaemonSetInitTune(t *testing.T) {
	m := loadManifests(t)
	ds, c := m.daemonSet(t)
	var tune *corev1.Container
	for i, ic := range ds.Spec.Template.Spec.InitContainers {
		if slices.Equal(append(slices.Clone(ic.Command), ic.Args...), []string{"/usr/local/bin/wsplice", "tune", "apply"}) {
			tune = &ds.Spec.Template.Spec.InitContainers[i]
		}
	}
	if tune == nil {
		t.Fatal("no init container runs `wsplice tune apply`")
	}
	if tune.Image != c.Image {
		t.Errorf("init container image %q differs from the agent's %q", tune.Image, c.Image)
	}
	// tune apply records the replaced values for `tune revert`; the root
	// file system is read-only, so that directory must be a volume.
	if !mountedWritable(ds, tune, "/var/lib/wsplice") {
		t.Error("tune init container: /var/lib/wsplice (its state file) is not a writable volume")
	}
}

// TestDaemonSetHostPaths: the node directories the pod mounts are exactly
// those it needs. In particular the BPF file system is not mounted: the
// agent pins nothing (its maps travel to the next agent over the take-over
// socket), and a writable /sys/fs/bpf would let it reach every program and
// map pinned on the node.
func TestDaemonSetHostPaths(t *testing.T) {
	m := loadManifests(t)
	ds, _ := m.daemonSet(t)
	_, cfg := m.agentConfig(t)
	want := map[string]string{
		"/var/lib/wsplice":                 "tune apply's record of the sysctls it replaced",
		path.Dir(cfg.Admin.TakeoverSocket): "the take-over socket, shared by the pods of a node",
	}
	got := map[string]bool{}
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.HostPath == nil {
			continue
		}
		p := path.Clean(v.HostPath.Path)
		got[p] = true
		if p == "/sys" || p == "/sys/fs" || strings.HasPrefix(p, "/sys/fs/bpf") {
			t.Errorf("volume %s mounts the host's %s: the agent pins no BPF objects any more; do not mount the BPF file system", v.Name, p)
		} else if _, ok := want[p]; !ok {
			t.Errorf("volume %s mounts the host's %s, which nothing in the agent needs", v.Name, p)
		}
	}
	for p, why := range want {
		if !got[p] {
			t.Errorf("no hostPath volume %s (%s)", p, why)
		}
	}
	for _, ct := range append(slices.Clone(ds.Spec.Template.Spec.InitContainers), ds.Spec.Template.Spec.Containers...) {
		for _, vm := range ct.VolumeMounts {
			if vm.MountPath == "/sys/fs/bpf" || strings.HasPrefix(vm.MountPath, "/sys/fs/bpf/") {
				t.Errorf("container %s mounts %s: the agent pins no BPF objects any more", ct.Name, vm.MountPath)
			}
		}
	}
}

func TestDaemonSetProbesAndDrain(t *testing.T) {
	m := loadManifests(t)
	ds, c := m.daemonSet(t)
	_, cfg := m.agentConfig(t)

	metricsPort := portOf(t, cfg.Metrics.Address)
	host, _, _ := strings.Cut(cfg.Metrics.Address, ":")
	if host == "127.0.0.1" || host == "localhost" || strings.HasPrefix(cfg.Metrics.Address, "[::1]") {
		t.Errorf("metrics.address %q is loopback: the kubelet probes the pod IP (the node's address)", cfg.Metrics.Address)
	}
	for _, tc := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{
		{"livenessProbe", c.LivenessProbe, "/healthz"},
		{"readinessProbe", c.ReadinessProbe, "/readyz"},
		{"startupProbe", c.StartupProbe, "/healthz"},
	} {
		if tc.probe == nil || tc.probe.HTTPGet == nil {
			t.Errorf("%s: want an httpGet probe of %s", tc.name, tc.path)
			continue
		}
		g := tc.probe.HTTPGet
		if g.Path != tc.path {
			t.Errorf("%s path %q, want %q", tc.name, g.Path, tc.path)
		}
		// By number: no port is declared to name (TestDaemonSetTakeOverUpdate).
		if g.Port.Type != intstr.Int || g.Port.IntVal != metricsPort {
			t.Errorf("%s port %s, want the number %d (the port of metrics.address)", tc.name, g.Port.String(), metricsPort)
		}
		if g.Scheme != "" && g.Scheme != corev1.URISchemeHTTP {
			t.Errorf("%s scheme %s: the metrics endpoint is plain HTTP", tc.name, g.Scheme)
		}
	}

	// Drain: preStop runs first, then SIGTERM starts the agent's own
	// drain; the grace period covers both.
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Exec == nil {
		t.Fatal("no preStop exec hook")
	}
	if cmd := c.Lifecycle.PreStop.Exec.Command; len(cmd) < 2 || cmd[0] != "/usr/local/bin/wsplice" || cmd[1] != "drain" {
		t.Errorf("preStop runs %q, want /usr/local/bin/wsplice drain …", cmd)
	}
	drain := cfg.drainTimeout(t)
	grace := ds.Spec.Template.Spec.TerminationGracePeriodSeconds
	if grace == nil {
		t.Fatal("terminationGracePeriodSeconds is not set (the default 30s is not above the drain)")
	}
	if got := time.Duration(*grace) * time.Second; got < drain+drainMargin {
		t.Errorf("terminationGracePeriodSeconds %s is not above drain_timeout %s + %s", got, drain, drainMargin)
	}

	// The preStop CLI reaches the agent through the admin socket; with a
	// read-only root its directory must be a writable volume.
	if !mountedWritable(ds, c, path.Dir(cfg.adminSocket())) {
		t.Errorf("admin socket %s: its directory is not a writable volume of the agent container", cfg.adminSocket())
	}
}

func TestDaemonSetPortsAndResources(t *testing.T) {
	m := loadManifests(t)
	ds, _ := m.daemonSet(t)
	_, cfg := m.agentConfig(t)

	// No ports are declared (TestDaemonSetTakeOverUpdate); the one the pod
	// spec relies on, the probes' metrics port, must not be a listener's.
	metricsPort := portOf(t, cfg.Metrics.Address)
	for _, l := range cfg.Listeners {
		if portOf(t, l.Address) == metricsPort {
			t.Errorf("listener %s uses the metrics port %d", l.Name, metricsPort)
		}
	}

	all := append(slices.Clone(ds.Spec.Template.Spec.InitContainers), ds.Spec.Template.Spec.Containers...)
	for _, ct := range all {
		r := ct.Resources
		cpu, mem := r.Requests[corev1.ResourceCPU], r.Requests[corev1.ResourceMemory]
		if cpu.IsZero() || mem.IsZero() {
			t.Errorf("container %s: requests cpu and memory (have %v)", ct.Name, r.Requests)
		}
		if lim, ok := r.Limits[corev1.ResourceMemory]; ok && lim.Cmp(mem) < 0 {
			t.Errorf("container %s: memory limit %s below the request %s", ct.Name, lim.String(), mem.String())
		}
		if ct.Image == "" || !strings.Contains(ct.Image, ":") || strings.HasSuffix(ct.Image, ":latest") {
			t.Errorf("container %s: image %q: pin a tag", ct.Name, ct.Image)
		}
	}
}

func TestHeadlessServiceMatchesBackends(t *testing.T) {
	m := loadManifests(t)
	_, cfg := m.agentConfig(t)
	matched := 0
	for _, p := range cfg.Pools {
		for _, b := range p.Backends {
			host, port, err := splitHostPort(b.Address)
			if err != nil {
				t.Errorf("pool %s backend %q: %v", p.Name, b.Address, err)
				continue
			}
			name, ns, ok := serviceDNSName(host)
			if !ok {
				continue
			}
			svc, ok := m.services[ns+"/"+name]
			if !ok {
				t.Errorf("pool %s backend %q names Service %s/%s, which is not among the manifests", p.Name, b.Address, ns, name)
				continue
			}
			matched++
			if svc.Spec.ClusterIP != corev1.ClusterIPNone {
				t.Errorf("Service %s/%s: clusterIP %q, want None (headless): a virtual IP hides the pods behind kube-proxy's own random balancing", ns, name, svc.Spec.ClusterIP)
			}
			if svc.Spec.PublishNotReadyAddresses {
				t.Errorf("Service %s/%s publishes pods that are not ready", ns, name)
			}
			if !slices.ContainsFunc(svc.Spec.Ports, func(sp corev1.ServicePort) bool { return sp.Port == port }) {
				t.Errorf("pool %s backend %q: Service %s/%s has no port %d", p.Name, b.Address, ns, name, port)
			}
			if !strings.HasSuffix(host, ".") {
				t.Errorf("pool %s backend %q: end the name with a dot, or ndots:5 sends every re-resolution through the search list first", p.Name, b.Address)
			}
		}
	}
	if matched == 0 {
		t.Error("no backend of the ConfigMap uses a headless Service name: the DNS discovery example is not wired up")
	}
}

// serviceDNSName splits NAME.NAMESPACE.svc.<cluster domain>[.] .
func serviceDNSName(host string) (name, ns string, ok bool) {
	parts := strings.Split(strings.TrimSuffix(host, "."), ".")
	if len(parts) < 4 || parts[2] != "svc" {
		return "", "", false
	}
	return parts[0], parts[1], true
}

func splitHostPort(addr string) (string, int32, error) {
	i := strings.LastIndexByte(addr, ':')
	if i < 0 {
		return "", 0, os.ErrInvalid
	}
	var n int32
	for _, ch := range addr[i+1:] {
		if ch < '0' || ch > '9' {
			return "", 0, os.ErrInvalid
		}
		n = n*10 + int32(ch-'0')
	}
	return addr[:i], n, nil
}

func TestMetricsServiceAndServiceMonitor(t *testing.T) {
	m := loadManifests(t)
	ds, _ := m.daemonSet(t)
	svc, ok := m.services[namespace+"/wsplice-metrics"]
	if !ok {
		t.Fatal("no Service wsplice-metrics")
	}
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(ds.Spec.Template.Labels)) || len(svc.Spec.Selector) == 0 {
		t.Errorf("Service %s selects %v, which does not match the agent pods %v", svc.Name, svc.Spec.Selector, ds.Spec.Template.Labels)
	}
	var metricsPort *corev1.ServicePort
	for i := range svc.Spec.Ports {
		if svc.Spec.Ports[i].Name == "metrics" {
			metricsPort = &svc.Spec.Ports[i]
		}
	}
	if metricsPort == nil {
		t.Fatal("Service wsplice-metrics has no port named metrics")
	}
	_, cfg := m.agentConfig(t)
	if want := portOf(t, cfg.Metrics.Address); metricsPort.TargetPort.Type != intstr.Int || metricsPort.TargetPort.IntVal != want {
		t.Errorf("Service port targets %s, want the number %d (metrics.address; the container declares no port to name)", metricsPort.TargetPort.String(), want)
	}

	sm := m.serviceMonitors[0]
	if sm.GetNamespace() != namespace {
		t.Errorf("ServiceMonitor namespace %q", sm.GetNamespace())
	}
	spec, _, _ := unstructured.NestedMap(sm.Object, "spec")
	known := []string{"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels", "sampleLimit", "attachMetadata"}
	for k := range spec {
		if !slices.Contains(known, k) {
			t.Errorf("ServiceMonitor spec.%s is not a field this test knows (typo?): %v", k, known)
		}
	}
	sel, _, _ := unstructured.NestedStringMap(sm.Object, "spec", "selector", "matchLabels")
	if len(sel) == 0 || !labels.SelectorFromSet(sel).Matches(labels.Set(svc.Labels)) {
		t.Errorf("ServiceMonitor selects %v, which does not match Service %s labels %v", sel, svc.Name, svc.Labels)
	}
	nsNames, _, _ := unstructured.NestedStringSlice(sm.Object, "spec", "namespaceSelector", "matchNames")
	if len(nsNames) > 0 && !slices.Contains(nsNames, svc.Namespace) {
		t.Errorf("ServiceMonitor namespaceSelector %v leaves out %s", nsNames, svc.Namespace)
	}
	eps, _, _ := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
	if len(eps) == 0 {
		t.Fatal("ServiceMonitor has no endpoints")
	}
	for _, e := range eps {
		ep, _ := e.(map[string]any)
		if ep["port"] != "metrics" || ep["path"] != "/metrics" {
			t.Errorf("ServiceMonitor endpoint %v: want port metrics, path /metrics", ep)
		}
	}
}

// kustomization is the subset of kustomize's file this directory uses,
// decoded strictly so a typo in it fails here.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
	Images     []struct {
		Name    string `json:"name"`
		NewName string `json:"newName"`
		NewTag  string `json:"newTag"`
	} `json:"images"`
}

func TestKustomization(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(k8sDir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	// Every top-level manifest is applied, except the ServiceMonitor, whose
	// CRD may be missing (kubectl apply -k would then fail as a whole).
	files, _ := filepath.Glob(filepath.Join(k8sDir, "*.yaml"))
	var want []string
	for _, f := range files {
		if b := filepath.Base(f); b != "kustomization.yaml" && b != "servicemonitor.yaml" {
			want = append(want, b)
		}
	}
	got := slices.Sorted(slices.Values(k.Resources))
	if !slices.Equal(got, want) {
		t.Errorf("kustomization resources %v, want %v", got, want)
	}
	m := loadManifests(t)
	_, c := m.daemonSet(t)
	if len(k.Images) != 1 || !strings.HasPrefix(c.Image, k.Images[0].Name+":") {
		t.Errorf("kustomization images %+v do not match the DaemonSet image %q", k.Images, c.Image)
	}

	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		t.Log("kubectl not found: skipping the kubectl kustomize render")
		return
	}
	out, err := exec.Command(kubectl, "kustomize", k8sDir).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl kustomize %s: %v\n%s", k8sDir, err, out)
	}
	if n := strings.Count(string(out), "\nkind: ") + boolInt(strings.HasPrefix(string(out), "kind: ")); n != len(k.Resources) {
		t.Errorf("kubectl kustomize rendered %d objects, want %d", n, len(k.Resources))
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// mountedWritable reports whether dir (or a parent) is a writable volume
// mount of container c.
func mountedWritable(ds *appsv1.DaemonSet, c *corev1.Container, dir string) bool {
	for _, vm := range c.VolumeMounts {
		if (dir == vm.MountPath || strings.HasPrefix(dir, vm.MountPath+"/")) && !vm.ReadOnly {
			for _, v := range ds.Spec.Template.Spec.Volumes {
				if v.Name == vm.Name && v.ConfigMap == nil && v.Secret == nil && v.DownwardAPI == nil && v.Projected == nil {
					return true
				}
			}
		}
	}
	return false
}
