package endpoints

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
)

// waitFor polls the tracker until cond holds for a snapshot (each poll takes
// one, so Changed is not meaningful here) or the generous deadline passes.
func waitFor(t *testing.T, tr *Tracker, what string, cond func(*Snapshot) bool) *Snapshot {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		snap := tr.Snapshot()
		if cond(snap) {
			return snap
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s; last snapshot: %d services, endpoints %v, node %+v",
				what, len(snap.Services), snap.Endpoints, snap.Node)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestWatchFeedsTheTracker(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// Objects present before Watch starts arrive through the initial list.
	existing := makeService("ns", "existing")
	client := fake.NewClientset(
		existing,
		makeSlice("ns", "existing-1", "existing", withEndpoints(ready("10.1.0.1", testNode))),
		makeNode(testNode, "zone-a"),
		makeNode("node-b", "zone-b"),
	)
	tr, _ := newTestTracker(t)
	changed := make(chan struct{}, 1)
	tr.SetOnChange(func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	})

	if err := Watch(ctx, client, tr, 0); err != nil {
		t.Fatalf("Watch: %v", err)
	}
	existingName := ServicePortName{Namespace: "ns", Name: "existing"}
	snap := tr.Snapshot()
	if diff := cmp.Diff([]Endpoint{{IP: ip("10.1.0.1"), Port: 8080, Ready: true, Serving: true, NodeName: testNode, Local: true}},
		snap.Endpoints[existingName], cmpOpts); diff != "" {
		t.Errorf("endpoints of the existing service right after Watch returned (-want +got):\n%s", diff)
	}
	if want := (Node{Name: testNode, Zone: "zone-a", Eligible: true}); snap.Node != want {
		t.Errorf("Node = %+v, want %+v (another node must not leak in)", snap.Node, want)
	}

	// Objects created afterwards arrive through the watch.
	svc := makeService("ns", "web", withClusterIPs("10.0.0.2"), withPorts(v1.ServicePort{Name: "http", Port: 80}))
	if _, err := client.CoreV1().Services("ns").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating Service: %v", err)
	}
	theirs := makeService("ns", "theirs", withClusterIPs("10.0.0.3"), withLabel(LabelServiceProxyName, "other"))
	if _, err := client.CoreV1().Services("ns").Create(ctx, theirs, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating Service: %v", err)
	}
	slice := makeSlice("ns", "web-abc", "web",
		withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080)),
		withEndpoints(ready("10.1.0.7", "node-b")))
	if _, err := client.DiscoveryV1().EndpointSlices("ns").Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating EndpointSlice: %v", err)
	}
	select {
	case <-changed:
	case <-time.After(30 * time.Second):
		t.Fatalf("onChange was not called")
	}
	web := ServicePortName{Namespace: "ns", Name: "web", Port: "http"}
	snap = waitFor(t, tr, "the new Service has its endpoint", func(s *Snapshot) bool { return len(s.Endpoints[web]) == 1 })
	if diff := cmp.Diff([]Endpoint{{IP: ip("10.1.0.7"), Port: 8080, Ready: true, Serving: true, NodeName: "node-b"}},
		snap.Endpoints[web], cmpOpts); diff != "" {
		t.Errorf("endpoints of the new service (-want +got):\n%s", diff)
	}
	if got := snap.Services[web]; got == nil || got.ClusterIPs[0] != ip("10.0.0.2") {
		t.Errorf("service port %v = %+v, want cluster IP 10.0.0.2", web, got)
	}
	if _, ok := snap.Services[ServicePortName{Namespace: "ns", Name: "theirs"}]; ok {
		t.Errorf("a Service labelled %s was proxied", LabelServiceProxyName)
	}

	// Updates and deletes arrive too.
	node, err := client.CoreV1().Nodes().Get(ctx, testNode, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("getting Node: %v", err)
	}
	node.Labels[LabelZone] = "zone-c"
	if _, err := client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("updating Node: %v", err)
	}
	if err := client.CoreV1().Services("ns").Delete(ctx, "existing", metav1.DeleteOptions{}); err != nil {
		t.Fatalf("deleting Service: %v", err)
	}
	waitFor(t, tr, "the deleted Service is gone and the zone changed", func(s *Snapshot) bool {
		_, ok := s.Services[existingName]
		return !ok && s.Node.Zone == "zone-c"
	})
	if tr.ServiceChangesTotal() < 3 || tr.EndpointChangesTotal() < 2 {
		t.Errorf("counters: %d service and %d endpoint changes, want at least 3 and 2",
			tr.ServiceChangesTotal(), tr.EndpointChangesTotal())
	}
}

