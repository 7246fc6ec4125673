package parity

import (
	"context"
	"fmt"
	"maps"
	"net"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

// absentOnPurpose are the families kube-proxy's iptables mode may export
// that miniproxy does not, and why (docs/compatibility.md, Metrics).
var absentOnPurpose = map[string]string{
	"kubeproxy_iptables_ct_state_invalid_dropped_packets_total":     "miniproxy adds no nfacct counter to its conntrack-INVALID drop rule",
	"kubeproxy_iptables_localhost_nodeports_accepted_packets_total": "miniproxy never serves NodePorts on localhost, so there is nothing to count",
}

// inScope says which families the comparison covers: kube-proxy's own,
// client-go's and the build information.
func inScope(name string) bool {
	return strings.HasPrefix(name, "kubeproxy_") || strings.HasPrefix(name, "rest_client_") || name == "kubernetes_build_info"
}

// hcPort is the healthCheckNodePort a squatter holds on both nodes.
const hcPort = 32555

// TestMetricsFamiliesMatchKubeProxy runs miniproxy on node1 and upstream
// kube-proxy (iptables mode) on node2 of one lab, against one API server
// with a handful of Services, scrapes both /metrics, and fails on any
// kubeproxy_*, rest_client_* or kubernetes_build_info family kube-proxy
// exports that miniproxy lacks (absentOnPurpose aside) or exports with
// another type, other label names, another help or other buckets. It also
// compares the two proxies' Warning event for a healthCheckNodePort that
// someone else holds, and what --bind-address-hard-fail does with a taken
// healthz port.
func TestMetricsFamiliesMatchKubeProxy(t *testing.T) {
	bins := labBinaries(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c, err := cluster.Start(ctx, cluster.Options{
		Nodes:          2,
		NoLoadBalancer: true,
		Logf:           t.Logf,
		ProxyArgs: func(*cluster.Node) ([]string, bool) {
			return []string{"--iptables-min-sync-period", minSyncPeriod}, false
		},
		Proxy: func(n *cluster.Node, kubeconfig string) *exec.Cmd {
			if n.Name == "node2" {
				return kubeProxyCmd(bins.KubeProxy, n, kubeconfig)
			}
			return nil
		},
		ProxySynced: kubeProxySynced,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			t.Logf("lab:\n%s", c.Outputs())
		}
		c.Close()
	}()
	mini, kube := c.Node("node1"), c.Node("node2")

	// Someone holds the health check port on both nodes before the
	// Service that asks for it exists.
	for _, n := range c.Nodes {
		l := squat(t, n, fmt.Sprintf(":%d", hcPort))
		defer l.Close()
	}
	if err := addServices(ctx, c); err != nil {
		t.Fatal(err)
	}
	s := &side{proxy: "both", c: c}
	if err := s.waitSynced(ctx); err != nil {
		t.Fatal(err)
	}

	fams := map[string]map[string]*dto.MetricFamily{}
	for _, n := range []*cluster.Node{mini, kube} {
		_, body, err := n.NS.HTTPGet(ctx, "http://127.0.0.1:10249/metrics", 5*time.Second)
		if err != nil {
			t.Fatalf("scrape %s: %v", n.Name, err)
		}
		parser := expfmt.NewTextParser(model.UTF8Validation)
		f, err := parser.TextToMetricFamilies(strings.NewReader(body))
		if err != nil {
			t.Fatalf("parse %s's /metrics: %v", n.Name, err)
		}
		fams[n.Name] = f
	}
	for _, d := range compareFamilies(fams[kube.Name], fams[mini.Name]) {
		if reason, ok := absentOnPurpose[d.name]; ok && d.absent {
			t.Logf("absent on purpose: %s (%s)", d.name, reason)
			continue
		}
		t.Error(d.text)
	}
	for _, name := range slices.Sorted(maps.Keys(fams[mini.Name])) {
		if _, ok := fams[kube.Name][name]; inScope(name) && !ok {
			t.Logf("miniproxy exports %s, kube-proxy did not in this run", name)
		}
	}
	// Label values differ by nature (hosts, versions, counts); they are
	// shown, not judged.
	var compared []string
	for _, name := range slices.Sorted(maps.Keys(fams[kube.Name])) {
		g := fams[mini.Name][name]
		if !inScope(name) || g == nil {
			continue
		}
		compared = append(compared, name)
		for _, label := range labelNames(fams[kube.Name][name]) {
			if a, b := labelValues(fams[kube.Name][name], label), labelValues(g, label); !slices.Equal(a, b) && label != "le" {
				t.Logf("%s{%s}: kube-proxy %q, miniproxy %q", name, label, a, b)
			}
		}
	}
	t.Logf("compared %d families:\n  %s", len(compared), strings.Join(compared, "\n  "))
	var others []string
	goRuntime := 0
	for _, name := range slices.Sorted(maps.Keys(fams[kube.Name])) {
		if _, ok := fams[mini.Name][name]; !inScope(name) && !ok {
			if strings.HasPrefix(name, "go_") {
				goRuntime++
				continue
			}
			others = append(others, name)
		}
	}
	t.Logf("not compared, exported by kube-proxy only: %s, and %d go_* runtime families", strings.Join(others, " "), goRuntime)

	compareHealthCheckEvents(ctx, t, c)
	compareHardFail(ctx, t, c, bins.KubeProxy)
}

// squat holds addr in n's namespace, as another program would.
func squat(t *testing.T, n *cluster.Node, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	if err := n.NS.Do(func() (err error) { l, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatalf("hold %s on %s: %v", addr, n.Name, err)
	}
	return l
}

// addServices makes a backend on each node, one more on node1, and four
// Services: plain, UDP, internalTrafficPolicy Local and a LoadBalancer with
// externalTrafficPolicy Local (whose health check port is held).
func addServices(ctx context.Context, c *cluster.Cluster) error {
	for _, p := range []cluster.PodSpec{
		{Name: "b1", Labels: map[string]string{"role": "backend"}, Node: c.Node("node1")},
		{Name: "b2", Labels: map[string]string{"role": "backend"}, Node: c.Node("node2")},
		{Name: "solo", Labels: map[string]string{"role": "solo"}, Node: c.Node("node1")},
	} {
		if _, err := c.AddPod(ctx, p); err != nil {
			return err
		}
	}
	tcp := []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: v1.ProtocolTCP}}
	svcs := []*v1.Service{
		{ObjectMeta: metav1.ObjectMeta{Name: "web"}, Spec: v1.ServiceSpec{Selector: map[string]string{"role": "backend"}, Ports: tcp}},
		{ObjectMeta: metav1.ObjectMeta{Name: "dns"}, Spec: v1.ServiceSpec{Selector: map[string]string{"role": "backend"},
			Ports: []v1.ServicePort{{Name: "udp", Port: 53, TargetPort: intstr.FromInt32(8081), Protocol: v1.ProtocolUDP}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "itp"}, Spec: v1.ServiceSpec{Selector: map[string]string{"role": "solo"}, Ports: tcp,
			InternalTrafficPolicy: ptr.To(v1.ServiceInternalTrafficPolicyLocal)}},
		{ObjectMeta: metav1.ObjectMeta{Name: "hc"}, Spec: v1.ServiceSpec{Selector: map[string]string{"role": "solo"}, Ports: tcp,
			Type: v1.ServiceTypeLoadBalancer, ExternalTrafficPolicy: v1.ServiceExternalTrafficPolicyLocal, HealthCheckNodePort: hcPort}},
	}
	for _, svc := range svcs {
		if _, err := c.Kube.CoreV1().Services(namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create Service %s: %w", svc.Name, err)
		}
	}
	return nil
}

// familyDiff is one way miniproxy's family differs from kube-proxy's.
type familyDiff struct {
	name   string
	absent bool
	text   string
}

// compareFamilies lists, for every in-scope family of want (kube-proxy's),
// how got's (miniproxy's) differs: absent, or another type, label names,
// help or histogram buckets.
func compareFamilies(want, got map[string]*dto.MetricFamily) []familyDiff {
	var out []familyDiff
	for _, name := range slices.Sorted(maps.Keys(want)) {
		if !inScope(name) {
			continue
		}
		w, g := want[name], got[name]
		if g == nil {
			out = append(out, familyDiff{name: name, absent: true, text: fmt.Sprintf("%s (%s, labels %v): kube-proxy exports it, miniproxy does not", name, w.GetType(), labelNames(w))})
			continue
		}
		add := func(what string, kp, mp any) {
			out = append(out, familyDiff{name: name, text: fmt.Sprintf("%s: %s differs\n  kube-proxy: %v\n  miniproxy:  %v", name, what, kp, mp)})
		}
		if w.GetType() != g.GetType() {
			add("type", w.GetType(), g.GetType())
		}
		if a, b := labelNames(w), labelNames(g); !slices.Equal(a, b) {
			add("label names", a, b)
		}
		if w.GetHelp() != g.GetHelp() {
			add("help", w.GetHelp(), g.GetHelp())
		}
		if a, b := buckets(w), buckets(g); w.GetType() == dto.MetricType_HISTOGRAM && !slices.Equal(a, b) {
			add("buckets", a, b)
		}
	}
	return out
}

// labelNames are the label names of a family's series, together.
func labelNames(f *dto.MetricFamily) []string {
	set := map[string]bool{}
	for _, m := range f.GetMetric() {
		for _, l := range m.GetLabel() {
			set[l.GetName()] = true
		}
	}
	return slices.Sorted(maps.Keys(set))
}

// labelValues are the values a label takes in a family.
func labelValues(f *dto.MetricFamily, label string) []string {
	set := map[string]bool{}
	for _, m := range f.GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == label {
				set[l.GetValue()] = true
			}
		}
	}
	return slices.Sorted(maps.Keys(set))
}

