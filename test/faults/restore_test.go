package faults

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

// restoreFailuresMetric is kube-proxy's count of failed iptables-restore
// runs, for IPv4.
const restoreFailuresMetric = `kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"}`

// failingRestore writes an iptables-restore for a node's PATH that fails,
// as a broken or blocked tool would, while the file switch exists, and
// otherwise hands everything to the real iptables-restore. It returns the
// wrapper's directory.
func failingRestore(t *testing.T, switchFile string) (dir string) {
	t.Helper()
	return cluster.WrapTool(t, "iptables-restore", func(real string) string {
		return fmt.Sprintf(`#!/bin/sh
# Fault drill 1: fails while %[1]s exists; see failingRestore.
if [ -e %[1]s ]; then
  cat >/dev/null
  echo "iptables-restore: failing on purpose (fault drill: %[1]s exists)" >&2
  exit 1
fi
exec %[2]s "$@"
`, switchFile, real)
	})
}

// scrapeMetric reads one sample from a node's metrics address (miniproxy's
// default, 127.0.0.1:10249, reached from inside the node's namespace).
func scrapeMetric(ctx context.Context, node *cluster.Node, sample string) (float64, error) {
	status, body, err := node.NS.HTTPGet(ctx, "http://127.0.0.1:10249/metrics", 2*time.Second)
	if err != nil || status != 200 {
		return 0, fmt.Errorf("scrape %s's metrics: %d %v", node.Name, status, err)
	}
	for _, l := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(l, sample+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, nil // a counter without samples yet
}

// healthz asks a node's proxier health from inside its namespace.
func healthz(ctx context.Context, node *cluster.Node) int {
	status, _, err := node.NS.HTTPGet(ctx, "http://127.0.0.1:10256/healthz", time.Second)
	if err != nil {
		return 0
	}
	return status
}

// syncFailedLine is miniproxy's error line for a failed sync.
var syncFailedLine = regexp.MustCompile(`(?m)^E\d{4} .*"sync failed; it is retried".*$`)

// Drill 1: iptables-restore fails for 20 s on node1, which carries the
// load. The rules in the kernel stay, so traffic keeps flowing; the node
// logs the failure, counts it in restore_failures_total, retries with a
// backoff, and /healthz turns 503 once a change (a Service and its
// EndpointSlice created during the fault) has waited twice the sync
// period; within one sync of the fault's end the new Service carries
// traffic and /healthz is 200 again.
func TestDrillRestoreFails(t *testing.T) {
	const (
		syncPeriod = 5 * time.Second
		fault      = 20 * time.Second
		timeout    = 2 * syncPeriod // /healthz's, as kube-proxy's
	)
	ctx := testContext(t, 3*time.Minute)
	node := lab.Nodes[0] // the node the load goes through
	switchFile := filepath.Join(t.TempDir(), "fail")
	dir := failingRestore(t, switchFile)
	lab.TakeOverProxy(t, node)
	err := lab.StartProxyCmd(ctx, node, func(bin string, args []string) *exec.Cmd {
		cmd := exec.Command(bin, append(args, "--iptables-sync-period", syncPeriod.String())...)
		cmd.Env = append(netns.CleanEnv(), "PATH="+dir+":"+os.Getenv("PATH"))
		return cmd
	})
	if err != nil {
		t.Fatal(err)
	}
	l := startLoad(t)
	before, err := scrapeMetric(ctx, node, restoreFailuresMetric)
	if err != nil {
		t.Fatal(err)
	}
	if code := healthz(ctx, node); code != 200 {
		t.Fatalf("/healthz before the fault = %d", code)
	}
	time.Sleep(2 * time.Second) // some load before the fault
	mark := len(node.Proxy.Output())

	if err := os.WriteFile(switchFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	faultStart := time.Now()
	t.Cleanup(func() { os.Remove(switchFile) })
	time.Sleep(time.Second)
	svc, err := createWithSlice(ctx, "during-restore-fault")
	t.Cleanup(func() {
		lab.Kube.CoreV1().Services("default").Delete(context.Background(), "during-restore-fault", metav1.DeleteOptions{})
		lab.Kube.DiscoveryV1().EndpointSlices("default").Delete(context.Background(), "during-restore-fault-manual", metav1.DeleteOptions{})
	})
	if err != nil {
		t.Fatal(err)
	}
	created := time.Now()
	newURL := "http://" + svc.Spec.ClusterIP + ":80/"

	// During the fault: the error line, /healthz every 250 ms.
	var errLine string
	var errAfter, unhealthyAfter time.Duration
	for time.Since(faultStart) < fault {
		if errLine == "" {
			if m := syncFailedLine.FindString(node.Proxy.Output()[mark:]); m != "" {
				errLine, errAfter = m, time.Since(faultStart)
			}
		}
		if unhealthyAfter == 0 && healthz(ctx, node) == 503 {
			unhealthyAfter = time.Since(created)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if _, err := steadyPod.NS.Curl(ctx, newURL, time.Second); err == nil {
		t.Errorf("the Service created during the fault answered before the fault ended: were its rules restored?")
	}
	during, err := scrapeMetric(ctx, node, restoreFailuresMetric)
	if err != nil {
		t.Fatal(err)
	}
	failedLines := syncFailedLine.FindAllString(node.Proxy.Output()[mark:], -1)
	failedSyncs := len(failedLines)

	if err := os.Remove(switchFile); err != nil {
		t.Fatal(err)
	}
	faultEnd := time.Now()
	var servedAfter, healthyAfter time.Duration
	err = cluster.Eventually(ctx, 30*time.Second, func() error {
		if healthyAfter == 0 && healthz(ctx, node) == 200 {
			healthyAfter = time.Since(faultEnd)
		}
		if servedAfter == 0 {
			if _, err := steadyPod.NS.Curl(ctx, newURL, 500*time.Millisecond); err != nil {
				return fmt.Errorf("the Service created during the fault: %v", err)
			}
			servedAfter = time.Since(faultEnd)
		}
		if healthyAfter == 0 {
			return fmt.Errorf("/healthz is not 200 yet")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("after the fault: %v\n%s", err, node.Proxy.Output()[mark:])
	}
	time.Sleep(time.Second) // some load after the fault
	failed, total := l.stop(t)

	if failed > 0 {
		t.Errorf("%d of %d requests failed while iptables-restore failed: the rules in the kernel should have stayed", failed, total)
	}
	if errLine == "" || !strings.Contains(errLine, "iptables-restore failed") {
		t.Errorf("no error line naming the failed iptables-restore during the fault; output since:\n%s", node.Proxy.Output()[mark:])
	}
	if during <= before {
		t.Errorf("%s = %v during the fault, %v before: the failures were not counted", restoreFailuresMetric, during, before)
	}
	// /healthz turns 503 once the change has waited the timeout (polled
	// every 250 ms; the change may be noticed some 100 ms after creation).
	if unhealthyAfter == 0 || unhealthyAfter < timeout-500*time.Millisecond || unhealthyAfter > timeout+2*time.Second {
		t.Errorf("/healthz turned 503 %s after the change (0: never during the fault); want about the timeout, %s", unhealthyAfter.Round(10*time.Millisecond), timeout)
	}
	if servedAfter > syncPeriod+time.Second {
		t.Errorf("the Service created during the fault took %s after it to carry traffic; want within one sync period (%s)", servedAfter.Round(10*time.Millisecond), syncPeriod)
	}
	if failedSyncs > int(fault/time.Second) {
		t.Errorf("%d failed syncs in %s: the retries hammer", failedSyncs, fault)
	}
	record(t, figures{
		drill:  "1. iptables-restore fails for 20 s (node1, --iptables-sync-period 5s)",
		failed: failed,
		total:  total,
		recovery: fmt.Sprintf("the Service created during the fault carried traffic %s after it ended, /healthz 200 again after %s; %d failed syncs in the 20 s, %s apart",
			servedAfter.Round(10*time.Millisecond), healthyAfter.Round(10*time.Millisecond), failedSyncs, gaps(failedLines)),
		operatorSaw: fmt.Sprintf("after %s: `%s`; `%s` %v before, %v at the end of the fault; /healthz 503 %s after the change was made (timeout 2 x 5 s)",
			errAfter.Round(100*time.Millisecond), shorten(strings.TrimSpace(errLine), 420), restoreFailuresMetric, before, during, unhealthyAfter.Round(100*time.Millisecond)),
	})
}

// shorten cuts s to at most n bytes, marking the cut.
func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + " ..."
}

// gaps gives the time between consecutive klog lines, from their
// timestamps: "1.0, 2.0, 4.0 s".
func gaps(lines []string) string {
	var out []string
	var prev time.Time
	for i, l := range lines {
		if len(l) < 21 {
			continue
		}
		at, err := time.Parse("15:04:05.000000", l[6:21])
		if err != nil {
			continue
		}
		if i > 0 {
			out = append(out, fmt.Sprintf("%.1f", at.Sub(prev).Seconds()))
		}
		prev = at
	}
	return strings.Join(out, ", ") + " s"
}

// createWithSlice creates a Service without selector and its EndpointSlice,
// naming the steady pods, as a user who manages a Service's endpoints
// would: the change is complete at once, without waiting for
// kube-controller-manager (which may still be backing off after drill 3's
// API server outage).
func createWithSlice(ctx context.Context, name string) (*v1.Service, error) {
	svc, err := lab.Kube.CoreV1().Services("default").Create(ctx, &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       v1.ServiceSpec{Ports: []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, err
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-manual", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: ptr.To[int32](8080), Protocol: ptr.To(v1.ProtocolTCP)}},
	}
	for _, n := range lab.Nodes {
		pod := lab.Pod("steady-" + n.Name)
		if pod == nil {
			return nil, fmt.Errorf("no pod steady-%s", n.Name)
		}
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{pod.IP.String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
			NodeName:   ptr.To(n.Name),
		})
	}
	if _, err := lab.Kube.DiscoveryV1().EndpointSlices("default").Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	return svc, nil
}
