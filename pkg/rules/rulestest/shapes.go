// Package rulestest holds one Service of every shape the rules package can
// produce, so that kernel tests can put all of them through the real
// iptables-restore and send traffic to each: a construct that only some
// shape emits (the source-range chains, affinity, SCTP) is then never left
// to unit tests alone.
package rulestest

import (
	"net/netip"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
)

// Addrs are the addresses the shapes are built from. Shape i gets the
// ClusterIP ServiceBase+i, the NodePort NodePortBase+i, and, where it has
// them, the load balancer IP LoadBalancerBase+i and the external IP
// ExternalBase+i.
type Addrs struct {
	ServiceBase, LoadBalancerBase, ExternalBase netip.Addr
	NodePortBase                                int32
	// LocalPod runs on the node the rules are for, RemotePod on another.
	LocalPod, RemotePod netip.Addr
	// TCPPort and UDPPort are where the pods listen.
	TCPPort, UDPPort int32
	// Admitted is the loadBalancerSourceRanges entry of the shapes that
	// have one.
	Admitted netip.Prefix
	// Zone is the node's zone; the "hints" shape gives the local endpoint
	// this zone and the remote one another.
	Zone string
}

// Shape is one Service: its ports and their endpoints.
type Shape struct {
	Name      string
	Ports     []*endpoints.ServicePort
	Endpoints map[endpoints.ServicePortName][]endpoints.Endpoint
}

// Service returns the shape's port named port ("" for a single port).
func (s Shape) Service(port string) *endpoints.ServicePort {
	for _, p := range s.Ports {
		if p.Name.Port == port {
			return p
		}
	}
	return nil
}

type shapeSpec struct {
	name string
	// ports: "tcp", "udp", "sctp", or several for a multi-port Service.
	ports []endpoints.Protocol
	mod   func(a Addrs, i int, sp *endpoints.ServicePort)
	eps   func(a Addrs, port int32) []endpoints.Endpoint
}

func nodePort(a Addrs, i int, sp *endpoints.ServicePort) { sp.NodePort = a.NodePortBase + int32(i) }

func loadBalancer(a Addrs, i int, sp *endpoints.ServicePort) {
	nodePort(a, i, sp)
	sp.LoadBalancerIPs = []netip.Addr{offset(a.LoadBalancerBase, i)}
}

func localPolicy(a Addrs, i int, sp *endpoints.ServicePort) {
	sp.ExternalPolicyLocal = true
	sp.HealthCheckNodePort = 32000 + int32(i)
}

func sourceRanges(a Addrs, _ int, sp *endpoints.ServicePort) {
	sp.LoadBalancerSourceRanges = []netip.Prefix{a.Admitted}
}

func externalIP(a Addrs, i int, sp *endpoints.ServicePort) {
	sp.ExternalIPs = []netip.Addr{offset(a.ExternalBase, i)}
}

func affinity(_ Addrs, _ int, sp *endpoints.ServicePort) { sp.AffinityTimeoutSeconds = 10800 }

func internalLocal(_ Addrs, _ int, sp *endpoints.ServicePort) { sp.InternalPolicyLocal = true }

func all(mods ...func(Addrs, int, *endpoints.ServicePort)) func(Addrs, int, *endpoints.ServicePort) {
	return func(a Addrs, i int, sp *endpoints.ServicePort) {
		for _, m := range mods {
			m(a, i, sp)
		}
	}
}

func ready(ip netip.Addr, port int32, local bool) endpoints.Endpoint {
	node := "node2"
	if local {
		node = "node1"
	}
	return endpoints.Endpoint{IP: ip, Port: port, Ready: true, Serving: true, NodeName: node, Local: local}
}

func both(a Addrs, port int32) []endpoints.Endpoint {
	return []endpoints.Endpoint{ready(a.LocalPod, port, true), ready(a.RemotePod, port, false)}
}
func localOnly(a Addrs, port int32) []endpoints.Endpoint {
	return []endpoints.Endpoint{ready(a.LocalPod, port, true)}
}
func remoteOnly(a Addrs, port int32) []endpoints.Endpoint {
	return []endpoints.Endpoint{ready(a.RemotePod, port, false)}
}
func none(Addrs, int32) []endpoints.Endpoint { return nil }

var tcp, udp, sctp = endpoints.TCP, endpoints.UDP, endpoints.SCTP

