package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"reflect"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/test/netns"
)

// Pod is a pod namespace behind its node, running the echo server.
type Pod struct {
	Namespace, Name string
	Labels          map[string]string
	Node            *Node
	IP              netip.Addr
	NS              *netns.Namespace
	Proc            *netns.Process
	Ready           bool
	Terminating     bool
}

// PodSpec says what pod to start.
type PodSpec struct {
	Namespace string // "default" when empty
	Name      string
	Labels    map[string]string
	Node      *Node
	// Args are extra echo server arguments (e.g. -proxy-to for an ingress).
	Args []string
}

// AddPod starts a pod on its node, as a kubelet would: a namespace with a
// point-to-point link to the node, the echo server on 8080 (HTTP) and 8081
// (UDP), a Pod object with its IP and Ready condition. Its endpoints appear
// in every Service that selects it.
func (c *Cluster) AddPod(ctx context.Context, spec PodSpec) (*Pod, error) {
	if spec.Namespace == "" {
		spec.Namespace = "default"
	}
	n := spec.Node
	c.mu.Lock()
	host := n.nextPod
	n.nextPod++
	c.mu.Unlock()
	p := &Pod{
		Namespace: spec.Namespace, Name: spec.Name, Labels: spec.Labels, Node: n,
		IP: netip.AddrFrom4([4]byte{10, 244, byte(n.Index), byte(host)}), Ready: true,
	}
	short := fmt.Sprintf("n%dp%d", n.Index, host)
	var err error
	if p.NS, err = c.Lab.AddNamespace(short); err != nil {
		return nil, err
	}
	none := netip.Prefix{}
	steps := []func() error{
		func() error { return c.Lab.Link(p.NS, n.NS, netip.PrefixFrom(p.IP, 32), none) },
		func() error { return n.NS.AddAddr(short, netip.PrefixFrom(n.Gateway, 32)) },
		func() error { return n.NS.AddDeviceRoute(netip.PrefixFrom(p.IP, 32), short) },
		func() error { return p.NS.AddDeviceRoute(netip.PrefixFrom(n.Gateway, 32), n.NS.Short()) },
		func() error { return p.NS.AddRoute(netip.MustParsePrefix("0.0.0.0/0"), n.Gateway) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return nil, fmt.Errorf("wire pod %s: %w", spec.Name, err)
		}
	}
	args := append([]string{"-listen", ":8080", "-udp-listen", ":8081", "-name", spec.Name}, spec.Args...)
	if p.Proc, err = p.NS.Start(c.echoBin, args...); err != nil {
		return nil, err
	}
	wait, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := p.Proc.WaitForOutput(wait, "listening on http"); err != nil {
		return nil, fmt.Errorf("pod %s: echo server did not start: %w", spec.Name, err)
	}
	if err := c.writePod(ctx, p); err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.pods[p.Namespace+"/"+p.Name] = p
	c.mu.Unlock()
	c.KickSlices()
	return p, nil
}

func (c *Cluster) writePod(ctx context.Context, p *Pod) error {
	obj := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels},
		Spec: v1.PodSpec{
			NodeName:   p.Node.Name,
			Containers: []v1.Container{{Name: "echoserver", Image: "registry.k8s.io/echoserver:1.4", Ports: []v1.ContainerPort{{ContainerPort: 8080}}}},
		},
	}
	created, err := c.Kube.CoreV1().Pods(p.Namespace).Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create pod object %s: %w", p.Name, err)
	}
	// Admission may add labels (the node's topology labels, for one), and
	// selectors such as `kubectl expose pod`'s see them: match on what the
	// API server stored.
	p.Labels = created.Labels
	now := metav1.Now()
	created.Status = v1.PodStatus{
		Phase: v1.PodRunning,
		ContainerStatuses: []v1.ContainerStatus{{
			Name: "echoserver", Ready: true, Started: ptr.To(true), Image: "registry.k8s.io/echoserver:1.4",
			State: v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: now}},
		}},
		PodIP:  p.IP.String(),
		PodIPs: []v1.PodIP{{IP: p.IP.String()}},
		HostIP: p.Node.IP.String(),
		Conditions: []v1.PodCondition{
			{Type: v1.PodReady, Status: v1.ConditionTrue},
			{Type: v1.ContainersReady, Status: v1.ConditionTrue},
		},
	}
	if _, err := c.Kube.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("set status of pod %s: %w", p.Name, err)
	}
	return nil
}

// Pod returns a pod by name (in "default" unless given as ns/name).
func (c *Cluster) Pod(name string) *Pod {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p, ok := c.pods[name]; ok {
		return p
	}
	return c.pods["default/"+name]
}

