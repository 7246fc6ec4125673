package e2e

import (
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/miniproxy/miniproxy/test/netns"
)

// TestNodeRunsWithInClusterCredentials is TestNodeRunsFromTheConfigMap with
// the credentials a pod gets without a kubeconfig: config.conf's
// clientConnection.kubeconfig is emptied, so miniproxy uses the in-cluster
// configuration, the API server from KUBERNETES_SERVICE_HOST and
// KUBERNETES_SERVICE_PORT and the ServiceAccount's token and CA from
// /var/run/secrets/kubernetes.io/serviceaccount.
//
// That directory exists only inside a container, so miniproxy runs in a
// private mount namespace of its own (unshare --mount) where a lab
// directory holding secrets/kubernetes.io/serviceaccount is mounted over
// /run (/var/run is a link to it). Mounts in that namespace are not seen
// by the machine and vanish with the process.
func TestNodeRunsWithInClusterCredentials(t *testing.T) {
	ctx := testContext(t)
	bin := proxyBinaryWithConfig(t)
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("unshare (util-linux) is not installed")
	}
	node := lab.Node("node2")
	files := configMapFiles(t, ctx)

	conf, err := os.ReadFile(files.config)
	if err != nil {
		t.Fatal(err)
	}
	inCluster := replaceOnce(t, string(conf), "kubeconfig: "+files.kubeconfig, `kubeconfig: ""`, 1)
	confPath := filepath.Join(files.dir, "in-cluster.conf")
	if err := os.WriteFile(confPath, []byte(inCluster), 0o600); err != nil {
		t.Fatal(err)
	}
	runDir := filepath.Join(files.dir, "run")
	sa := filepath.Join(runDir, "secrets", "kubernetes.io")
	if err := os.MkdirAll(sa, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(files.secrets, filepath.Join(sa, "serviceaccount")); err != nil {
		t.Fatal(err)
	}
	server, err := url.Parse(lab.Control.Server())
	if err != nil {
		t.Fatal(err)
	}

	args := daemonSetArgs(t, node, confPath)
	stale := staleKubeProxy(t, "ic-")
	runAsDaemonSet(t, ctx, node, bin, stale.rules, func() error {
		return lab.StartProxyCmd(ctx, node, func(bin string, _ []string) *exec.Cmd {
			script := `mount --bind "$MINIPROXY_TEST_RUN" /run && exec "$@"`
			cmd := exec.Command("unshare", append([]string{"--mount", "--propagation", "private", "--",
				"sh", "-c", script, "sh", bin}, args...)...)
			cmd.Env = append(netns.CleanEnv(),
				"MINIPROXY_TEST_RUN="+runDir,
				"KUBERNETES_SERVICE_HOST="+server.Hostname(),
				"KUBERNETES_SERVICE_PORT="+server.Port())
			return cmd
		})
	})
	stale.check(t, node)
	tutorialChecks(t, node, "ic-")
}
