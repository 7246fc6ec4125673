package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// loadBalancer plays a packet-forwarding cloud load balancer and its cloud
// controller: it gives each LoadBalancer Service a VIP (status.loadBalancer
// .ingress), and routes the VIP, in the router, to the nodes that should get
// its traffic: with externalTrafficPolicy Local, those whose
// healthCheckNodePort answers /healthz with 200, re-checked every second;
// otherwise every node. The client's address reaches the node unchanged.
type loadBalancer struct {
	c *Cluster

	mu       sync.Mutex
	vips     map[string]netip.Addr   // namespace/name -> VIP
	backends map[netip.Addr][]string // VIP -> node names, as routed now
	next     netip.Addr
}

func newLoadBalancer(c *Cluster) *loadBalancer {
	return &loadBalancer{c: c, vips: map[string]netip.Addr{}, backends: map[netip.Addr][]string{}, next: FirstVIP}
}

func (lb *loadBalancer) run(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		if err := lb.reconcile(ctx); err != nil && ctx.Err() == nil {
			lb.c.logf("load balancer: %v", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (lb *loadBalancer) reconcile(ctx context.Context) error {
	svcs, err := lb.c.Kube.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list services: %w", err)
	}
	live := map[netip.Addr]bool{}
	for i := range svcs.Items {
		svc := &svcs.Items[i]
		if svc.Spec.Type != v1.ServiceTypeLoadBalancer {
			continue
		}
		vip, err := lb.assign(ctx, svc)
		if err != nil {
			return err
		}
		live[vip] = true
		var healthy []string
		var via []netip.Addr
		for _, n := range lb.c.Nodes {
			if lb.healthy(ctx, svc, n) {
				healthy = append(healthy, n.Name)
				via = append(via, n.IP)
			}
		}
		lb.route(vip, healthy, via)
	}
	// VIPs of Services that are gone (or no longer LoadBalancers).
	lb.mu.Lock()
	var gone []netip.Addr
	for key, vip := range lb.vips {
		if !live[vip] {
			gone = append(gone, vip)
			delete(lb.vips, key)
		}
	}
	lb.mu.Unlock()
	for _, vip := range gone {
		lb.route(vip, nil, nil)
	}
	return nil
}

// assign gives the Service its VIP, as a cloud controller writes it.
func (lb *loadBalancer) assign(ctx context.Context, svc *v1.Service) (netip.Addr, error) {
	key := svc.Namespace + "/" + svc.Name
	lb.mu.Lock()
	vip, ok := lb.vips[key]
	if !ok {
		vip = lb.next
		lb.next = lb.next.Next()
		lb.vips[key] = vip
	}
	lb.mu.Unlock()
	if len(svc.Status.LoadBalancer.Ingress) == 1 && svc.Status.LoadBalancer.Ingress[0].IP == vip.String() {
		return vip, nil
	}
	svc = svc.DeepCopy()
	svc.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: vip.String()}}
	if _, err := lb.c.Kube.CoreV1().Services(svc.Namespace).UpdateStatus(ctx, svc, metav1.UpdateOptions{}); err != nil {
		return vip, fmt.Errorf("set load balancer IP of %s: %w", key, err)
	}
	return vip, nil
}

// healthy asks the node the way cloud load balancers do: the Service's
// healthCheckNodePort for Local policy, the proxy's own health otherwise.
func (lb *loadBalancer) healthy(ctx context.Context, svc *v1.Service, n *Node) bool {
	port := 10256
	if svc.Spec.ExternalTrafficPolicy == v1.ServiceExternalTrafficPolicyLocal && svc.Spec.HealthCheckNodePort != 0 {
		port = int(svc.Spec.HealthCheckNodePort)
	}
	ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	status, _, err := lb.c.Router.HTTPGet(ctx, fmt.Sprintf("http://%s:%d/healthz", n.IP, port), 500*time.Millisecond)
	return err == nil && status == 200
}

func (lb *loadBalancer) route(vip netip.Addr, names []string, via []netip.Addr) {
	lb.mu.Lock()
	same := slices.Equal(lb.backends[vip], names)
	if len(names) == 0 {
		delete(lb.backends, vip)
	} else {
		lb.backends[vip] = names
	}
	lb.mu.Unlock()
	if same {
		return
	}
	if err := lb.c.Router.SetRoute(netip.PrefixFrom(vip, 32), via...); err != nil {
		lb.c.logf("load balancer: route %s: %v", vip, err)
		return
	}
	lb.c.logf("load balancer: %s -> [%s]", vip, strings.Join(names, " "))
}

// LBBackends says which nodes the load balancer sends a VIP's traffic to now.
func (c *Cluster) LBBackends(vip netip.Addr) []string {
	c.lb.mu.Lock()
	defer c.lb.mu.Unlock()
	return append([]string(nil), c.lb.backends[vip]...)
}

// VIP returns the load balancer IP given to a Service (ns/name), if any.
func (c *Cluster) VIP(service string) (netip.Addr, bool) {
	if !strings.Contains(service, "/") {
		service = "default/" + service
	}
	c.lb.mu.Lock()
	defer c.lb.mu.Unlock()
	vip, ok := c.lb.vips[service]
	return vip, ok
}
