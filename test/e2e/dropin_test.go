package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/test/cluster"
)

// replaceProxy stops node's usual miniproxy, starts one with exactly args
// (and nothing the lab adds), and brings the usual one back at the end.
func replaceProxy(t *testing.T, ctx context.Context, node *cluster.Node, args []string) {
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
// ignored.
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
		"--oom-score-adj=-999",
		"--feature-gates=AllowServiceExternalIPs=true",
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
}
