package parity

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/test/cluster"
)

// namespace holds every scenario's objects.
const namespace = "default"

var listAll = metav1.ListOptions{}

// slots is how many Services a scenario has at most; Service k selects
// pods labelled parity-s<k>=y.
const slots = 3

// portSpec is one port of a generated Service.
type portSpec struct {
	Name       string
	Protocol   v1.Protocol
	Port       int32
	TargetPort intstr.IntOrString
	NodePort   int32
}

// lbIngress is one status.loadBalancer.ingress entry.
type lbIngress struct {
	IP    netip.Addr
	Proxy bool // ipMode: Proxy (the load balancer proxies; no DNAT for it)
}

// serviceSpec is one generated Service, with every field a proxy reads.
type serviceSpec struct {
	Slot                int
	Name                string
	Type                v1.ServiceType
	Headless            bool
	ExternalName        bool
	ClusterIP           netip.Addr
	Ports               []portSpec
	ExternalLocal       bool
	InternalLocal       bool
	Affinity            bool
	ExternalIPs         []netip.Addr
	LoadBalancer        []lbIngress
	SourceRanges        []netip.Prefix
	TrafficDistribution string
	OtherProxy          bool // service.kubernetes.io/service-proxy-name set
	HealthCheckNodePort int32
}

// podSpec is the state of one endpoint pod in a scenario.
type podSpec struct {
	// Name is a pool pod's name, or "" for a terminating pod made for the
	// scenario on Node.
	Name        string
	Node        string
	Ready       bool
	Terminating bool
	Slots       []int
}

// scenario is one randomized cluster state.
type scenario struct {
	Seed     uint64
	Index    int
	Services []serviceSpec
	Pods     []podSpec
}

// poolNames lists the pool pods, node by node, as startSide makes them.
func poolNames() []podSpec {
	var out []podSpec
	for _, node := range []string{"node1", "node2"} {
		for i := 0; i < backendsPerNode; i++ {
			out = append(out, podSpec{Name: fmt.Sprintf("b-%s-%d", node, i), Node: node})
		}
	}
	return out
}