func TestWatchGivesUpWhenTheContextEnds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	tr, _ := newTestTracker(t)
	if err := Watch(ctx, fake.NewClientset(), tr, 0); err == nil {
		t.Errorf("Watch with a cancelled context returned no error")
	}
}

func TestProxyLabelSelector(t *testing.T) {
	if got, want := ProxyLabelSelector().String(), "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"; got != want {
		t.Errorf("selector = %q, want %q", got, want)
	}
}

func TestInformerCachesHoldNoAPIObjects(t *testing.T) {
	svc := makeService("ns", "web", func(s *v1.Service) {
		s.Annotations = map[string]string{"kubectl.kubernetes.io/last-applied-configuration": strings.Repeat("x", 4096)}
		s.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}
		s.Spec.Selector = map[string]string{"app": "web"}
	})
	slice := makeSlice("ns", "web-abc", "web", withEndpoints(ready("10.244.1.5", "node1")), func(s *discoveryv1.EndpointSlice) {
		s.Endpoints[0].TargetRef = &v1.ObjectReference{Kind: "Pod", Name: "web-1"}
		s.Endpoints[0].Hostname = ptr("web-1")
	})
	bad := makeSlice("ns", "web-bad", "web", withEndpoints(ready("10.244.1.300", "node1")))

	cached := map[string]any{}
	for name, obj := range map[string]any{"service": svc.DeepCopy(), "slice": slice.DeepCopy(), "bad": bad.DeepCopy()} {
		c, err := compact(obj)
		if err != nil {
			t.Fatalf("compact %s: %v", name, err)
		}
		if again, _ := compact(c); again != c {
			t.Errorf("compacting the cached %s again changed it", name)
		}
		// The store keys the cached forms as it would the objects.
		key, err := cache.MetaNamespaceKeyFunc(c)
		if err != nil {
			t.Fatalf("key of cached %s: %v", name, err)
		}
		wantKey, _ := cache.MetaNamespaceKeyFunc(obj)
		if key != wantKey {
			t.Errorf("cached %s has key %q, want %q", name, key, wantKey)
		}
		cached[name] = c
	}
	if _, ok := cached["service"].(*cachedService); !ok {
		t.Fatalf("a Service is cached as %T", cached["service"])
	}
	if _, ok := cached["slice"].(*cachedSlice); !ok {
		t.Fatalf("an EndpointSlice is cached as %T", cached["slice"])
	}

	// The cached forms give the tracker exactly what the objects give it,
	// problems included.
	var fullProblems, cachedProblems []string
	whole := NewTracker("node1", nil, func(_, _, _, reason string) { fullProblems = append(fullProblems, reason) })
	whole.OnServiceAdd(svc)
	whole.OnEndpointSliceAdd(slice)
	whole.OnEndpointSliceAdd(bad)
	fromCache := NewTracker("node1", nil, func(_, _, _, reason string) { cachedProblems = append(cachedProblems, reason) })
	c := cached["service"].(*cachedService)
	fromCache.setService(c.key, c.conv)
	for _, name := range []string{"slice", "bad"} {
		s := cached[name].(*cachedSlice)
		fromCache.setSlice(s.key, s.conv)
	}
	a, b := whole.Snapshot(), fromCache.Snapshot()
	if diff := cmp.Diff(a, b, cmpopts.EquateComparable(netip.Addr{}, netip.Prefix{})); diff != "" || len(a.Endpoints[ServicePortName{Namespace: "ns", Name: "web"}]) != 1 {
		t.Errorf("the cached forms give another snapshot (-objects +cached):\n%s", diff)
	}
	if len(fullProblems) != 1 || !slices.Equal(fullProblems, cachedProblems) {
		t.Errorf("problems reported: from objects %q, from the cache %q; want the same one", fullProblems, cachedProblems)
	}

	node := makeNode("node1", "zone-a")
	node.Status.Images = []v1.ContainerImage{{Names: []string{"registry.example/big:1"}, SizeBytes: 1 << 30}}
	node.Annotations = map[string]string{"node.alpha.kubernetes.io/ttl": "0"}
	out, _ := compact(node.DeepCopy())
	if got := out.(*v1.Node); len(got.Status.Images) != 0 || got.Annotations != nil {
		t.Errorf("the cached Node keeps its status or annotations: %+v", got)
	}
	if got := convertNode(out.(*v1.Node)); got != convertNode(node) {
		t.Errorf("the cached Node converts to %+v, the Node to %+v", got, convertNode(node))
	}
}
