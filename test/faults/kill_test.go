package faults

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

// manyServices is drill 4's number of Services: 1,000 in `make test`,
// which must stay within the CI budget, 10,000 in `make drills`.
var manyServices = flag.Int("faults.services", 1000, "drill 4's number of Services")

// bulkClient is an admin client without the lab client's rate limit (100
// requests per second), for writing thousands of objects.
func bulkClient() (kubernetes.Interface, error) {
	cfg := lab.Control.AdminConfig(lab.CPNS)
	cfg.QPS, cfg.Burst = 5000, 5000
	return kubernetes.NewForConfig(cfg)
}

// createMany creates n selector-less Services, each with one EndpointSlice
// of two endpoints (the steady pods), labelled drill=many.
func createMany(ctx context.Context, n int, eps []string) error {
	kube, err := bulkClient()
	if err != nil {
		return err
	}
	work := make(chan int)
	errs := make(chan error, 16)
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				name := fmt.Sprintf("many-%05d", i)
				labels := map[string]string{"drill": "many"}
				_, err := kube.CoreV1().Services("default").Create(ctx, &v1.Service{
					ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
					Spec:       v1.ServiceSpec{Ports: []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: 80}}},
				}, metav1.CreateOptions{})
				if err == nil {
					var endpoints []discoveryv1.Endpoint
					for _, ip := range eps {
						endpoints = append(endpoints, discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptrTo(true)}})
					}
					_, err = kube.DiscoveryV1().EndpointSlices("default").Create(ctx, &discoveryv1.EndpointSlice{
						ObjectMeta:  metav1.ObjectMeta{Name: name, Labels: map[string]string{"drill": "many", discoveryv1.LabelServiceName: name}},
						AddressType: discoveryv1.AddressTypeIPv4,
						Endpoints:   endpoints,
						Ports:       []discoveryv1.EndpointPort{{Name: ptrTo(""), Protocol: ptrTo(v1.ProtocolTCP), Port: ptrTo(int32(8080))}},
					}, metav1.CreateOptions{})
				}
				if err != nil {
					select {
					case errs <- fmt.Errorf("%s: %w", name, err):
					default:
					}
				}
			}
		}()
	}
	for i := range n {
		select {
		case work <- i:
		case err := <-errs:
			close(work)
			wg.Wait()
			return err
		}
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
		return nil
	}
}

// deleteMany removes drill 4's objects, one request each from 16 workers
// (a DeleteCollection of 10,000 slices outlasts any request timeout).
func deleteMany(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	kube, err := bulkClient()
	if err != nil {
		t.Error(err)
		return
	}
	work := make(chan string)
	var wg sync.WaitGroup
	var failed atomic.Int64
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for name := range work {
				if err := kube.DiscoveryV1().EndpointSlices("default").Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
					failed.Add(1)
				}
				if err := kube.CoreV1().Services("default").Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
					failed.Add(1)
				}
			}
		}()
	}
	for i := range *manyServices {
		work <- fmt.Sprintf("many-%05d", i)
	}
	close(work)
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Errorf("%d of drill 4's objects could not be deleted", n)
	}
}

