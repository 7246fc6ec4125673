package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

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
// ClusterRoleBinding and the ConfigMap are applied to the lab; the init
// container's `miniproxy --cleanup-kube-proxy` runs first; then miniproxy
// runs with only --config (the ConfigMap's config.conf, read back from the
// API server) and --hostname-override, authenticating as the ServiceAccount
// with kubeconfig.conf's token file and CA file. That node then passes the
// tutorial's checks. node2's usual miniproxy comes back at the end.
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

	runAsDaemonSet(t, ctx, node, bin, func() error {
		return lab.StartProxy(ctx, node, func(n *cluster.Node) ([]string, bool) {
			return []string{"--config", files.config, "--hostname-override", n.Name}, true
		})
	})
	tutorialChecks(t, node)
}

// proxyBinaryWithConfig returns the lab's miniproxy binary, skipping the
// test when it does not have --config and --cleanup-kube-proxy yet.
func proxyBinaryWithConfig(t *testing.T) string {
	t.Helper()
	bin, err := netns.Build("github.com/miniproxy/miniproxy/cmd/miniproxy")
	if err != nil {
		t.Fatal(err)
	}
	// -h prints the flags and exits with status 2: the error is expected.
	stdout, stderr, _ := lab.CPNS.Run(context.Background(), bin, "-h")
	help := stdout + stderr
	if !strings.Contains(help, "-config") || !strings.Contains(help, "-cleanup-kube-proxy") {
		t.Skip("miniproxy has no --config and --cleanup-kube-proxy yet (cmd/miniproxy wiring pending)")
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

// runAsDaemonSet stops node's miniproxy, runs `miniproxy --cleanup-kube-proxy`
// there as the DaemonSet's init container does (it must leave miniproxy's
// own rules alone), removes miniproxy's rules so that the new process has
// to program everything itself, and calls start, which starts miniproxy on
// node as the DaemonSet's container would and waits for its first sync.
// At the end node's usual miniproxy is started again.
func runAsDaemonSet(t *testing.T, ctx context.Context, node *cluster.Node, bin string, start func() error) {
	t.Helper()
	if err := lab.StopProxy(node); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		lab.StopProxy(node)
		if err := lab.StartProxy(context.Background(), node, nil); err != nil {
			t.Errorf("restart %s's usual miniproxy: %v", node.Name, err)
		}
	})
	before, _, err := node.NS.Run(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := node.NS.Run(ctx, bin, "--cleanup-kube-proxy"); err != nil {
		t.Fatalf("miniproxy --cleanup-kube-proxy: %v\n%s", err, stderr)
	}
	after, _, err := node.NS.Run(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(before, "MP-") == 0 || strings.Count(after, "MP-") != strings.Count(before, "MP-") {
		t.Errorf("--cleanup-kube-proxy changed miniproxy's rules: %d MP- mentions before, %d after", strings.Count(before, "MP-"), strings.Count(after, "MP-"))
	}
	if _, stderr, err := node.NS.Run(ctx, bin, "--cleanup"); err != nil {
		t.Fatalf("miniproxy --cleanup: %v\n%s", err, stderr)
	}
	if err := start(); err != nil {
		t.Fatalf("start miniproxy as the DaemonSet does: %v", err)
	}
	if out := node.Proxy.Output(); strings.Contains(out, "config file:") || strings.Contains(out, "is ignored") {
		t.Errorf("miniproxy warned about the ConfigMap's configuration:\n%s", out)
	}
}

// tutorialChecks walks the tutorial through node: ClusterIP from a pod on
// it, NodePort on it with both policies, a Service without endpoints, the
// proxy mode and the proxier's health.
func tutorialChecks(t *testing.T, node *cluster.Node) {
	other := "node1"
	if node.Name == other {
		other = "node2"
	}
	t.Run("pod to ClusterIP keeps the pod's address", func(t *testing.T) {
		runPod(t, "cm-ci-app", "cm-ci-app", other)
		svc := expose(t, "cm-clusterip", "cm-ci-app")
		client := runPod(t, "cm-ci-client", "cm-ci-client", node.Name)
		a := curl(t, client.NS, "http://"+svc.Spec.ClusterIP+"/")
		if a.client != client.IP.String() || a.server != "cm-ci-app" {
			t.Errorf("want client_address=%s answered by cm-ci-app, saw client_address=%s from %s", client.IP, a.client, a.server)
		}
	})
	t.Run("NodePort: Cluster policy masquerades, Local keeps the client's address", func(t *testing.T) {
		runPod(t, "cm-np-app", "cm-np-app", node.Name)
		svc := expose(t, "cm-nodeport", "cm-np-app", nodePortType)
		url := fmt.Sprintf("http://%s:%d/", node.IP, svc.Spec.Ports[0].NodePort)
		if a := curl(t, lab.Client, url); !nodeAddresses()[a.client] {
			t.Errorf("Cluster policy: want a node address, saw client_address=%s", a.client)
		}
		patch(t, "cm-nodeport", `{"spec":{"externalTrafficPolicy":"Local"}}`)
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
		svc := expose(t, "cm-nobody", "cm-nobody-has-this-label")
		client := runPod(t, "cm-refused-client", "cm-refused-client", node.Name)
		err := cluster.Eventually(testContext(t), 10*time.Second, func() error {
			_, err := client.NS.Curl(context.Background(), "http://"+svc.Spec.ClusterIP+"/", 3*time.Second)
			if err == nil || !strings.Contains(err.Error(), "refused") {
				return fmt.Errorf("want connection refused, saw %v", err)
			}
			return nil
		})
		if err != nil {
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