// buckets are the upper bounds of a histogram family's first series.
func buckets(f *dto.MetricFamily) []float64 {
	var out []float64
	for _, m := range f.GetMetric() {
		for _, b := range m.GetHistogram().GetBucket() {
			out = append(out, b.GetUpperBound())
		}
		break
	}
	return out
}

// compareHealthCheckEvents waits for each proxy's Warning event on the
// Service whose health check port is held, and compares reason and message.
func compareHealthCheckEvents(ctx context.Context, t *testing.T, c *cluster.Cluster) {
	t.Helper()
	notes := map[string]string{}
	err := cluster.Eventually(ctx, 30*time.Second, func() error {
		evs, err := c.Kube.EventsV1().Events(namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.Regarding.Name != "hc" || e.Regarding.Kind != "Service" || e.Type != v1.EventTypeWarning {
				continue
			}
			for _, n := range []string{"node1", "node2"} {
				if strings.HasPrefix(e.Note, "node "+n+" ") {
					notes[n] = e.Reason + ": " + e.Note
				}
			}
		}
		if len(notes) < 2 {
			return fmt.Errorf("events so far: %v", notes)
		}
		return nil
	})
	if err != nil {
		t.Errorf("no FailedToStartServiceHealthcheck event from both proxies: %v", err)
		return
	}
	t.Logf("kube-proxy: %s\nminiproxy:  %s", notes["node2"], notes["node1"])
	for n, note := range notes {
		prefix := fmt.Sprintf(`FailedToStartServiceHealthcheck: node %s failed to start healthcheck "default/hc" on port %d: listen tcp`, n, hcPort)
		if !strings.HasPrefix(note, prefix) || !strings.HasSuffix(note, fmt.Sprintf(":%d: bind: address already in use", hcPort)) {
			t.Errorf("%s's event %q\nwant %q...%q", n, note, prefix, fmt.Sprintf(":%d: bind: address already in use", hcPort))
		}
	}
}