// DeletePod removes a pod: its endpoints leave their Services at once (as
// when a kubelet reports it gone), then its namespace and process go.
func (c *Cluster) DeletePod(ctx context.Context, name string) error {
	p := c.Pod(name)
	if p == nil {
		return fmt.Errorf("delete pod %s: %w", name, errNoPod)
	}
	c.mu.Lock()
	delete(c.pods, p.Namespace+"/"+p.Name)
	c.mu.Unlock()
	if err := c.SyncSlices(ctx); err != nil {
		return err
	}
	if err := c.Kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete pod object %s: %w", p.Name, err)
	}
	return p.Proc.Stop()
}

// SetPodState changes a pod's readiness (and terminating flag) as a kubelet
// would report it, and updates the EndpointSlices.
func (c *Cluster) SetPodState(ctx context.Context, name string, ready, terminating bool) error {
	p := c.Pod(name)
	if p == nil {
		return fmt.Errorf("set state of pod %s: %w", name, errNoPod)
	}
	c.mu.Lock()
	p.Ready, p.Terminating = ready, terminating
	c.mu.Unlock()
	return c.SyncSlices(ctx)
}

// KickSlices asks the slice controller to reconcile soon.
func (c *Cluster) KickSlices() {
	select {
	case c.slicesKick <- struct{}{}:
	default:
	}
}

const managedBy = "lab.miniproxy.test"

func (c *Cluster) runSliceController(ctx context.Context) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-c.slicesKick:
		}
		if err := c.SyncSlices(ctx); err != nil && ctx.Err() == nil {
			c.logf("endpointslice controller: %v", err)
		}
	}
}

// SyncSlices writes, for every Service with a selector, the EndpointSlice
// the real controller would write for the lab's pods, and removes slices of
// Services that are gone. It is what the controller does, done at once.
func (c *Cluster) SyncSlices(ctx context.Context) error {
	// The controller goroutine and explicit calls (a pod deleted) must not
	// write the same slice at once.
	c.slicesMu.Lock()
	defer c.slicesMu.Unlock()
	svcs, err := c.Kube.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list services: %w", err)
	}
	existing, err := c.Kube.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelManagedBy + "=" + managedBy})
	if err != nil {
		return fmt.Errorf("list endpointslices: %w", err)
	}
	have := map[string]*discoveryv1.EndpointSlice{}
	for i := range existing.Items {
		s := &existing.Items[i]
		have[s.Namespace+"/"+s.Name] = s
	}
	want := map[string]bool{}
	for i := range svcs.Items {
		svc := &svcs.Items[i]
		if len(svc.Spec.Selector) == 0 {
			continue
		}
		slice := c.desiredSlice(svc)
		key := slice.Namespace + "/" + slice.Name
		want[key] = true
		cur, ok := have[key]
		switch {
		case !ok:
			_, err = c.Kube.DiscoveryV1().EndpointSlices(slice.Namespace).Create(ctx, slice, metav1.CreateOptions{})
		case !reflect.DeepEqual(cur.Endpoints, slice.Endpoints) || !reflect.DeepEqual(cur.Ports, slice.Ports):
			cur.Endpoints, cur.Ports = slice.Endpoints, slice.Ports
			_, err = c.Kube.DiscoveryV1().EndpointSlices(slice.Namespace).Update(ctx, cur, metav1.UpdateOptions{})
		}
		if err != nil {
			return fmt.Errorf("write endpointslice %s: %w", key, err)
		}
	}
	for key, s := range have {
		if !want[key] {
			if err := c.Kube.DiscoveryV1().EndpointSlices(s.Namespace).Delete(ctx, s.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("delete endpointslice %s: %w", key, err)
			}
		}
	}
	return nil
}

func (c *Cluster) desiredSlice(svc *v1.Service) *discoveryv1.EndpointSlice {
	sel := labels.SelectorFromSet(svc.Spec.Selector)
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: svc.Namespace,
			Name:      svc.Name + "-lab",
			Labels: map[string]string{
				discoveryv1.LabelServiceName: svc.Name,
				discoveryv1.LabelManagedBy:   managedBy,
			},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for _, sp := range svc.Spec.Ports {
		port := sp.TargetPort.IntVal
		if port == 0 {
			port = sp.Port
		}
		slice.Ports = append(slice.Ports, discoveryv1.EndpointPort{Name: ptr.To(sp.Name), Protocol: ptr.To(sp.Protocol), Port: ptr.To(port)})
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, key := range sortedKeys(c.pods) {
		p := c.pods[key]
		if p.Namespace != svc.Namespace || !sel.Matches(labels.Set(p.Labels)) {
			continue
		}
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses: []string{p.IP.String()},
			Conditions: discoveryv1.EndpointConditions{
				Ready:       ptr.To(p.Ready && !p.Terminating),
				Serving:     ptr.To(p.Ready),
				Terminating: ptr.To(p.Terminating),
			},
			NodeName:  ptr.To(p.Node.Name),
			Zone:      ptr.To("zone-" + p.Node.Name),
			TargetRef: &v1.ObjectReference{Kind: "Pod", Namespace: p.Namespace, Name: p.Name},
		})
	}
	return slice
}
