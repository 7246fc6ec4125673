package e2e

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/test/cluster"
)

// Every EndpointSlice below but the hand-written ones is the real
// controller's (kube-controller-manager's), made from Pods the lab reports
// as a kubelet would.

// slicesOf lists the EndpointSlices of a Service.
func slicesOf(t *testing.T, name string) []discoveryv1.EndpointSlice {
	t.Helper()
	list, err := lab.Kube.DiscoveryV1().EndpointSlices("default").List(testContext(t), metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + name})
	if err != nil {
		t.Fatal(err)
	}
	return list.Items
}

// servers asks url from ns until every server in want has answered (or a
// minute passes) and returns who answered.
func servers(t *testing.T, from *cluster.Pod, url string, want []string) []string {
	t.Helper()
	seen := map[string]bool{}
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) && len(seen) < len(want) {
		a, err := curlOnce(from.NS, url, 2*time.Second)
		if err == nil && a.server != "" {
			seen[a.server] = true
		}
	}
	var out []string
	for s := range seen {
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}

// A Service whose endpoints the controller splits over several slices (the
// lab's controller puts two endpoints in a slice, a real one a hundred):
// every endpoint of every slice is used.
func TestEndpointsSplitOverSeveralSlices(t *testing.T) {
	var want []string
	for i, node := range []string{"node1", "node1", "node1", "node2", "node2"} {
		name := fmt.Sprintf("split-%d", i)
		runPod(t, name, "split", node)
		want = append(want, name)
	}
	svc := expose(t, "split", "split")
	err := cluster.Eventually(testContext(t), 20*time.Second, func() error {
		n, eps := 0, 0
		for _, s := range slicesOf(t, "split") {
			n++
			eps += len(s.Endpoints)
		}
		if n < 3 || eps != 5 {
			return fmt.Errorf("want 5 endpoints in 3 slices or more, have %d in %d", eps, n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	client := runPod(t, "split-client", "split-client", "node2")
	if got := servers(t, client, "http://"+svc.Spec.ClusterIP+"/", want); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("want every endpoint to answer, answered: %v", got)
	}
}

// What the controller makes of a pod that is not ready and of one being
// deleted: a not-ready pod is no endpoint to use; a terminating pod that
// is still ready is used only where no ready endpoint is left (by Local
// traffic on its node, here), and not once it stops being ready.
func TestNotReadyAndTerminatingPods(t *testing.T) {
	runPod(t, "term-a", "term", "node1")
	runPod(t, "term-b", "term", "node2")
	svc := expose(t, "term", "term", nodePortType, local)
	nodePortURL := fmt.Sprintf("http://%s:%d/", lab.Node("node1").IP, svc.Spec.Ports[0].NodePort)
	clusterURL := "http://" + svc.Spec.ClusterIP + "/"
	client := runPod(t, "term-client", "term-client", "node1")
	if a := curl(t, lab.Client, nodePortURL); a.server != "term-a" || a.client != clientIP {
		t.Fatalf("Local policy on node1: want term-a seeing %s, saw %+v", clientIP, a)
	}

	// term-a is being deleted but still ready: the controller marks it
	// terminating and serving, not ready.
	if err := lab.SetPodState(testContext(t), "term-a", true, true); err != nil {
		t.Fatal(err)
	}
	waitForEndpoint(t, "term", "term-a", func(c discoveryv1.EndpointConditions) bool {
		return ptr.Deref(c.Terminating, false) && ptr.Deref(c.Serving, false) && !ptr.Deref(c.Ready, true)
	})
	if a := curl(t, lab.Client, nodePortURL); a.server != "term-a" || a.client != clientIP {
		t.Errorf("the only local endpoint is terminating but serving: Local traffic should still reach it, saw %+v", a)
	}
	// Once the proxy has the new slice (within its minimum sync period),
	// ClusterIP traffic goes to the ready endpoint only.
	err := cluster.Eventually(testContext(t), 10*time.Second, func() error {
		for i := 0; i < 6; i++ {
			if a, err := curlOnce(client.NS, clusterURL, 2*time.Second); err != nil || a.server != "term-b" {
				return fmt.Errorf("a ready endpoint exists: the terminating one must not get new ClusterIP traffic, saw %q (%v)", a.server, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}

	// No longer ready either: no local endpoint left, so node1 drops Local
	// traffic.
	if err := lab.SetPodState(testContext(t), "term-a", false, true); err != nil {
		t.Fatal(err)
	}
	waitForEndpoint(t, "term", "term-a", func(c discoveryv1.EndpointConditions) bool {
		return ptr.Deref(c.Terminating, false) && !ptr.Deref(c.Serving, true)
	})
	err = cluster.Eventually(testContext(t), 10*time.Second, func() error {
		if _, err := curlOnce(lab.Client, nodePortURL, time.Second); err == nil || !strings.Contains(err.Error(), "timed out") {
			return fmt.Errorf("want Local traffic on node1 dropped, got %v", err)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}

	// A pod that is not ready: not used, and a Service with nothing else
	// refuses connections.
	runPod(t, "unready", "unready", "node2")
	if err := lab.SetPodState(testContext(t), "unready", false, false); err != nil {
		t.Fatal(err)
	}
	unready := expose(t, "unready", "unready")
	waitForEndpoint(t, "unready", "unready", func(c discoveryv1.EndpointConditions) bool { return !ptr.Deref(c.Ready, true) })
	if err := refused(client, unready.Spec.ClusterIP); err != nil {
		t.Error(err)
	}
}

// waitForEndpoint waits until the controller's slices of svc hold pod's
// endpoint with conditions that ok accepts.
func waitForEndpoint(t *testing.T, svc, pod string, ok func(discoveryv1.EndpointConditions) bool) {
	t.Helper()
	err := cluster.Eventually(testContext(t), 20*time.Second, func() error {
		for _, s := range slicesOf(t, svc) {
			for _, ep := range s.Endpoints {
				if ep.TargetRef != nil && ep.TargetRef.Name == pod && ok(ep.Conditions) {
					return nil
				}
			}
		}
		return fmt.Errorf("the slices of %s do not hold %s with the expected conditions yet", svc, pod)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Shapes the controller never writes, written by hand for a Service
// without a selector, as operators do to reach things outside the cluster:
// zone hints chosen by hand (each endpoint hinted for the other node's
// zone), an endpoint listed in two slices, conditions left unset (ready),
// and slices miniproxy must ignore (FQDN, and IPv6 on this IPv4 cluster).
func TestHandWrittenEndpointSlices(t *testing.T) {
	a := runPod(t, "manual-a", "manual-a", "node1")
	b := runPod(t, "manual-b", "manual-b", "node2")
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "manual"},
		Spec: v1.ServiceSpec{
			Type:  v1.ServiceTypeNodePort,
			Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80}},
		},
	}
	ctx := testContext(t)
	created, err := lab.Kube.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Kube.CoreV1().Services("default").Delete(ctx, "manual", metav1.DeleteOptions{}) })
	endpoint := func(p *cluster.Pod, zone string) discoveryv1.Endpoint {
		return discoveryv1.Endpoint{
			Addresses: []string{p.IP.String()},
			NodeName:  ptr.To(p.Node.Name),
			Hints:     &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: zone}}},
		}
	}
	port := []discoveryv1.EndpointPort{{Name: ptr.To("http"), Protocol: ptr.To(v1.ProtocolTCP), Port: ptr.To[int32](8080)}}
	labels := map[string]string{discoveryv1.LabelServiceName: "manual", discoveryv1.LabelManagedBy: "operator.example"}
	for _, s := range []*discoveryv1.EndpointSlice{
		{ObjectMeta: metav1.ObjectMeta{Name: "manual-1", Labels: labels}, AddressType: discoveryv1.AddressTypeIPv4, Ports: port,
			Endpoints: []discoveryv1.Endpoint{endpoint(a, "zone-node2"), endpoint(b, "zone-node1")}},
		{ObjectMeta: metav1.ObjectMeta{Name: "manual-2", Labels: labels}, AddressType: discoveryv1.AddressTypeIPv4, Ports: port,
			Endpoints: []discoveryv1.Endpoint{endpoint(b, "zone-node1")}},
		{ObjectMeta: metav1.ObjectMeta{Name: "manual-fqdn", Labels: labels}, AddressType: discoveryv1.AddressTypeFQDN, Ports: port,
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"db.example.com"}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "manual-v6", Labels: labels}, AddressType: discoveryv1.AddressTypeIPv6, Ports: port,
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"fd00:244::9"}}}},
	} {
		if _, err := lab.Kube.DiscoveryV1().EndpointSlices("default").Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create slice %s: %v", s.Name, err)
		}
	}
	for _, tc := range []struct{ node, want string }{{"node1", "manual-b"}, {"node2", "manual-a"}} {
		url := fmt.Sprintf("http://%s:%d/", lab.Node(tc.node).IP, created.Spec.Ports[0].NodePort)
		for i := 0; i < 6; i++ {
			if got := curl(t, lab.Client, url); got.server != tc.want {
				t.Fatalf("through %s the hints name only %s, answered by %s", tc.node, tc.want, got.server)
			}
		}
	}
}