// compareHardFail restarts both proxies with --bind-address-hard-fail while
// someone holds their healthz port: both must exit non-zero, and
// miniproxy's error must name the address and the cause.
func compareHardFail(ctx context.Context, t *testing.T, c *cluster.Cluster, kubeProxyBin string) {
	t.Helper()
	miniBin, err := netns.Build("github.com/miniproxy/miniproxy/cmd/miniproxy")
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := c.Control.ProxyKubeconfig()
	cmds := map[string]*exec.Cmd{
		"node1": exec.Command(miniBin, "--kubeconfig", kubeconfig, "--hostname-override", "node1",
			"--cluster-cidr", cluster.ClusterCIDR.String(), "--bind-address-hard-fail"),
		"node2": kubeProxyCmd(kubeProxyBin, c.Node("node2"), kubeconfig, "--bind-address-hard-fail"),
	}
	for _, n := range c.Nodes {
		if err := c.StopProxy(n); err != nil {
			t.Fatal(err)
		}
		l := squat(t, n, ":10256")
		defer l.Close()
		p, err := n.NS.StartCmd(cmds[n.Name])
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-p.Done():
		case <-time.After(30 * time.Second):
			p.Stop()
			t.Errorf("%s: with its healthz port taken and --bind-address-hard-fail, the proxy still runs after 30s:\n%s", n.Name, p.Output())
			continue
		}
		if p.Err() == nil {
			t.Errorf("%s: the proxy exited 0 with its healthz port taken and --bind-address-hard-fail:\n%s", n.Name, p.Output())
		}
		out := p.Output()
		t.Logf("%s with --bind-address-hard-fail and 10256 taken: %v; last lines:\n%s", n.Name, p.Err(), lastLines(out, 3))
		if n.Name == "node1" && (!strings.Contains(out, "0.0.0.0:10256") || !strings.Contains(out, "address already in use")) {
			t.Errorf("miniproxy's error should name the address and the cause:\n%s", out)
		}
	}
	// kube-proxy records its Node event in the background and exits at
	// once, so the event arrives only sometimes (seen both ways); miniproxy
	// writes it before exiting, and must.
	seen := map[string]string{}
	err = cluster.Eventually(ctx, 5*time.Second, func() error {
		evs, err := c.Kube.EventsV1().Events(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.Regarding.Kind == "Node" && e.Type == v1.EventTypeWarning && e.Reason == "FailedToStartProxierHealthcheck" {
				seen[e.Regarding.Name] = e.Note
			}
		}
		if len(seen) < 2 {
			return fmt.Errorf("seen %v", seen)
		}
		return nil
	})
	t.Logf("FailedToStartProxierHealthcheck on Node node2 (kube-proxy): %q\non Node node1 (miniproxy): %q", seen["node2"], seen["node1"])
	if note := seen["node1"]; !strings.Contains(note, "0.0.0.0:10256") || !strings.Contains(note, "address already in use") {
		t.Errorf("miniproxy put no FailedToStartProxierHealthcheck Warning naming 0.0.0.0:10256 and the cause on its Node (%v)", err)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(len(lines)-n, 0):], "\n")
}