// generate makes scenario index of a run with seed; the same pair always
// gives the same scenario.
func generate(seed uint64, index int) scenario {
	rng := rand.New(rand.NewPCG(seed, uint64(index)))
	chance := func(p float64) bool { return rng.Float64() < p }
	sc := scenario{Seed: seed, Index: index}
	// Addresses and ports are unique to the scenario (NodePorts cycle
	// through their range), so that nothing of an earlier scenario that
	// lingers in a kernel (conntrack) can meet a later one.
	base := netip.AddrFrom4([4]byte{10, 96, byte(1 + index*slots/250), byte(index * slots % 250)})
	nodePort := func(k int) int32 { return 30000 + int32((index*slots*4+k)%2700) }
	n := 1 + rng.IntN(slots)
	for k := 0; k < n; k++ {
		svc := serviceSpec{Slot: k, Name: fmt.Sprintf("s%d-%d", index, k), ClusterIP: offset(base, k)}
		switch r := rng.Float64(); {
		case r < 0.30:
			svc.Type = v1.ServiceTypeClusterIP
		case r < 0.55:
			svc.Type = v1.ServiceTypeNodePort
		case r < 0.88:
			svc.Type = v1.ServiceTypeLoadBalancer
		case r < 0.94:
			svc.Type, svc.Headless = v1.ServiceTypeClusterIP, true
		default:
			svc.Type, svc.ExternalName = v1.ServiceTypeExternalName, true
		}
		ports := 1
		if chance(0.3) {
			ports = 2
		}
		for i := 0; i < ports; i++ {
			p := portSpec{Port: int32(80 + 10*i)}
			switch r := rng.Float64(); {
			case r < 0.6:
				p.Protocol, p.Name = v1.ProtocolTCP, fmt.Sprintf("tcp-%d", i)
				p.TargetPort = intstr.FromInt32(8080)
				if chance(0.5) {
					p.TargetPort = intstr.FromString("http")
				}
			case r < 0.95:
				p.Protocol, p.Name = v1.ProtocolUDP, fmt.Sprintf("udp-%d", i)
				p.TargetPort = intstr.FromInt32(8081)
				if chance(0.5) {
					p.TargetPort = intstr.FromString("dns")
				}
			default:
				p.Protocol, p.Name = v1.ProtocolSCTP, fmt.Sprintf("sctp-%d", i)
				p.TargetPort = intstr.FromInt32(8080)
			}
			if svc.Type == v1.ServiceTypeNodePort || svc.Type == v1.ServiceTypeLoadBalancer {
				p.NodePort = nodePort(k*4 + i)
			}
			svc.Ports = append(svc.Ports, p)
		}
		if svc.ExternalName || svc.Headless {
			sc.Services = append(sc.Services, svc)
			continue
		}
		if chance(0.25) {
			svc.ExternalIPs = []netip.Addr{offset(netip.MustParseAddr("203.0.113.100"), k)}
		}
		if svc.Type == v1.ServiceTypeLoadBalancer {
			svc.LoadBalancer = []lbIngress{{IP: offset(netip.MustParseAddr("203.0.113.10"), k), Proxy: chance(0.15)}}
			if chance(0.4) {
				if chance(0.6) {
					svc.SourceRanges = []netip.Prefix{admittedRange}
				} else {
					svc.SourceRanges = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("10.240.0.3/32")}
				}
			}
		}
		external := svc.Type != v1.ServiceTypeClusterIP || len(svc.ExternalIPs) > 0
		if external && chance(0.45) {
			svc.ExternalLocal = true
			if svc.Type == v1.ServiceTypeLoadBalancer {
				svc.HealthCheckNodePort = nodePort(k*4 + 3)
			}
		}
		svc.InternalLocal = chance(0.2)
		svc.Affinity = chance(0.15)
		switch r := rng.Float64(); {
		case r < 0.15:
			svc.TrafficDistribution = v1.ServiceTrafficDistributionPreferClose
		case r < 0.25:
			svc.TrafficDistribution = v1.ServiceTrafficDistributionPreferSameNode
		}
		svc.OtherProxy = chance(0.05)
		sc.Services = append(sc.Services, svc)
	}
	// Each pool pod belongs to each Service with some chance, and is ready
	// or not; a few terminating pods are made for the scenario.
	for _, p := range poolNames() {
		p.Ready = !chance(0.15)
		for k := 0; k < n; k++ {
			if chance(0.45) {
				p.Slots = append(p.Slots, k)
			}
		}
		sc.Pods = append(sc.Pods, p)
	}
	for t := rng.IntN(3); t > 0; t-- {
		if !chance(0.5) {
			continue
		}
		p := podSpec{Node: []string{"node1", "node2"}[rng.IntN(2)], Ready: chance(0.6), Terminating: true}
		for k := 0; k < n; k++ {
			if chance(0.6) {
				p.Slots = append(p.Slots, k)
			}
		}
		sc.Pods = append(sc.Pods, p)
	}
	return sc
}

func offset(a netip.Addr, i int) netip.Addr {
	for ; i > 0; i-- {
		a = a.Next()
	}
	return a
}

// object is the Service as the API receives it.
func (svc serviceSpec) object() *v1.Service {
	o := &v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: svc.Name, Labels: map[string]string{"parity": "y"}}}
	if svc.OtherProxy {
		o.Labels["service.kubernetes.io/service-proxy-name"] = "some-other-proxy"
	}
	for _, p := range svc.Ports {
		o.Spec.Ports = append(o.Spec.Ports, v1.ServicePort{Name: p.Name, Protocol: p.Protocol, Port: p.Port, TargetPort: p.TargetPort, NodePort: p.NodePort})
	}
	o.Spec.Type = svc.Type
	if svc.ExternalName {
		o.Spec.ExternalName = "db.example.com"
		return o
	}
	o.Spec.Selector = map[string]string{"role": "backend", fmt.Sprintf("parity-s%d", svc.Slot): "y"}
	if svc.Headless {
		o.Spec.ClusterIP = v1.ClusterIPNone
		return o
	}
	o.Spec.ClusterIP, o.Spec.ClusterIPs = svc.ClusterIP.String(), []string{svc.ClusterIP.String()}
	for _, ip := range svc.ExternalIPs {
		o.Spec.ExternalIPs = append(o.Spec.ExternalIPs, ip.String())
	}
	for _, r := range svc.SourceRanges {
		o.Spec.LoadBalancerSourceRanges = append(o.Spec.LoadBalancerSourceRanges, r.String())
	}
	if svc.ExternalLocal {
		o.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
		o.Spec.HealthCheckNodePort = svc.HealthCheckNodePort
	}
	if svc.InternalLocal {
		o.Spec.InternalTrafficPolicy = ptr.To(v1.ServiceInternalTrafficPolicyLocal)
	}
	if svc.Affinity {
		o.Spec.SessionAffinity = v1.ServiceAffinityClientIP
	}
	if svc.TrafficDistribution != "" {
		o.Spec.TrafficDistribution = ptr.To(svc.TrafficDistribution)
	}
	return o
}

