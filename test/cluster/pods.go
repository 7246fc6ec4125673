package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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
// (UDP), and a Pod object bound to the node whose status (IP, Ready) the
// lab writes through the status subresource, as the kubelet does. The
// EndpointSlice controller of kube-controller-manager puts it into the
// slices of every Service that selects it.
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
	if err := c.createPod(ctx, p); err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.pods[p.Namespace+"/"+p.Name] = p
	c.mu.Unlock()
	return p, nil
}

// createPod writes the Pod object, bound to its node, and then its status.
func (c *Cluster) createPod(ctx context.Context, p *Pod) error {
	obj := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels},
		Spec: v1.PodSpec{
			NodeName: p.Node.Name,
			Containers: []v1.Container{{Name: "echoserver", Image: "registry.k8s.io/echoserver:1.4", Ports: []v1.ContainerPort{
				{Name: "http", ContainerPort: 8080, Protocol: v1.ProtocolTCP},
				{Name: "dns", ContainerPort: 8081, Protocol: v1.ProtocolUDP},
			}}},
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
	return c.writePodStatus(ctx, p, created)
}

// writePodStatus reports the pod's IP and readiness as its kubelet would.
func (c *Cluster) writePodStatus(ctx context.Context, p *Pod, obj *v1.Pod) error {
	now := metav1.Now()
	ready := v1.ConditionFalse
	if p.Ready {
		ready = v1.ConditionTrue
	}
	obj.Status = v1.PodStatus{
		Phase: v1.PodRunning,
		ContainerStatuses: []v1.ContainerStatus{{
			Name: "echoserver", Ready: p.Ready, Started: ptr.To(true), Image: "registry.k8s.io/echoserver:1.4",
			State: v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: now}},
		}},
		PodIP:  p.IP.String(),
		PodIPs: []v1.PodIP{{IP: p.IP.String()}},
		HostIP: p.Node.IP.String(),
		Conditions: []v1.PodCondition{
			{Type: v1.PodReady, Status: ready, LastTransitionTime: now},
			{Type: v1.ContainersReady, Status: ready, LastTransitionTime: now},
		},
	}
	if _, err := c.Kube.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, obj, metav1.UpdateOptions{}); err != nil {
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

// DeletePod removes a pod as a kubelet confirms a pod gone: the Pod object
// is deleted at once (grace period 0), the EndpointSlice controller drops
// its endpoints, and its namespace and process go.
func (c *Cluster) DeletePod(ctx context.Context, name string) error {
	p := c.Pod(name)
	if p == nil {
		return fmt.Errorf("delete pod %s: %w", name, errNoPod)
	}
	c.mu.Lock()
	delete(c.pods, p.Namespace+"/"+p.Name)
	c.mu.Unlock()
	err := c.Kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete pod object %s: %w", p.Name, err)
	}
	return p.Proc.Stop()
}

// SetPodState changes a pod's readiness as its kubelet would report it,
// and, with terminating, starts its graceful deletion: the API server keeps
// a Pod bound to a node, with a deletion timestamp, until its kubelet
// confirms it gone (DeletePod), so its endpoints stay, terminating, serving
// as long as it is ready. A terminating pod cannot stop terminating.
func (c *Cluster) SetPodState(ctx context.Context, name string, ready, terminating bool) error {
	p := c.Pod(name)
	if p == nil {
		return fmt.Errorf("set state of pod %s: %w", name, errNoPod)
	}
	c.mu.Lock()
	if p.Terminating && !terminating {
		c.mu.Unlock()
		return fmt.Errorf("set state of pod %s: a terminating pod cannot stop terminating", name)
	}
	p.Ready = ready
	startDeletion := terminating && !p.Terminating
	p.Terminating = terminating
	c.mu.Unlock()
	obj, err := c.Kube.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("set state of pod %s: %w", name, err)
	}
	if err := c.writePodStatus(ctx, p, obj); err != nil {
		return err
	}
	if startDeletion {
		err := c.Kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](3600)})
		if err != nil {
			return fmt.Errorf("start deleting pod %s: %w", name, err)
		}
	}
	return nil
}
