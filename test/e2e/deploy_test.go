package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

// deployDir is the manifests directory, relative to this package.
const deployDir = "../../deploy"

// TestDeployManifestsPassServerSideDryRun has the lab's real kube-apiserver
// validate deploy/ (kubectl apply --dry-run=server): schemas, defaulting and
// admission, without creating anything.
func TestDeployManifestsPassServerSideDryRun(t *testing.T) {
	dir, err := filepath.Abs(deployDir)
	if err != nil {
		t.Fatal(err)
	}
	out, err := lab.Kubectl(testContext(t), lab.CPNS, "apply", "--dry-run=server", "-f", dir)
	if err != nil && strings.Contains(err.Error(), "privileged: Forbidden: disallowed by cluster policy") {
		// Every kubeadm API server has --allow-privileged=true (kube-proxy's
		// own DaemonSet is privileged); the lab's must have it too.
		t.Skip("the lab's kube-apiserver runs without --allow-privileged=true, unlike kubeadm's: it refuses every privileged DaemonSet")
	}
	if err != nil {
		t.Fatalf("kubectl apply --dry-run=server -f deploy/: %v\n%s", err, out)
	}
	for _, want := range []string{
		"serviceaccount/miniproxy", "clusterrolebinding.rbac.authorization.k8s.io/miniproxy",
		"configmap/miniproxy", "daemonset.apps/miniproxy",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl apply --dry-run=server did not mention %s:\n%s", want, out)
		}
	}
	if strings.Contains(out, "Warning") {
		t.Errorf("the API server warned about deploy/:\n%s", out)
	}
}

// TestNodeRunsFromTheConfigMap replaces node2's miniproxy with one started
// the way deploy/'s DaemonSet starts it: the ServiceAccount, the
// ClusterRoleBinding and the ConfigMap are applied to the lab, and
// miniproxy runs with the DaemonSet's arguments (--config with the
// ConfigMap's config.conf, read back from the API server,
// --hostname-override, --cleanup-kube-proxy-after-sync), authenticating as
// the ServiceAccount with kubeconfig.conf's token file and CA file. The
// node holds stale rules of an upstream kube-proxy, one of which DNATs the
// ClusterIP of a Service without endpoints to a live pod: after the first
// sync they must be gone, and that Service refused. Then the node passes
// the tutorial's checks. node2's usual miniproxy comes back at the end.
//
// Two things differ from a real node, because the lab is not one: the
// files live in a temporary directory instead of /var/lib/kube-proxy and
// /var/run/secrets (the paths in the two files are rewritten, nothing
// else), and the conntrack settings are set to 0 ("leave as is"), since
// nf_conntrack_max and the hash size belong to the machine, not to the
// node's network namespace.
func TestNodeRunsFromTheConfigMap(t *testing.T) {
	ctx := testContext(t)
	bin := proxyBinaryWithConfig(t)
	node := lab.Node("node2")
	files := configMapFiles(t, ctx)
	args := daemonSetArgs(t, node, files.config)

	stale := staleKubeProxy(t, "cm-")
	runAsDaemonSet(t, ctx, node, bin, stale.rules, func() error {
		return lab.StartProxy(ctx, node, func(*cluster.Node) ([]string, bool) { return args, true })
	})
	stale.check(t, node)
	tutorialChecks(t, node, "cm-")
}

// daemonSetArgs returns the arguments of deploy/'s DaemonSet for node, with
// $(NODE_NAME) expanded and --config pointing at config.
func daemonSetArgs(t *testing.T, node *cluster.Node, config string) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(deployDir, "03-daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(data, &ds); err != nil {
		t.Fatal(err)
	}
	var args []string
	for _, a := range ds.Spec.Template.Spec.Containers[0].Args {
		a = strings.ReplaceAll(a, "$(NODE_NAME)", node.Name)
		if strings.HasPrefix(a, "--config=") {
			a = "--config=" + config
		}
		args = append(args, a)
	}
	return args
}

// staleRules is what an upstream kube-proxy left on a node: its chains and
// jumps, with a DNAT of the ClusterIP of a Service that has no endpoints
// (svcIP) to a live pod.
type staleRules struct {
	rules, svcIP, prefix string
}

