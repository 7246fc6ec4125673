// Package deploy holds the tests of the manifests in this directory: that
// they decode strictly into the Kubernetes types, hang together (names,
// paths, the mounted configuration) and carry what running a node's proxy
// needs. The lab's real kube-apiserver validates them as well, in
// test/e2e (TestDeployManifestsPassServerSideDryRun).
package deploy

import (
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"

	"github.com/miniproxy/miniproxy/pkg/config"
)

// manifests decodes every YAML file of the directory, strictly (an unknown
// or misspelt field is an error), by kind.
type manifests struct {
	sa  *v1.ServiceAccount
	crb *rbacv1.ClusterRoleBinding
	cm  *v1.ConfigMap
	ds  *appsv1.DaemonSet
}

func load(t *testing.T) manifests {
	t.Helper()
	files, err := filepath.Glob("*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests found: %v", err)
	}
	var m manifests
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var meta struct{ Kind string }
		if err := yaml.Unmarshal(data, &meta); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		var obj any
		switch meta.Kind {
		case "ServiceAccount":
			m.sa = &v1.ServiceAccount{}
			obj = m.sa
		case "ClusterRoleBinding":
			m.crb = &rbacv1.ClusterRoleBinding{}
			obj = m.crb
		case "ConfigMap":
			m.cm = &v1.ConfigMap{}
			obj = m.cm
		case "DaemonSet":
			m.ds = &appsv1.DaemonSet{}
			obj = m.ds
		default:
			t.Fatalf("%s: unexpected kind %q", f, meta.Kind)
		}
		if err := yaml.UnmarshalStrict(data, obj); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
	}
	if m.sa == nil || m.crb == nil || m.cm == nil || m.ds == nil {
		t.Fatalf("want a ServiceAccount, a ClusterRoleBinding, a ConfigMap and a DaemonSet; have %+v", m)
	}
	return m
}

func TestManifestsHangTogether(t *testing.T) {
	m := load(t)
	ns := "kube-system"
	if m.sa.Namespace != ns || m.cm.Namespace != ns || m.ds.Namespace != ns {
		t.Errorf("namespaces: ServiceAccount %q, ConfigMap %q, DaemonSet %q; want %s", m.sa.Namespace, m.cm.Namespace, m.ds.Namespace, ns)
	}
	if r := m.crb.RoleRef; r.Kind != "ClusterRole" || r.Name != "system:node-proxier" {
		t.Errorf("ClusterRoleBinding binds %s %s, want the built-in ClusterRole system:node-proxier", r.Kind, r.Name)
	}
	if s := m.crb.Subjects; len(s) != 1 || s[0].Kind != "ServiceAccount" || s[0].Name != m.sa.Name || s[0].Namespace != ns {
		t.Errorf("ClusterRoleBinding subjects %+v, want only the ServiceAccount %s/%s", s, ns, m.sa.Name)
	}
	spec := m.ds.Spec.Template.Spec
	if spec.ServiceAccountName != m.sa.Name {
		t.Errorf("DaemonSet runs as %q, want %q", spec.ServiceAccountName, m.sa.Name)
	}
	sel := m.ds.Spec.Selector
	if sel == nil || len(sel.MatchLabels) == 0 {
		t.Fatal("the DaemonSet has no selector")
	}
	for k, v := range sel.MatchLabels {
		if m.ds.Spec.Template.Labels[k] != v {
			t.Errorf("the pod template's labels %v do not match the selector %v", m.ds.Spec.Template.Labels, sel.MatchLabels)
		}
	}
}

