package faults

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/miniproxy/miniproxy/test/cluster"
)

// oddObject is one object of drill 5 and how to create it.
type oddObject struct {
	kind, name string
	create     func(ctx context.Context) error
}

// oddObjects builds the 1,000 odd objects the API server accepts: slices
// without a Service label, FQDN and IPv6 slices on an IPv4 node, slices
// with one port number under several names, slices with 253-character
// names, slices of Services that do not exist, and Services with odd but
// valid specs, some of which change type back and forth.
func oddObjects(target string) []oddObject {
	var out []oddObject
	slice := func(name, svc string, typ discoveryv1.AddressType, addrs []string, ports []discoveryv1.EndpointPort) oddObject {
		labels := map[string]string{"drill": "odd"}
		if svc != "" {
			labels[discoveryv1.LabelServiceName] = svc
		}
		s := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: name, Labels: labels},
			AddressType: typ,
			Endpoints:   []discoveryv1.Endpoint{{Addresses: addrs, Conditions: discoveryv1.EndpointConditions{Ready: ptrTo(true)}}},
			Ports:       ports,
		}
		return oddObject{"EndpointSlice", name, func(ctx context.Context) error {
			_, err := lab.Kube.DiscoveryV1().EndpointSlices("default").Create(ctx, s, metav1.CreateOptions{})
			return err
		}}
	}
	port := func(name string, p int32) discoveryv1.EndpointPort {
		return discoveryv1.EndpointPort{Name: ptrTo(name), Port: ptrTo(p), Protocol: ptrTo(v1.ProtocolTCP)}
	}
	for i := range 200 {
		out = append(out, slice(fmt.Sprintf("odd-nolabel-%d", i), "", discoveryv1.AddressTypeIPv4, []string{fmt.Sprintf("10.244.9.%d", i%250+1)}, []discoveryv1.EndpointPort{port("", 8080)}))
	}
	for i := range 200 {
		out = append(out, slice(fmt.Sprintf("odd-fqdn-%d", i), target, discoveryv1.AddressTypeFQDN, []string{fmt.Sprintf("host-%d.example.com", i)}, []discoveryv1.EndpointPort{port("", 8080)}))
	}
	for i := range 200 {
		out = append(out, slice(fmt.Sprintf("odd-ipv6-%d", i), target, discoveryv1.AddressTypeIPv6, []string{fmt.Sprintf("fd00:244::%x", i+1)}, []discoveryv1.EndpointPort{port("", 8080)}))
	}
	for i := range 100 {
		out = append(out, slice(fmt.Sprintf("odd-dupports-%d", i), target, discoveryv1.AddressTypeIPv4, []string{fmt.Sprintf("10.244.8.%d", i+1)},
			[]discoveryv1.EndpointPort{port("a", 8080), port("b", 8080), port("c", 8080)}))
	}
	for i := range 100 {
		name := fmt.Sprintf("odd-long-%d-", i) + strings.Repeat("x", 253-len(fmt.Sprintf("odd-long-%d-", i)))
		out = append(out, slice(name, target, discoveryv1.AddressTypeIPv4, []string{fmt.Sprintf("10.244.7.%d", i+1)}, []discoveryv1.EndpointPort{port("", 8080)}))
	}
	for i := range 100 {
		out = append(out, slice(fmt.Sprintf("odd-orphan-%d", i), fmt.Sprintf("no-such-service-%d", i), discoveryv1.AddressTypeIPv4, []string{fmt.Sprintf("10.244.6.%d", i+1)}, []discoveryv1.EndpointPort{port("", 8080)}))
	}
	for i := range 50 {
		name := fmt.Sprintf("odd-svc-%d", i)
		svc := &v1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"drill": "odd"}},
			Spec: v1.ServiceSpec{
				Type:     v1.ServiceTypeLoadBalancer,
				Selector: map[string]string{"app": "odd-nobody"},
				// Two ports with one number, for TCP and UDP; an IPv6 external
				// IP on an IPv4 node; a whole-world source range; the longest
				// affinity timeout; Local policy without a local endpoint.
				Ports: []v1.ServicePort{
					{Name: "tcp", Protocol: v1.ProtocolTCP, Port: 53, TargetPort: intstr.FromInt32(8080)},
					{Name: "udp", Protocol: v1.ProtocolUDP, Port: 53, TargetPort: intstr.FromInt32(8081)},
				},
				ExternalIPs:              []string{fmt.Sprintf("fd00:99::%x", i+1)},
				LoadBalancerSourceRanges: []string{"0.0.0.0/0"},
				SessionAffinity:          v1.ServiceAffinityClientIP,
				SessionAffinityConfig:    &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: ptrTo(int32(86400))}},
				ExternalTrafficPolicy:    v1.ServiceExternalTrafficPolicyLocal,
			},
		}
		out = append(out, oddObject{"Service", name, func(ctx context.Context) error {
			_, err := lab.Kube.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{})
			return err
		}})
	}
	for i := range 50 {
		name := fmt.Sprintf("odd-flip-%d", i)
		out = append(out, oddObject{"Service", name, func(ctx context.Context) error {
			svcs := lab.Kube.CoreV1().Services("default")
			svc, err := svcs.Create(ctx, &v1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"drill": "odd"}},
				Spec: v1.ServiceSpec{Selector: map[string]string{"app": "steady"},
					Ports: []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}}},
			}, metav1.CreateOptions{})
			if err != nil {
				return err
			}
			// ClusterIP -> NodePort -> ClusterIP -> NodePort, as fast as the
			// API server takes it.
			for j := range 3 {
				if j%2 == 0 {
					svc.Spec.Type = v1.ServiceTypeNodePort
				} else {
					svc.Spec.Type = v1.ServiceTypeClusterIP
					svc.Spec.Ports[0].NodePort = 0
				}
				if svc, err = svcs.Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
					return err
				}
			}
			return nil
		}})
	}
	return out
}