// staleKubeProxy creates the Service without endpoints and the pod the
// stale rule sends its traffic to, and returns the rules.
func staleKubeProxy(t *testing.T, prefix string) staleRules {
	t.Helper()
	pod := runPod(t, prefix+"stale-target", prefix+"stale-target", "node1")
	svc := expose(t, prefix+"stale", prefix+"nobody-has-this-label-either")
	return staleRules{prefix: prefix, svcIP: svc.Spec.ClusterIP, rules: fmt.Sprintf(`*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-STALE0AAAAAAAAAAA - [0:0]
:KUBE-SEP-STALE0AAAAAAAAAAA - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-SERVICES -d %s/32 -p tcp -m comment --comment "default/%sstale cluster IP" -m tcp --dport 80 -j KUBE-SVC-STALE0AAAAAAAAAAA
-A KUBE-SVC-STALE0AAAAAAAAAAA -j KUBE-SEP-STALE0AAAAAAAAAAA
-A KUBE-SEP-STALE0AAAAAAAAAAA -p tcp -m tcp -j DNAT --to-destination %s:8080
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-I FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
`, svc.Spec.ClusterIP, prefix, pod.IP)}
}

// check waits until none of kube-proxy's chains is left on node (the
// removal runs right after the first sync), then checks that the Service
// the stale rule DNATed is refused, as a Service without endpoints must be.
func (s staleRules) check(t *testing.T, node *cluster.Node) {
	t.Helper()
	err := cluster.Eventually(testContext(t), 10*time.Second, func() error {
		out, _, err := node.NS.Run(context.Background(), "iptables-save")
		if err != nil {
			return err
		}
		if strings.Contains(out, "KUBE-") {
			return fmt.Errorf("kube-proxy's rules are still on %s:\n%s", node.Name, out)
		}
		if !strings.Contains(out, "MP-SERVICES") {
			return fmt.Errorf("miniproxy's rules are not on %s:\n%s", node.Name, out)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	client := runPod(t, s.prefix+"stale-client", s.prefix+"stale-client", node.Name)
	if err := refused(client, s.svcIP); err != nil {
		t.Errorf("the Service the stale rule DNATed: %v", err)
	}
}

// refused dials ip:80 from the pod and says whether the connection was
// refused, waiting up to 10s for the rules.
func refused(client *cluster.Pod, ip string) error {
	return cluster.Eventually(context.Background(), 10*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		conn, err := client.NS.DialContext(ctx, "tcp", net.JoinHostPort(ip, "80"))
		if err == nil {
			conn.Close()
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("want connection refused, saw %v", err)
		}
		return nil
	})
}

// proxyBinaryWithConfig returns the lab's miniproxy binary, skipping the
// test when it does not have the flags the DaemonSet uses yet.
func proxyBinaryWithConfig(t *testing.T) string {
	t.Helper()
	bin, err := netns.Build("github.com/miniproxy/miniproxy/cmd/miniproxy")
	if err != nil {
		t.Fatal(err)
	}
	// -h prints the flags and exits with status 2: the error is expected.
	stdout, stderr, _ := lab.CPNS.Run(context.Background(), bin, "-h")
	help := stdout + stderr
	for _, flag := range []string{"-config", "-cleanup-kube-proxy", "-cleanup-kube-proxy-after-sync"} {
		if !strings.Contains(help, flag+" ") && !strings.Contains(help, flag+"\n") {
			t.Skipf("miniproxy has no %s yet (cmd/miniproxy wiring pending)", flag)
		}
	}
	return bin
}

// kubeProxyFiles are the paths of the rewritten ConfigMap files.
type kubeProxyFiles struct {
	dir, config, kubeconfig, secrets string
}

// configMapFiles applies the ServiceAccount, ClusterRoleBinding and
// ConfigMap of deploy/ to the lab (removed at the end), reads the
// ConfigMap back from the API server, gets a token for the ServiceAccount
// (TokenRequest, as the kubelet's projected volume does) and writes
// config.conf, kubeconfig.conf, token, ca.crt and namespace into a
// temporary directory.
func configMapFiles(t *testing.T, ctx context.Context) kubeProxyFiles {
	t.Helper()
	dir, err := filepath.Abs(deployDir)
	if err != nil {
		t.Fatal(err)
	}
	manifests := []string{"00-serviceaccount.yaml", "01-clusterrolebinding.yaml", "02-configmap.yaml"}
	var args []string
	for _, m := range manifests {
		args = append(args, "-f", filepath.Join(dir, m))
	}
	if out, err := lab.Kubectl(ctx, lab.CPNS, append([]string{"apply"}, args...)...); err != nil {
		t.Fatalf("kubectl apply: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		lab.Kubectl(context.Background(), lab.CPNS, append([]string{"delete", "--ignore-not-found"}, args...)...)
	})
	cm, err := lab.Kube.CoreV1().ConfigMaps("kube-system").Get(ctx, "miniproxy", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("read the ConfigMap back: %v", err)
	}
	token, err := lab.Kubectl(ctx, lab.CPNS, "-n", "kube-system", "create", "token", "miniproxy", "--duration=1h")
	if err != nil {
		t.Fatalf("kubectl create token: %v", err)
	}

	f := kubeProxyFiles{dir: t.TempDir()}
	f.secrets = filepath.Join(f.dir, "serviceaccount")
	cfgDir := filepath.Join(f.dir, "kube-proxy")
	f.config, f.kubeconfig = filepath.Join(cfgDir, "config.conf"), filepath.Join(cfgDir, "kubeconfig.conf")
	const saDir = "/var/run/secrets/kubernetes.io/serviceaccount/"
	kubeconfig := replaceOnce(t, cm.Data["kubeconfig.conf"], saDir, f.secrets+"/", 2)
	kubeconfig = replaceOnce(t, kubeconfig, "https://CONTROL_PLANE_ENDPOINT:6443", lab.Control.Server(), 1)
	conf := replaceOnce(t, cm.Data["config.conf"], "/var/lib/kube-proxy/", cfgDir+"/", 1)
	conf = replaceOnce(t, conf, "clusterCIDR: 10.244.0.0/16", "clusterCIDR: "+cluster.ClusterCIDR.String(), 1)
	for _, z := range [][2]string{
		{"maxPerCore: 32768", "maxPerCore: 0"},
		{"tcpEstablishedTimeout: 24h0m0s", "tcpEstablishedTimeout: 0s"},
		{"tcpCloseWaitTimeout: 1h0m0s", "tcpCloseWaitTimeout: 0s"},
	} {
		conf = replaceOnce(t, conf, z[0], z[1], 1)
	}
	for path, data := range map[string]string{
		f.config:                              conf,
		f.kubeconfig:                          kubeconfig,
		filepath.Join(f.secrets, "token"):     strings.TrimSpace(token),
		filepath.Join(f.secrets, "ca.crt"):    string(lab.Control.CAPEM()),
		filepath.Join(f.secrets, "namespace"): "kube-system",
	} {
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// replaceOnce replaces old by new in s, failing the test unless old occurs
// exactly n times (so that a changed ConfigMap is noticed here, not as a
// puzzling failure later).
func replaceOnce(t *testing.T, s, old, new string, n int) string {
	t.Helper()
	if c := strings.Count(s, old); c != n {
		t.Fatalf("the ConfigMap holds %q %d times, want %d:\n%s", old, c, n, s)
	}
	return strings.ReplaceAll(s, old, new)
}

// runAsDaemonSet stops node's miniproxy, checks that `miniproxy
// --cleanup-kube-proxy` (the one-shot mode) leaves miniproxy's own rules
// alone, removes them with `miniproxy --cleanup` so that the new process
// has to program everything itself, puts stale (upstream kube-proxy's
// rules, iptables-restore input) on the node, and calls start, which
// starts miniproxy as the DaemonSet's container would and waits for its
// first sync. At the end node's usual miniproxy is started again.
func runAsDaemonSet(t *testing.T, ctx context.Context, node *cluster.Node, bin, stale string, start func() error) {
	t.Helper()
	takeOverProxy(t, node)
	save := func() string {
		t.Helper()
		out, _, err := node.NS.Run(ctx, "iptables-save")
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	before := save()
	if _, stderr, err := node.NS.Run(ctx, bin, "--cleanup-kube-proxy"); err != nil {
		t.Fatalf("miniproxy --cleanup-kube-proxy: %v\n%s", err, stderr)
	}
	if after := save(); strings.Count(before, "MP-") == 0 || strings.Count(after, "MP-") != strings.Count(before, "MP-") {
		t.Errorf("--cleanup-kube-proxy changed miniproxy's rules: %d MP- mentions before, %d after", strings.Count(before, "MP-"), strings.Count(after, "MP-"))
	}
	_, stderr, err := node.NS.Run(ctx, bin, "--cleanup")
	if err != nil {
		t.Fatalf("miniproxy --cleanup: %v\n%s", err, stderr)
	}
	// It says what it removed, per table.
	if !regexp.MustCompile(`"removed chains and rules of miniproxy" family="IPv4" table="nat" chains=[1-9]\d* rules=[1-9]`).MatchString(stderr) ||
		!strings.Contains(stderr, `"cleanup done: removed the chains of miniproxy`) {
		t.Errorf("miniproxy --cleanup should say what it removed, per family and table:\n%s", stderr)
	}
	if _, stderr, err := node.NS.Run(ctx, "sh", "-c", "iptables-restore --noflush <<'EOF'\n"+stale+"EOF\n"); err != nil {
		t.Fatalf("put kube-proxy's stale rules on %s: %v\n%s", node.Name, err, stderr)
	}
	if err := start(); err != nil {
		t.Fatalf("start miniproxy as the DaemonSet does: %v", err)
	}
	if out := node.Proxy.Output(); strings.Contains(out, "config file") || strings.Contains(out, "is ignored") {
		t.Errorf("miniproxy warned about the ConfigMap's configuration:\n%s", out)
	}
}

// tutorialChecks walks the tutorial through node: ClusterIP from a pod on
// it, NodePort on it with both policies, a Service without endpoints, the
// proxy mode and the proxier's health. Its pods and Services are named
// with prefix, so that two tests never wait for each other's deletions.
func tutorialChecks(t *testing.T, node *cluster.Node, prefix string) {
	other := "node1"
	if node.Name == other {
		other = "node2"
	}
	t.Run("pod to ClusterIP keeps the pod's address", func(t *testing.T) {
		runPod(t, prefix+"ci-app", prefix+"ci-app", other)
		svc := expose(t, prefix+"clusterip", prefix+"ci-app")
		client := runPod(t, prefix+"ci-client", prefix+"ci-client", node.Name)
		a := curl(t, client.NS, "http://"+svc.Spec.ClusterIP+"/")
		if a.client != client.IP.String() || a.server != prefix+"ci-app" {
			t.Errorf("want client_address=%s answered by %sci-app, saw client_address=%s from %s", client.IP, prefix, a.client, a.server)
		}
	})
	t.Run("NodePort: Cluster policy masquerades, Local keeps the client's address", func(t *testing.T) {
		runPod(t, prefix+"np-app", prefix+"np-app", node.Name)
		svc := expose(t, prefix+"nodeport", prefix+"np-app", nodePortType)
		url := fmt.Sprintf("http://%s:%d/", node.IP, svc.Spec.Ports[0].NodePort)
		if a := curl(t, lab.Client, url); !nodeAddresses()[a.client] {
			t.Errorf("Cluster policy: want a node address, saw client_address=%s", a.client)
		}
		patch(t, prefix+"nodeport", `{"spec":{"externalTrafficPolicy":"Local"}}`)
		err := cluster.Eventually(testContext(t), 10*time.Second, func() error {
			if a, err := curlOnce(lab.Client, url, 2*time.Second); err != nil || a.client != clientIP {
				return fmt.Errorf("Local policy: want client_address=%s, saw %q (%v)", clientIP, a.client, err)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	})
	t.Run("a Service without endpoints is refused", func(t *testing.T) {
		svc := expose(t, prefix+"nobody", prefix+"nobody-has-this-label")
		client := runPod(t, prefix+"refused-client", prefix+"refused-client", node.Name)
		if err := refused(client, svc.Spec.ClusterIP); err != nil {
			t.Error(err)
		}
	})
	t.Run("proxyMode and healthz", func(t *testing.T) {
		out, _, err := node.NS.Run(testContext(t), "curl", "-sS", "--max-time", "2", "http://localhost:10249/proxyMode")
		if err != nil || out != "iptables" {
			t.Errorf("curl localhost:10249/proxyMode = %q, %v; want iptables", out, err)
		}
		status, body, err := lab.Client.HTTPGet(testContext(t), fmt.Sprintf("http://%s:10256/healthz", node.IP), 2*time.Second)
		var m map[string]any
		json.Unmarshal([]byte(body), &m)
		if err != nil || status != 200 || m["lastUpdated"] == nil {
			t.Errorf("%s:10256/healthz = %d %s (%v); want 200 with lastUpdated", node.Name, status, body, err)
		}
	})
}
