package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/test/cluster"
)

// takeOverProxy stops node's usual miniproxy for the test, which starts
// its own, and brings the usual one back at the end.
func takeOverProxy(t *testing.T, node *cluster.Node) {
	t.Helper()
	lab.TakeOverProxy(t, node)
}

// replaceProxy runs miniproxy on node with exactly args (and nothing the
// lab adds) for the test.
func replaceProxy(t *testing.T, ctx context.Context, node *cluster.Node, args []string) {
	t.Helper()
	takeOverProxy(t, node)
	if err := lab.StartProxy(ctx, node, func(*cluster.Node) ([]string, bool) { return args, true }); err != nil {
		t.Fatalf("start miniproxy with %q: %v", args, err)
	}
}

// An operator replaces the image of kubeadm's own kube-proxy DaemonSet and
// changes nothing else: miniproxy runs with the DaemonSet's exact command
// line (kubeadm v1.37: --config=/var/lib/kube-proxy/config.conf
// --hostname-override=$(NODE_NAME)) and the config.conf kubeadm writes
// (pkg/config/testdata/kubeadm-config.conf), and the node passes the
// tutorial. As in TestNodeRunsFromTheConfigMap, the file lives elsewhere
// and names the lab's kubeconfig, and conntrack.maxPerCore is 0: the
// machine's nf_conntrack_max is not the lab's to change.
func TestKubeadmDaemonSetCommandLine(t *testing.T) {
	ctx := testContext(t)
	node := lab.Node("node2")
	raw, err := os.ReadFile("../../pkg/config/testdata/kubeadm-config.conf")
	if err != nil {
		t.Fatal(err)
	}
	conf := string(raw)
	conf = replaceOnce(t, conf, "kubeconfig: /var/lib/kube-proxy/kubeconfig.conf", "kubeconfig: "+lab.Control.ProxyKubeconfig(), 1)
	conf = replaceOnce(t, conf, "clusterCIDR: 10.244.0.0/16", "clusterCIDR: "+cluster.ClusterCIDR.String(), 1)
	conf = replaceOnce(t, conf, "maxPerCore: null", "maxPerCore: 0", 1)
	path := filepath.Join(t.TempDir(), "config.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	replaceProxy(t, ctx, node, []string{"--config=" + path, "--hostname-override=" + node.Name})
	if out := node.Proxy.Output(); strings.Contains(out, "config file") || strings.Contains(out, "is ignored") {
		t.Errorf("miniproxy warned about kubeadm's configuration:\n%s", out)
	}
	tutorialChecks(t, node, "kubeadm-")
}

// A flag-only DaemonSet, as distributions wrote them before --config: 30
// kube-proxy flags, every one with the meaning kube-proxy gives it, and
// the node passes the tutorial. Only the IPVS flag is reported, as
// ignored. The feature gate AllowServiceExternalIPs=false takes effect (no
// rules for an externalIP on this node, while node1 has them), and the
// node gets kube-proxy's Starting event.
func TestFlagOnlyDaemonSetCommandLine(t *testing.T) {
	ctx := testContext(t)
	node := lab.Node("node2")
	args := []string{
		"--kubeconfig=" + lab.Control.ProxyKubeconfig(),
		"--hostname-override=" + node.Name,
		"--proxy-mode=iptables",
		"--cluster-cidr=" + cluster.ClusterCIDR.String(),
		"--detect-local-mode=ClusterCIDR",
		"--iptables-sync-period=30s",
		"--iptables-min-sync-period=1s",
		"--iptables-masquerade-bit=14",
		"--iptables-localhost-nodeports=true",
		"--masquerade-all=false",
		"--nodeport-addresses=primary",
		"--bind-address=0.0.0.0",
		"--bind-address-hard-fail=false",
		"--healthz-bind-address=0.0.0.0:10256",
		"--metrics-bind-address=127.0.0.1:10249",
		"--conntrack-max-per-core=0",
		"--conntrack-min=0",
		"--conntrack-tcp-timeout-established=24h",
		"--conntrack-tcp-timeout-close-wait=1h",
		"--conntrack-udp-timeout=30s",
		"--conntrack-udp-timeout-stream=2m",
		"--config-sync-period=15m",
		"--kube-api-qps=5",
		"--kube-api-burst=10",
		"--kube-api-content-type=application/vnd.kubernetes.protobuf",
		"--oom-score-adj=555", // raising needs no CAP_SYS_RESOURCE, which this machine lacks
		"--feature-gates=AllowServiceExternalIPs=false",
		"--profiling=false",
		"--logging-format=text",
		"--v=2",
		"--ipvs-scheduler=rr",
	}
	replaceProxy(t, ctx, node, args)
	var warnings []string
	for _, l := range strings.Split(node.Proxy.Output(), "\n") {
		if strings.HasPrefix(l, "W") || strings.HasPrefix(l, "E") {
			warnings = append(warnings, l)
		}
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "--ipvs-scheduler is ignored") {
		t.Errorf("want exactly one warning, about --ipvs-scheduler; got:\n%s", strings.Join(warnings, "\n"))
	}
	tutorialChecks(t, node, "flags-")

	t.Run("AllowServiceExternalIPs=false: no rules for externalIPs", func(t *testing.T) {
		runPod(t, "flags-eip-app", "flags-eip-app", node.Name)
		expose(t, "flags-eip", "flags-eip-app", func(s *v1.Service) { s.Spec.ExternalIPs = []string{"192.0.2.77"} })
		save := func(n *cluster.Node) string {
			out, _, err := n.NS.Run(ctx, "iptables-save", "-t", "nat")
			if err != nil {
				t.Fatal(err)
			}
			return out
		}
		err := cluster.Eventually(ctx, 10*time.Second, func() error {
			if !strings.Contains(save(lab.Node("node1")), "192.0.2.77") {
				return fmt.Errorf("node1, with the gate on, has no rule for the externalIP yet")
			}
			if !strings.Contains(save(node), "default/flags-eip") {
				return fmt.Errorf("%s has no rules for the Service yet", node.Name)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if rules := save(node); strings.Contains(rules, "192.0.2.77") || !strings.Contains(rules, "default/flags-eip") {
			t.Errorf("%s, with the gate off, should have the Service's rules but none for its externalIP:\n%s", node.Name, grepLines(rules, "flags-eip"))
		}
	})
	t.Run("--oom-score-adj applied to the process", func(t *testing.T) {
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", node.Proxy.Pid()))
		if err != nil || strings.TrimSpace(string(raw)) != "555" {
			t.Errorf("oom_score_adj = %q (%v), want 555", raw, err)
		}
	})
	t.Run("Starting event on the Node", func(t *testing.T) {
		err := cluster.Eventually(ctx, 10*time.Second, func() error {
			evs, err := lab.Kube.CoreV1().Events("default").List(ctx, metav1.ListOptions{
				FieldSelector: "involvedObject.kind=Node,involvedObject.name=" + node.Name + ",reason=Starting"})
			if err != nil {
				return err
			}
			if len(evs.Items) == 0 || evs.Items[0].Type != v1.EventTypeNormal {
				return fmt.Errorf("want a Normal Starting event on Node %s, got %+v", node.Name, evs.Items)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	})
}