// TestDaemonSetRunsAProxyOnEveryNode checks what the issue asks of the
// DaemonSet, one property per line, so that a failure says which.
func TestDaemonSetRunsAProxyOnEveryNode(t *testing.T) {
	m := load(t)
	ds := m.ds
	spec := ds.Spec.Template.Spec
	check := func(ok bool, what string) {
		t.Helper()
		if !ok {
			t.Errorf("DaemonSet: want %s", what)
		}
	}
	check(spec.HostNetwork, "hostNetwork: the rules go into the node's own network namespace")
	check(spec.PriorityClassName == "system-node-critical", "priorityClassName system-node-critical")
	check(spec.DNSPolicy == v1.DNSDefault, "dnsPolicy Default: the cluster DNS needs Services, which need the proxy")
	check(slices.ContainsFunc(spec.Tolerations, func(tol v1.Toleration) bool {
		return tol.Operator == v1.TolerationOpExists && tol.Key == "" && tol.Effect == ""
	}), "a toleration for every taint (operator Exists, no key, no effect)")
	check(spec.NodeSelector["kubernetes.io/os"] == "linux", "nodeSelector kubernetes.io/os: linux")
	us := ds.Spec.UpdateStrategy
	check(us.Type == appsv1.RollingUpdateDaemonSetStrategyType && us.RollingUpdate != nil && us.RollingUpdate.MaxUnavailable != nil &&
		*us.RollingUpdate.MaxUnavailable == intstr.FromInt32(1), "a rolling update, one node at a time")

	volumes := map[string]v1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	lock, ok := volumes["xtables-lock"]
	check(ok && lock.HostPath != nil && lock.HostPath.Path == "/run/xtables.lock" &&
		lock.HostPath.Type != nil && *lock.HostPath.Type == v1.HostPathFileOrCreate, "the host's /run/xtables.lock, FileOrCreate")
	mods, ok := volumes["lib-modules"]
	check(ok && mods.HostPath != nil && mods.HostPath.Path == "/lib/modules", "the host's /lib/modules")
	cfg, ok := volumes["config"]
	check(ok && cfg.ConfigMap != nil && cfg.ConfigMap.Name == m.cm.Name, "the ConfigMap as a volume")

	if len(spec.InitContainers) != 0 || len(spec.Containers) != 1 {
		t.Fatalf("want one container and no init container, have %d and %d", len(spec.Containers), len(spec.InitContainers))
	}
	for _, c := range spec.Containers {
		check(c.Image == "miniproxy:dev" && c.ImagePullPolicy == v1.PullIfNotPresent, c.Name+": image miniproxy:dev, pulled only if not present")
		check(len(c.Command) == 0, c.Name+": no command, so that the image's entrypoint picks the iptables backend")
		check(c.SecurityContext != nil && c.SecurityContext.Privileged != nil && *c.SecurityContext.Privileged, c.Name+": privileged")
		mounts := map[string]v1.VolumeMount{}
		for _, vm := range c.VolumeMounts {
			mounts[vm.Name] = vm
		}
		check(mounts["xtables-lock"].MountPath == "/run/xtables.lock", c.Name+": /run/xtables.lock mounted")
		check(mounts["lib-modules"].MountPath == "/lib/modules" && mounts["lib-modules"].ReadOnly, c.Name+": /lib/modules read-only")
	}
	c := spec.Containers[0]
	var nodeName *v1.EnvVar
	for i := range c.Env {
		if c.Env[i].Name == "NODE_NAME" {
			nodeName = &c.Env[i]
		}
	}
	check(nodeName != nil && nodeName.ValueFrom != nil && nodeName.ValueFrom.FieldRef != nil &&
		nodeName.ValueFrom.FieldRef.FieldPath == "spec.nodeName", "NODE_NAME from spec.nodeName")
	check(slices.Contains(c.Args, "--hostname-override=$(NODE_NAME)"), "--hostname-override=$(NODE_NAME)")
	check(slices.Contains(c.Args, "--cleanup-kube-proxy-after-sync"), "--cleanup-kube-proxy-after-sync: kube-proxy's stale rules removed once miniproxy's are in")
	var configArg string
	for _, a := range c.Args {
		if v, ok := strings.CutPrefix(a, "--config="); ok {
			configArg = v
		}
	}
	var configMount string
	for _, vm := range c.VolumeMounts {
		if vm.Name == "config" {
			configMount = vm.MountPath
		}
	}
	check(configArg != "" && path.Dir(configArg) == configMount && path.Base(configArg) == "config.conf",
		"--config pointing at config.conf in the mounted ConfigMap")
	lp := c.LivenessProbe
	check(lp != nil && lp.HTTPGet != nil && lp.HTTPGet.Path == "/livez" && lp.HTTPGet.Port == intstr.FromInt32(10256),
		"a liveness probe on :10256/livez")
	check(c.Resources.Requests.Cpu().MilliValue() > 0 && c.Resources.Requests.Memory().Value() > 0, "CPU and memory requests")
	check(c.Resources.Limits == nil, "no limits: a throttled or OOM-killed proxy leaves stale rules")
}

