package netns

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
)

// TestControlPlane starts the real etcd and kube-apiserver in a lab
// namespace and checks what the rest of the lab relies on: the admin can
// write Services, EndpointSlices, Nodes and Pods; the kube-proxy identity can do what
// kube-proxy does (list and watch Services, EndpointSlices and Nodes, write
// events) and nothing more (it cannot create Services), which proves the
// built-in system:node-proxier role is what authorizes it; and kubectl run
// on a node reaches the API server.
func TestControlPlane(t *testing.T) {
	l := NewLab(t)
	cpNS, node := mustNS(t, l, "cp"), mustNS(t, l, "node")
	must(t, l.Link(cpNS, node, pfx("10.240.0.2/24"), pfx("10.240.0.11/24")))

	cp := NewControlPlane(t, l, cpNS, ControlPlaneOptions{Address: pfx("10.240.0.2/24").Addr()})
	t.Logf("etcd + kube-apiserver ready in %v (server %s)", cp.StartupTime().Round(time.Millisecond), cp.Server())

	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	admin := cp.Client()

	// The proxy's client runs from the node, as miniproxy will.
	proxy, err := kubernetes.NewForConfig(cp.ProxyConfig(node))
	must(t, err)
	review, err := proxy.AuthenticationV1().SelfSubjectReviews().Create(c, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	must(t, err)
	if got := review.Status.UserInfo.Username; got != "system:kube-proxy" {
		t.Fatalf("proxy kubeconfig authenticates as %q, want system:kube-proxy", got)
	}
	for _, g := range review.Status.UserInfo.Groups {
		if g == "system:masters" {
			t.Fatalf("proxy identity is in system:masters: %v", review.Status.UserInfo.Groups)
		}
	}

	// The proxy watches Services before the admin writes one, so the watch
	// must deliver it.
	w, err := proxy.CoreV1().Services("default").Watch(c, metav1.ListOptions{})
	must(t, err)
	defer w.Stop()

	// (a) The admin writes a Service, its EndpointSlice and a Node.
	svc, err := admin.CoreV1().Services("default").Create(c, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "echo"},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}},
		},
	}, metav1.CreateOptions{})
	must(t, err)
	if !strings.HasPrefix(svc.Spec.ClusterIP, "10.96.") {
		t.Errorf("ClusterIP %q is not in the default service range 10.96.0.0/16", svc.Spec.ClusterIP)
	}
	ready := true
	_, err = admin.DiscoveryV1().EndpointSlices("default").Create(c, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name:   "echo-1",
			Labels: map[string]string{discoveryv1.LabelServiceName: "echo", discoveryv1.LabelManagedBy: "miniproxy-lab"},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{
			Addresses:  []string{"10.244.1.5"},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			NodeName:   ptr("node"),
		}},
		Ports: []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)}},
	}, metav1.CreateOptions{})
	must(t, err)
	_, err = admin.CoreV1().Nodes().Create(c, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node"}}, metav1.CreateOptions{})
	must(t, err)
	// Pods too, although no controller creates the "default" service
	// account.
	_, err = admin.CoreV1().Pods("default").Create(c, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "echo-1", Labels: map[string]string{"app": "echo"}},
		Spec:       corev1.PodSpec{NodeName: "node", Containers: []corev1.Container{{Name: "echo", Image: "echoserver"}}},
	}, metav1.CreateOptions{})
	must(t, err)

	// (b) What kube-proxy needs is allowed...
	waitForEvent(t, w, watch.Added, "echo")
	svcs, err := proxy.CoreV1().Services("").List(c, metav1.ListOptions{})
	must(t, err)
	if !hasService(svcs.Items, "default", "echo") || !hasService(svcs.Items, "default", "kubernetes") {
		t.Errorf("proxy lists Services %v, want default/echo and default/kubernetes", serviceNames(svcs.Items))
	}
	slices, err := proxy.DiscoveryV1().EndpointSlices("").List(c, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=echo"})
	must(t, err)
	if len(slices.Items) != 1 || len(slices.Items[0].Endpoints) != 1 || slices.Items[0].Endpoints[0].Addresses[0] != "10.244.1.5" {
		t.Errorf("proxy lists EndpointSlices of echo: %+v, want the one with 10.244.1.5", slices.Items)
	}
	sw, err := proxy.DiscoveryV1().EndpointSlices("").Watch(c, metav1.ListOptions{})
	must(t, err)
	sw.Stop()
	nodes, err := proxy.CoreV1().Nodes().List(c, metav1.ListOptions{})
	must(t, err)
	if len(nodes.Items) != 1 || nodes.Items[0].Name != "node" {
		t.Errorf("proxy lists Nodes %+v, want exactly \"node\"", nodes.Items)
	}
	nw, err := proxy.CoreV1().Nodes().Watch(c, metav1.ListOptions{FieldSelector: "metadata.name=node"})
	must(t, err)
	nw.Stop()
	_, err = proxy.EventsV1().Events("default").Create(c, &eventsv1.Event{
		ObjectMeta:          metav1.ObjectMeta{Name: "node.starting"},
		EventTime:           metav1.NowMicro(),
		ReportingController: "miniproxy",
		ReportingInstance:   "miniproxy-node",
		Action:              "StartKubeProxy",
		Reason:              "Starting",
		Type:                corev1.EventTypeNormal,
		Regarding:           corev1.ObjectReference{Kind: "Node", Name: "node", UID: "node"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Errorf("proxy cannot create an event: %v", err)
	}
	// ...and nothing more: system:node-proxier cannot create Services.
	_, err = proxy.CoreV1().Services("default").Create(c, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "not-allowed"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}},
	}, metav1.CreateOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("proxy creating a Service: got %v, want Forbidden", err)
	}

	// (c) kubectl, run on the node with the admin kubeconfig.
	out, err := cp.Kubectl(c, node, "get", "svc", "-o", "name")
	must(t, err)
	for _, want := range []string{"service/echo", "service/kubernetes"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl get svc from the node: %q lacks %s", out, want)
		}
	}

	// Close stops both processes and removes every file.
	dir := filepath.Dir(cp.AdminKubeconfig())
	must(t, cp.Close())
	for _, p := range []*Process{cp.APIServer(), cp.Etcd()} {
		select {
		case <-p.Done():
		default:
			t.Errorf("%s still running after Close", p.name)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control-plane dir %s still there after Close: %v", dir, err)
	}
}