// miniproxyRules is miniproxy's lines of a node's saved rules, both
// families, counters zeroed (saveTables, ownLines).
func miniproxyRules(ctx context.Context, t *testing.T, n *cluster.Node) string {
	t.Helper()
	save, err := saveTables(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(ownLines(save), "\n")
}

// serviceRules is what node's tables say about a Service IP (the lines
// that name it, and the chains they jump to), for the message of a failed
// drill.
func serviceRules(ctx context.Context, n *cluster.Node, ip string) string {
	save, err := saveTables(ctx, n)
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s's rules for %s:\n", n.Name, ip)
	for _, l := range strings.Split(save, "\n") {
		if strings.Contains(l, ip) {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// serviceSlices is what the API server holds of a Service's
// EndpointSlices, for the message of a failed drill.
func serviceSlices(ctx context.Context, service string) string {
	slices, err := lab.Kube.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + service})
	if err != nil {
		return fmt.Sprintf("list the EndpointSlices of %s: %v\n", service, err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d EndpointSlices of %s:\n", len(slices.Items), service)
	for _, s := range slices.Items {
		fmt.Fprintf(&b, "%s (created %s):", s.Name, s.CreationTimestamp.Format("15:04:05"))
		for _, e := range s.Endpoints {
			fmt.Fprintf(&b, " %v ready=%v", e.Addresses, e.Conditions.Ready != nil && *e.Conditions.Ready)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// Drill 4: miniproxy is killed (SIGKILL) in the middle of its first sync of
// many Services (-faults.services); started again, it converges to exactly the rules of a
// clean start, with no chain left behind, while the other node and the
// steady Service carry on.
func TestDrillKilledDuringTheFirstSync(t *testing.T) {
	ctx := testContext(t, 8*time.Minute)
	steady(t)
	var eps []string
	for _, n := range lab.Nodes {
		eps = append(eps, lab.Pod("steady-"+n.Name).IP.String())
	}
	began := time.Now()
	t.Cleanup(func() { deleteMany(t) })
	if err := createMany(ctx, *manyServices, eps); err != nil {
		t.Fatalf("create %d Services: %v", *manyServices, err)
	}
	t.Logf("created %d Services with their slices in %s", *manyServices, time.Since(began).Round(time.Second))
	l := startLoad(t)

	node := lab.Nodes[1]
	bin, err := netns.Build("github.com/miniproxy/miniproxy/cmd/miniproxy")
	if err != nil {
		t.Fatal(err)
	}
	// Wait until node2's miniproxy has all of them, then start it from no
	// rules at all, as a new node would.
	waitForRules(ctx, t, node, fmt.Sprintf("default/many-%05d", *manyServices-1))
	if err := lab.StopProxy(node); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		lab.StopProxy(node)
		if err := lab.StartProxy(context.Background(), node, nil); err != nil {
			t.Errorf("restart %s's miniproxy: %v", node.Name, err)
		}
	})
	cleanup := func() {
		if _, stderr, err := node.NS.Run(ctx, bin, "--cleanup"); err != nil {
			t.Fatalf("miniproxy --cleanup: %v\n%s", err, stderr)
		}
	}
	cleanup()

	// The kill: while the first sync's iptables-restore, a child of
	// miniproxy, is running.
	p, err := node.NS.StartCmd(proxyCmd(bin, node))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitForOutput(ctx, "informer caches synced"); err != nil {
		t.Fatal(err)
	}
	restoring := waitForChild(p.Pid(), "iptables-restor", 10*time.Second)
	syscall.Kill(-p.Pid(), syscall.SIGKILL)
	<-p.Done()
	midSync := restoring && !strings.Contains(p.Output(), "rules synced")
	partial := miniproxyRules(ctx, t, node)
	t.Logf("killed %s the first sync was done; %d lines of miniproxy's rules were in the kernel", map[bool]string{true: "before", false: "after"}[midSync], strings.Count(partial, "\n"))

	restarted := time.Now()
	if err := lab.StartProxy(ctx, node, nil); err != nil {
		t.Fatal(err)
	}
	converged := time.Since(restarted)
	afterKill := miniproxyRules(ctx, t, node)

	// A clean start, for comparison.
	if err := lab.StopProxy(node); err != nil {
		t.Fatal(err)
	}
	cleanup()
	if err := lab.StartProxy(ctx, node, nil); err != nil {
		t.Fatal(err)
	}
	clean := miniproxyRules(ctx, t, node)
	if afterKill != clean {
		t.Errorf("the rules after the kill and restart differ from a clean start's (%d and %d lines)", strings.Count(afterKill, "\n"), strings.Count(clean, "\n"))
	}
	failed, total := l.stop(t)
	if failed > 0 {
		t.Errorf("%d of %d requests to the steady Service failed", failed, total)
	}
	record(t, figures{
		drill:    fmt.Sprintf("4. SIGKILL in the first sync of %d Services, then restart", *manyServices),
		failed:   failed,
		total:    total,
		recovery: fmt.Sprintf("restart to first complete sync: %s; rules equal to a clean start's (%d lines)", converged.Round(100*time.Millisecond), strings.Count(clean, "\n")),
		operatorSaw: fmt.Sprintf("the killed process had %s its first sync (%d rule lines in the kernel at the kill); the new one logged `rules synced` once done",
			map[bool]string{true: "not finished", false: "finished"}[midSync], strings.Count(partial, "\n")),
	})
}

// proxyCmd is the lab's usual miniproxy command for node, outside the
// lab's bookkeeping, for a process the test kills itself.
func proxyCmd(bin string, n *cluster.Node) *exec.Cmd {
	cmd := exec.Command(bin, lab.ProxyArgs(n)...)
	cmd.Env = netns.CleanEnv()
	return cmd
}

// waitForChild waits until the process pid has a child whose command name
// (as the kernel keeps it, 15 characters at most) is comm, and says whether
// it saw one.
func waitForChild(pid int, comm string, limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			raw, err := os.ReadFile("/proc/" + e.Name() + "/stat")
			if err != nil {
				continue
			}
			// pid (comm) state ppid ...
			stat := string(raw)
			open, closeAt := strings.IndexByte(stat, '('), strings.LastIndexByte(stat, ')')
			if open < 0 || closeAt < open {
				continue
			}
			fields := strings.Fields(stat[closeAt+1:])
			if len(fields) > 1 && stat[open+1:closeAt] == comm && fields[1] == strconv.Itoa(pid) {
				return true
			}
		}
		time.Sleep(time.Millisecond)
	}
	return false
}

// waitForRules waits until node's rules mention what.
func waitForRules(ctx context.Context, t *testing.T, n *cluster.Node, what string) {
	t.Helper()
	err := cluster.Eventually(ctx, 3*time.Minute, func() error {
		out, _, err := n.NS.Run(ctx, "iptables-save", "-t", "nat")
		if err != nil || !strings.Contains(out, what) {
			return fmt.Errorf("%s has no rule for %s yet", n.Name, what)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