// TestConfigMapIsAKubeProxyConfiguration loads the ConfigMap's config.conf
// with the same code miniproxy --config uses: no error, no warning, and its
// kubeconfig path inside the directory the DaemonSet mounts the ConfigMap
// at; and kubeconfig.conf authenticates with the service account's token
// and CA, as kubeadm's kube-proxy ConfigMap does.
func TestConfigMapIsAKubeProxyConfiguration(t *testing.T) {
	m := load(t)
	for _, key := range []string{"config.conf", "kubeconfig.conf"} {
		if _, ok := m.cm.Data[key]; !ok {
			t.Fatalf("the ConfigMap has no %s", key)
		}
	}
	c, warns, err := config.Parse([]byte(m.cm.Data["config.conf"]))
	if err != nil {
		t.Fatalf("config.conf: %v", err)
	}
	if len(warns) != 0 {
		t.Errorf("config.conf gives warnings: %v", warns)
	}
	var mount string
	for _, vm := range m.ds.Spec.Template.Spec.Containers[0].VolumeMounts {
		if vm.Name == "config" {
			mount = vm.MountPath
		}
	}
	if c.Kubeconfig != path.Join(mount, "kubeconfig.conf") {
		t.Errorf("config.conf's clientConnection.kubeconfig is %q, want kubeconfig.conf where the ConfigMap is mounted (%s)", c.Kubeconfig, mount)
	}
	if c.HostnameOverride != "" {
		t.Errorf("config.conf sets hostnameOverride %q; every node would claim that name", c.HostnameOverride)
	}
	if len(c.ClusterCIDRs) == 0 {
		t.Errorf("config.conf has no clusterCIDR: ClusterIP traffic from outside the pods would not be masqueraded")
	}

	kc, err := clientcmd.Load([]byte(m.cm.Data["kubeconfig.conf"]))
	if err != nil {
		t.Fatalf("kubeconfig.conf: %v", err)
	}
	ctx := kc.Contexts[kc.CurrentContext]
	if ctx == nil {
		t.Fatalf("kubeconfig.conf: no current context %q", kc.CurrentContext)
	}
	cluster, user := kc.Clusters[ctx.Cluster], kc.AuthInfos[ctx.AuthInfo]
	const sa = "/var/run/secrets/kubernetes.io/serviceaccount/"
	if cluster == nil || cluster.CertificateAuthority != sa+"ca.crt" || !strings.HasPrefix(cluster.Server, "https://") {
		t.Errorf("kubeconfig.conf cluster %+v: want an https server and the service account's CA", cluster)
	}
	if user == nil || user.TokenFile != sa+"token" {
		t.Errorf("kubeconfig.conf user %+v: want the service account's token file", user)
	}
}

// TestApplyDeployFillsInTheCluster runs deploy/vagrant/apply-deploy.sh with
// a fake kubectl that prints what it would apply: the ConfigMap must come
// out with the API server and the pods' range given, still a valid
// configuration, and the files in deploy/ unchanged.
func TestApplyDeployFillsInTheCluster(t *testing.T) {
	for _, tool := range []string{"sh", "sed", "cp", "mktemp", "cat"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
	before, err := os.ReadFile("02-configmap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	fake := "#!/bin/sh\n[ \"$1\" = apply ] && [ \"$2\" = -f ] || exit 1\ncat \"$3/02-configmap.yaml\"\n"
	if err := os.WriteFile(filepath.Join(bin, "kubectl"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "vagrant/apply-deploy.sh", "https://192.168.56.10:6443", "10.245.0.0/16")
	cmd.Env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("apply-deploy.sh: %v", err)
	}
	var cm v1.ConfigMap
	if err := yaml.UnmarshalStrict(out, &cm); err != nil {
		t.Fatalf("the ConfigMap apply-deploy.sh applies: %v\n%s", err, out)
	}
	c, warns, err := config.Parse([]byte(cm.Data["config.conf"]))
	if err != nil || len(warns) != 0 {
		t.Fatalf("config.conf after apply-deploy.sh: %v, warnings %v", err, warns)
	}
	if len(c.ClusterCIDRs) != 1 || c.ClusterCIDRs[0].String() != "10.245.0.0/16" {
		t.Errorf("clusterCIDR = %v, want 10.245.0.0/16", c.ClusterCIDRs)
	}
	kc, err := clientcmd.Load([]byte(cm.Data["kubeconfig.conf"]))
	if err != nil {
		t.Fatal(err)
	}
	if s := kc.Clusters[kc.Contexts[kc.CurrentContext].Cluster].Server; s != "https://192.168.56.10:6443" {
		t.Errorf("kubeconfig.conf server = %q, want https://192.168.56.10:6443", s)
	}
	after, _ := os.ReadFile("02-configmap.yaml")
	if string(after) != string(before) {
		t.Errorf("apply-deploy.sh changed deploy/02-configmap.yaml itself")
	}
}