// specs lists the shapes; EveryShape numbers them in this order, so a
// shape's addresses stay put when one is added at the end.
var specs = []shapeSpec{
	{name: "clusterip", ports: []endpoints.Protocol{tcp}, eps: both},
	{name: "clusterip-udp", ports: []endpoints.Protocol{udp}, eps: both},
	{name: "clusterip-sctp", ports: []endpoints.Protocol{sctp}, eps: both},
	{name: "two-ports", ports: []endpoints.Protocol{tcp, udp}, mod: nodePort, eps: remoteOnly},
	{name: "nodeport", ports: []endpoints.Protocol{tcp}, mod: nodePort, eps: remoteOnly},
	{name: "nodeport-local", ports: []endpoints.Protocol{tcp}, mod: all(nodePort, localPolicy), eps: localOnly},
	{name: "nodeport-local-elsewhere", ports: []endpoints.Protocol{tcp}, mod: all(nodePort, localPolicy), eps: remoteOnly},
	{name: "loadbalancer", ports: []endpoints.Protocol{tcp}, mod: loadBalancer, eps: remoteOnly},
	{name: "loadbalancer-local", ports: []endpoints.Protocol{tcp}, mod: all(loadBalancer, localPolicy), eps: localOnly},
	{name: "loadbalancer-local-elsewhere", ports: []endpoints.Protocol{tcp}, mod: all(loadBalancer, localPolicy), eps: remoteOnly},
	{name: "loadbalancer-sourceranges", ports: []endpoints.Protocol{tcp}, mod: all(loadBalancer, sourceRanges), eps: remoteOnly},
	{name: "loadbalancer-sourceranges-local", ports: []endpoints.Protocol{tcp}, mod: all(loadBalancer, sourceRanges, localPolicy), eps: localOnly},
	{name: "loadbalancer-sourceranges-udp", ports: []endpoints.Protocol{udp}, mod: all(loadBalancer, sourceRanges), eps: remoteOnly},
	{name: "loadbalancer-sourceranges-affinity", ports: []endpoints.Protocol{tcp}, mod: all(loadBalancer, sourceRanges, affinity), eps: both},
	{name: "loadbalancer-sctp-local", ports: []endpoints.Protocol{sctp}, mod: all(loadBalancer, localPolicy, sourceRanges), eps: localOnly},
	{name: "externalip", ports: []endpoints.Protocol{tcp}, mod: externalIP, eps: remoteOnly},
	{name: "externalip-local", ports: []endpoints.Protocol{tcp}, mod: all(externalIP, localPolicy), eps: localOnly},
	{name: "affinity", ports: []endpoints.Protocol{tcp}, mod: affinity, eps: both},
	{name: "no-endpoints", ports: []endpoints.Protocol{tcp}, mod: nodePort, eps: none},
	{name: "no-endpoints-udp", ports: []endpoints.Protocol{udp}, eps: none},
	{name: "terminating-only", ports: []endpoints.Protocol{tcp}, eps: func(a Addrs, port int32) []endpoints.Endpoint {
		ep := ready(a.RemotePod, port, false)
		ep.Ready, ep.Terminating = false, true
		return []endpoints.Endpoint{ep}
	}},
	{name: "terminating-not-serving", ports: []endpoints.Protocol{tcp}, eps: func(a Addrs, port int32) []endpoints.Endpoint {
		ep := ready(a.RemotePod, port, false)
		ep.Ready, ep.Serving, ep.Terminating = false, false, true
		return []endpoints.Endpoint{ep}
	}},
	{name: "hints", ports: []endpoints.Protocol{tcp}, eps: func(a Addrs, port int32) []endpoints.Endpoint {
		eps := both(a, port)
		eps[0].ZoneHints, eps[1].ZoneHints = []string{a.Zone}, []string{a.Zone + "-other"}
		return eps
	}},
	{name: "internal-local", ports: []endpoints.Protocol{tcp}, mod: internalLocal, eps: both},
	{name: "internal-local-elsewhere", ports: []endpoints.Protocol{tcp}, mod: internalLocal, eps: remoteOnly},
	{name: "node-hints", ports: []endpoints.Protocol{tcp}, eps: func(a Addrs, port int32) []endpoints.Endpoint {
		eps := both(a, port)
		eps[0].NodeHints, eps[1].NodeHints = []string{"node1"}, []string{"node2"}
		return eps
	}},
}

// EveryShape returns one Service of every shape, addressed from a.
// Single-port Services listen on 80 (TCP), 53 (UDP) or 9 (SCTP) and lead
// to the pods' TCPPort, UDPPort or TCPPort; the ports of a multi-port
// Service are named after their protocol.
func EveryShape(a Addrs) []Shape {
	out := make([]Shape, 0, len(specs))
	for i, spec := range specs {
		sh := Shape{Name: spec.name, Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{}}
		for _, proto := range spec.ports {
			name := endpoints.ServicePortName{Namespace: "shapes", Name: spec.name}
			if len(spec.ports) > 1 {
				name.Port = strings.ToLower(string(proto))
			}
			sp := &endpoints.ServicePort{Name: name, Protocol: proto, ClusterIPs: []netip.Addr{offset(a.ServiceBase, i)}}
			target := a.TCPPort
			switch proto {
			case tcp:
				sp.Port = 80
			case udp:
				sp.Port, target = 53, a.UDPPort
			case sctp:
				sp.Port = 9
			}
			if spec.mod != nil {
				spec.mod(a, i, sp)
			}
			if len(spec.ports) > 1 && sp.NodePort != 0 && proto != tcp {
				sp.NodePort += 1000 // a second port needs its own NodePort
			}
			sh.Ports = append(sh.Ports, sp)
			sh.Endpoints[name] = spec.eps(a, target)
		}
		out = append(out, sh)
	}
	return out
}

// Snapshot puts shapes into the snapshot of node1 in zone.
func Snapshot(zone string, shapes ...Shape) *endpoints.Snapshot {
	snap := &endpoints.Snapshot{
		Node:      endpoints.Node{Name: "node1", Zone: zone, Eligible: true},
		Services:  map[endpoints.ServicePortName]*endpoints.ServicePort{},
		Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{},
	}
	for _, sh := range shapes {
		for _, sp := range sh.Ports {
			snap.Services[sp.Name] = sp
			snap.Endpoints[sp.Name] = sh.Endpoints[sp.Name]
		}
	}
	return snap
}

// offset returns a + i.
func offset(a netip.Addr, i int) netip.Addr {
	for ; i > 0; i-- {
		a = a.Next()
	}
	return a
}