// TestControlPlaneClosedWithLab checks that closing the lab, without
// closing the control plane, stops it and removes its files.
func TestControlPlaneClosedWithLab(t *testing.T) {
	l, err := New()
	if err != nil {
		t.Skip(err)
	}
	defer l.Close()
	cpNS := mustNS(t, l, "cp")
	must(t, cpNS.AddAddr("lo", pfx("10.240.0.2/32")))
	cp := NewControlPlane(t, l, cpNS, ControlPlaneOptions{Address: pfx("10.240.0.2/32").Addr()})
	t.Logf("etcd + kube-apiserver ready in %v", cp.StartupTime().Round(time.Millisecond))
	dir := filepath.Dir(cp.AdminKubeconfig())
	must(t, l.Close())
	for _, p := range []*Process{cp.APIServer(), cp.Etcd()} {
		select {
		case <-p.Done():
		default:
			t.Errorf("%s still running after Lab.Close", p.name)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control-plane dir %s still there after Lab.Close: %v", dir, err)
	}
}

func waitForEvent(t *testing.T, w watch.Interface, typ watch.EventType, name string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				t.Fatalf("watch closed before %s %s", typ, name)
			}
			if ev.Type == watch.Error {
				t.Fatalf("watch error before %s %s: %v", typ, name, apierrors.FromObject(ev.Object))
			}
			if s, isSvc := ev.Object.(*corev1.Service); isSvc && ev.Type == typ && s.Name == name {
				return
			}
		case <-timeout:
			t.Fatalf("no %s event for %s within 10s", typ, name)
		}
	}
}

func hasService(items []corev1.Service, ns, name string) bool {
	for _, s := range items {
		if s.Namespace == ns && s.Name == name {
			return true
		}
	}
	return false
}

func serviceNames(items []corev1.Service) []string {
	var names []string
	for _, s := range items {
		names = append(names, s.Namespace+"/"+s.Name)
	}
	return names
}

func ptr[T any](v T) *T { return &v }