// describe is the scenario as a reader needs it to reproduce a difference.
func (sc scenario) describe(only string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "seed %d, scenario %d\n", sc.Seed, sc.Index)
	for _, svc := range sc.Services {
		if only != "" && svc.Name != only {
			continue
		}
		j, _ := json.Marshal(svc.object().Spec)
		fmt.Fprintf(&b, "  Service %s: %s\n", svc.Name, j)
		if len(svc.LoadBalancer) > 0 {
			fmt.Fprintf(&b, "    status.loadBalancer: %+v\n", svc.LoadBalancer)
		}
		for _, p := range sc.Pods {
			if containsInt(p.Slots, svc.Slot) {
				name := p.Name
				if name == "" {
					name = "(made for the scenario)"
				}
				fmt.Fprintf(&b, "    pod %s on %s: ready=%v terminating=%v\n", name, p.Node, p.Ready, p.Terminating)
			}
		}
	}
	return b.String()
}

func containsInt(list []int, v int) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}

// apply puts the scenario into the side's cluster: pods first (labels,
// readiness, terminating pods), then Services and their load balancer
// status. Both sides make the same calls in the same order.
func (s *side) apply(ctx context.Context, sc scenario) error {
	kube := s.c.Kube.CoreV1()
	for _, p := range sc.Pods {
		if p.Name == "" {
			continue
		}
		labels := map[string]any{}
		for k := 0; k < slots; k++ {
			labels[fmt.Sprintf("parity-s%d", k)] = nil
		}
		for _, k := range p.Slots {
			labels[fmt.Sprintf("parity-s%d", k)] = "y"
		}
		patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": labels}})
		if _, err := kube.Pods(namespace).Patch(ctx, p.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			return fmt.Errorf("label pod %s: %w", p.Name, err)
		}
		if pod := s.c.Pod(p.Name); pod.Ready != p.Ready {
			if err := s.c.SetPodState(ctx, p.Name, p.Ready, false); err != nil {
				return err
			}
		}
	}
	for _, p := range sc.Pods {
		if p.Name != "" {
			continue
		}
		s.next++
		labels := map[string]string{"role": "backend"}
		for _, k := range p.Slots {
			labels[fmt.Sprintf("parity-s%d", k)] = "y"
		}
		pod, err := s.c.AddPod(ctx, cluster.PodSpec{Name: fmt.Sprintf("t-%d", s.next), Labels: labels, Node: s.c.Node(p.Node)})
		if err != nil {
			return err
		}
		if err := s.c.SetPodState(ctx, pod.Name, p.Ready, true); err != nil {
			return err
		}
		s.extra = append(s.extra, pod)
	}
	for _, svc := range sc.Services {
		created, err := kube.Services(namespace).Create(ctx, svc.object(), metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create service %s: %w", svc.Name, err)
		}
		if len(svc.LoadBalancer) == 0 {
			continue
		}
		for _, in := range svc.LoadBalancer {
			ing := v1.LoadBalancerIngress{IP: in.IP.String()}
			if in.Proxy {
				ing.IPMode = ptr.To(v1.LoadBalancerIPModeProxy)
			}
			created.Status.LoadBalancer.Ingress = append(created.Status.LoadBalancer.Ingress, ing)
		}
		if _, err := kube.Services(namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("set load balancer of %s: %w", svc.Name, err)
		}
	}
	return nil
}

// clear removes the scenario's Services and terminating pods.
func (s *side) clear(ctx context.Context, sc scenario) error {
	for _, svc := range sc.Services {
		if err := s.c.Kube.CoreV1().Services(namespace).Delete(ctx, svc.Name, metav1.DeleteOptions{}); err != nil {
			return fmt.Errorf("delete service %s: %w", svc.Name, err)
		}
	}
	for _, p := range s.extra {
		if err := s.c.DeletePod(ctx, p.Name); err != nil {
			return err
		}
	}
	s.extra = nil
	return nil
}