func ptrTo[T any](v T) *T { return &v }

// Drill 5: 1,000 odd objects at once. No miniproxy crashes, the Service the
// load generators use never fails, and no object is logged more than once
// (a problem is told when it appears, not at every sync).
func TestDrillOddObjects(t *testing.T) {
	ctx := testContext(t, 5*time.Minute)
	l := startLoad(t)
	// A Service the odd slices claim to belong to.
	if _, err := lab.Kube.CoreV1().Services("default").Create(ctx, &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "odd-target", Labels: map[string]string{"drill": "odd"}},
		Spec:       v1.ServiceSpec{Ports: []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	objs := oddObjects("odd-target")
	marks := map[*cluster.Node]int{}
	for _, n := range lab.Nodes {
		marks[n] = len(n.Proxy.Output())
	}
	t.Cleanup(func() { deleteOdd(t) })

	start := time.Now()
	var wg sync.WaitGroup
	work := make(chan oddObject)
	var mu sync.Mutex
	var errs []string
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for o := range work {
				if err := o.create(ctx); err != nil {
					mu.Lock()
					errs = append(errs, fmt.Sprintf("%s %s: %v", o.kind, o.name, err))
					mu.Unlock()
				}
			}
		}()
	}
	for _, o := range objs {
		work <- o
	}
	close(work)
	wg.Wait()
	created := time.Since(start)
	if len(errs) > 0 {
		t.Fatalf("the API server refused %d of the odd objects (the drill needs objects it accepts), e.g. %s", len(errs), errs[0])
	}
	// Three more periodic-resync-free syncs' worth of time: a problem logged
	// at every sync would show up several times.
	time.Sleep(8 * time.Second)

	worst, worstName, logged := 0, "", 0
	for _, n := range lab.Nodes {
		select {
		case <-n.Proxy.Done():
			t.Fatalf("miniproxy on %s exited: %v", n.Name, n.Proxy.Err())
		default:
		}
		out := n.Proxy.Output()[marks[n]:]
		for _, o := range objs {
			c := strings.Count(out, "default/"+o.name+"\"")
			if c > 0 {
				logged++
			}
			if c > worst {
				worst, worstName = c, o.name
			}
		}
	}
	if worst > 1 {
		t.Errorf("%s was logged %d times on one node; want at most once", worstName, worst)
	}
	failed, total := l.stop(t)
	if failed > 0 {
		t.Errorf("%d of %d requests to the steady Service failed", failed, total)
	}
	record(t, figures{
		drill:       "5. 1,000 odd objects (created in " + created.Round(time.Second).String() + ")",
		failed:      failed,
		total:       total,
		recovery:    "nothing to recover: no crash, no other Service affected",
		operatorSaw: fmt.Sprintf("%d object-node pairs logged, each at most %d time(s)", logged, max(worst, 1)),
	})
}

// deleteOdd removes the drill's objects.
func deleteOdd(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sel := metav1.ListOptions{LabelSelector: "drill=odd"}
	if err := lab.Kube.DiscoveryV1().EndpointSlices("default").DeleteCollection(ctx, metav1.DeleteOptions{}, sel); err != nil {
		t.Errorf("delete the odd slices: %v", err)
	}
	svcs, err := lab.Kube.CoreV1().Services("default").List(ctx, sel)
	if err != nil {
		t.Errorf("list the odd Services: %v", err)
		return
	}
	for _, s := range svcs.Items {
		lab.Kube.CoreV1().Services("default").Delete(ctx, s.Name, metav1.DeleteOptions{})
	}
}
