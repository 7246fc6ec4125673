package endpoints

import (
	"net/netip"
	"slices"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const testNode = "node-a"

func ptr[T any](v T) *T { return &v }

func ip(s string) netip.Addr { return netip.MustParseAddr(s) }

func ips(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, x := range s {
		out = append(out, ip(x))
	}
	return out
}

func prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

// cmpOpts compares netip values by value and treats nil and empty alike.
var cmpOpts = cmp.Options{
	cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
	cmpopts.EquateEmpty(),
}

// makeService builds a ClusterIP Service 10.0.0.1 with one unnamed TCP port
// 80, then applies the tweaks.
func makeService(ns, name string, tweaks ...func(*v1.Service)) *v1.Service {
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: v1.ServiceSpec{
			Type:       v1.ServiceTypeClusterIP,
			ClusterIP:  "10.0.0.1",
			ClusterIPs: []string{"10.0.0.1"},
			Ports:      []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: 80}},
		},
	}
	for _, f := range tweaks {
		f(svc)
	}
	return svc
}

func withClusterIPs(addrs ...string) func(*v1.Service) {
	return func(s *v1.Service) {
		s.Spec.ClusterIP = addrs[0]
		s.Spec.ClusterIPs = addrs
	}
}

func withPorts(ports ...v1.ServicePort) func(*v1.Service) {
	return func(s *v1.Service) { s.Spec.Ports = ports }
}

func withLabel(k, v string) func(*v1.Service) {
	return func(s *v1.Service) {
		if s.Labels == nil {
			s.Labels = map[string]string{}
		}
		s.Labels[k] = v
	}
}

// makeSlice builds an IPv4 EndpointSlice of Service svc with one unnamed TCP
// port 8080 and no endpoints, then applies the tweaks.
func makeSlice(ns, name, svc string, tweaks ...func(*discoveryv1.EndpointSlice)) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns, Name: name,
			Labels: map[string]string{discoveryv1.LabelServiceName: svc},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr(""), Protocol: ptr(v1.ProtocolTCP), Port: ptr(int32(8080))}},
	}
	for _, f := range tweaks {
		f(s)
	}
	return s
}

func withEndpoints(eps ...discoveryv1.Endpoint) func(*discoveryv1.EndpointSlice) {
	return func(s *discoveryv1.EndpointSlice) { s.Endpoints = eps }
}

func withSlicePorts(ports ...discoveryv1.EndpointPort) func(*discoveryv1.EndpointSlice) {
	return func(s *discoveryv1.EndpointSlice) { s.Ports = ports }
}

func slicePortOf(name string, proto v1.Protocol, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptr(name), Protocol: ptr(proto), Port: ptr(port)}
}

// ready builds a ready endpoint with explicit conditions on node.
func ready(addr, node string) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{addr},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)},
		NodeName:   ptr(node),
	}
}

// invalidLog records onInvalid calls.
type invalidLog struct {
	mu    sync.Mutex
	calls []string
}

func (l *invalidLog) record(kind, ns, name, reason string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls = append(l.calls, kind+" "+ns+"/"+name+": "+reason)
}

func (l *invalidLog) get() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.calls...)
}

// newTestTracker makes a tracker for testNode whose invalid reports are recorded.
func newTestTracker(t *testing.T) (*Tracker, *invalidLog) {
	t.Helper()
	l := &invalidLog{}
	return NewTracker(testNode, nil, l.record), l
}

// changedNames lists a snapshot's Changed set as strings, sorted.
func changedNames(s *Snapshot) []string {
	var out []string
	for n := range s.Changed {
		out = append(out, n.String())
	}
	slices.Sort(out)
	return out
}

func metaWithLabels(name string, labels map[string]string) metav1.ObjectMeta {
	return metav1.ObjectMeta{Name: name, Labels: labels}
}

func nowPtr() *metav1.Time {
	now := metav1.Now()
	return &now
}

// makeNode builds a Node with the given zone label ("" for none).
func makeNode(name, zone string) *v1.Node {
	n := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if zone != "" {
		n.Labels = map[string]string{LabelZone: zone}
	}
	return n
}
