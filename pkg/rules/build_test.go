package rules

import (
	"fmt"
	"math/rand"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// The tutorial's cluster, seen from node1: the client outside, node1 and
// node2 on the LAN, one source-ip-app pod on each node.
var (
	client    = netip.MustParseAddr("198.51.100.79")
	node1IP   = netip.MustParseAddr("10.240.0.3")
	node1Pod  = netip.MustParseAddr("10.244.1.5") // runs on node1 (this node)
	node1Pod2 = netip.MustParseAddr("10.244.1.9") // another pod on node1
	node2Pod  = netip.MustParseAddr("10.244.2.6") // runs on node2
	otherPod  = netip.MustParseAddr("10.244.2.7") // a client pod on node2
	clusterIP = netip.MustParseAddr("10.0.170.92")
	lbIP      = netip.MustParseAddr("203.0.113.140")
	extIP     = netip.MustParseAddr("192.0.2.10")
)

const nodePort = 30080

func testConfig() Config {
	return Config{
		Family:      iptables.IPv4,
		DetectLocal: clusterCIDR("10.244.0.0/16"),
		NodeIPs:     []netip.Addr{node1IP},
	}
}

// clusterCIDR is --detect-local-mode ClusterCIDR with these ranges.
func clusterCIDR(ranges ...string) DetectLocal {
	d := DetectLocal{Mode: DetectClusterCIDR}
	for _, r := range ranges {
		d.CIDRs = append(d.CIDRs, netip.MustParsePrefix(r))
	}
	return d
}

func sourceIPApp(mods ...func(*endpoints.ServicePort)) *endpoints.ServicePort {
	svc := &endpoints.ServicePort{
		Name:       endpoints.ServicePortName{Namespace: "default", Name: "source-ip-app"},
		Protocol:   endpoints.TCP,
		Port:       80,
		ClusterIPs: []netip.Addr{clusterIP},
	}
	for _, m := range mods {
		m(svc)
	}
	return svc
}

func withNodePort(s *endpoints.ServicePort) { s.NodePort = nodePort }
func withLoadBalancer(s *endpoints.ServicePort) {
	s.NodePort = nodePort
	s.LoadBalancerIPs = []netip.Addr{lbIP}
}
func withExternalIP(s *endpoints.ServicePort) { s.ExternalIPs = []netip.Addr{extIP} }
func localPolicy(s *endpoints.ServicePort)    { s.ExternalPolicyLocal = true }
func internalLocal(s *endpoints.ServicePort)  { s.InternalPolicyLocal = true }
func udp(s *endpoints.ServicePort)            { s.Protocol = endpoints.UDP }
func sctp(s *endpoints.ServicePort)           { s.Protocol = endpoints.SCTP }
func affinity(s *endpoints.ServicePort)       { s.AffinityTimeoutSeconds = 10800 }
func sourceRanges(r ...string) func(*endpoints.ServicePort) {
	return func(s *endpoints.ServicePort) {
		for _, p := range r {
			s.LoadBalancerSourceRanges = append(s.LoadBalancerSourceRanges, netip.MustParsePrefix(p))
		}
	}
}

func ready(ip netip.Addr, local bool) endpoints.Endpoint {
	node := "node2"
	if local {
		node = "node1"
	}
	return endpoints.Endpoint{IP: ip, Port: 8080, Ready: true, Serving: true, NodeName: node, Local: local}
}

func terminating(ep endpoints.Endpoint, serving bool) endpoints.Endpoint {
	ep.Ready, ep.Serving, ep.Terminating = false, serving, true
	return ep
}

func hinted(ep endpoints.Endpoint, zones ...string) endpoints.Endpoint {
	ep.ZoneHints = zones
	return ep
}

// nodeHinted gives an endpoint hints.forNodes, as the EndpointSlice
// controller does for trafficDistribution: PreferSameNode.
func nodeHinted(ep endpoints.Endpoint, nodes ...string) endpoints.Endpoint {
	ep.NodeHints = nodes
	return ep
}

// onePodPerNode is the tutorial's deployment after scaling to two replicas.
var onePodPerNode = []endpoints.Endpoint{ready(node1Pod, true), ready(node2Pod, false)}

// onlyOnNode2 is the tutorial's single replica, on the other node.
var onlyOnNode2 = []endpoints.Endpoint{ready(node2Pod, false)}

func snapshotOf(svc *endpoints.ServicePort, eps []endpoints.Endpoint) *endpoints.Snapshot {
	return &endpoints.Snapshot{
		Node:      endpoints.Node{Name: "node1", Zone: "zone-a", Eligible: true},
		Services:  map[endpoints.ServicePortName]*endpoints.ServicePort{svc.Name: svc},
		Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{svc.Name: eps},
	}
}

func trace(t *testing.T, snap *endpoints.Snapshot, cfg Config, p iptables.Packet) []string {
	t.Helper()
	tr, err := iptables.NewTracer(Build(snap, cfg), []netip.Addr{node1IP})
	if err != nil {
		t.Fatalf("load rules: %v", err)
	}
	outs, err := tr.Trace(p)
	if err != nil {
		t.Fatalf("trace: %v", err)
	}
	var got []string
	for _, o := range outs {
		got = append(got, o.String())
	}
	return got
}

func tcpTo(src, dst netip.Addr, port int) iptables.Packet {
	return iptables.Packet{Src: src, Dst: dst, Proto: "tcp", DPort: port}
}

func fromNode(p iptables.Packet) iptables.Packet { p.FromNode = true; return p }

func TestTutorialOutcomes(t *testing.T) {
	half := func(s string) string { return s + " (p=0.500)" }
	all := func(s string) string { return s + " (p=1.000)" }
	tests := []struct {
		name string
		svc  *endpoints.ServicePort
		eps  []endpoints.Endpoint
		cfg  func(*Config)
		pkt  iptables.Packet
		want []string
	}{
		// 1. ClusterIP
		{
			name: "pod to ClusterIP: spread evenly over both pods, client pod's IP kept",
			svc:  sourceIPApp(), eps: onePodPerNode,
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{half("ACCEPT 10.244.1.5:8080"), half("ACCEPT 10.244.2.6:8080")},
		},
		{
			name: "pod on another node's behalf (routed here) to ClusterIP: not masqueraded",
			svc:  sourceIPApp(), eps: onlyOnNode2,
			pkt:  tcpTo(otherPod, clusterIP, 80),
			want: []string{all("ACCEPT 10.244.2.6:8080")},
		},
		{
			name: "the node itself to ClusterIP: masqueraded",
			svc:  sourceIPApp(), eps: onlyOnNode2,
			pkt:  fromNode(tcpTo(node1IP, clusterIP, 80)),
			want: []string{all("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		{
			name: "client outside the cluster CIDR routed to ClusterIP: masqueraded",
			svc:  sourceIPApp(), eps: onlyOnNode2,
			pkt:  tcpTo(client, clusterIP, 80),
			want: []string{all("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		{
			name: "masquerade-all: even a pod's traffic to ClusterIP is masqueraded",
			svc:  sourceIPApp(), eps: onlyOnNode2,
			cfg:  func(c *Config) { c.MasqueradeAll = true },
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		{
			name: "wrong port on ClusterIP: untouched",
			svc:  sourceIPApp(), eps: onlyOnNode2,
			pkt:  tcpTo(node1Pod2, clusterIP, 81),
			want: []string{all("ACCEPT 10.0.170.92:81")},
		},
		{
			name: "UDP to ClusterIP: DNAT, source kept",
			svc:  sourceIPApp(udp), eps: onlyOnNode2,
			pkt:  iptables.Packet{Src: node1Pod2, Dst: clusterIP, Proto: "udp", DPort: 80},
			want: []string{all("ACCEPT 10.244.2.6:8080")},
		},
		{
			name: "TCP to a UDP Service: untouched",
			svc:  sourceIPApp(udp), eps: onlyOnNode2,
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("ACCEPT 10.0.170.92:80")},
		},
		{
			name: "SCTP to ClusterIP: DNAT",
			svc:  sourceIPApp(sctp), eps: onlyOnNode2,
			pkt:  iptables.Packet{Src: node1Pod2, Dst: clusterIP, Proto: "sctp", DPort: 80},
			want: []string{all("ACCEPT 10.244.2.6:8080")},
		},
		// hairpin
		{
			name: "pod reaching itself through its Service (hairpin): masqueraded when it lands on itself",
			svc:  sourceIPApp(), eps: onePodPerNode,
			pkt:  tcpTo(node1Pod, clusterIP, 80),
			want: []string{half("ACCEPT 10.244.1.5:8080 masqueraded"), half("ACCEPT 10.244.2.6:8080")},
		},
		// 2. NodePort
		{
			name: "client outside, Cluster policy, NodePort: any pod, masqueraded (the tutorial's node IPs)",
			svc:  sourceIPApp(withNodePort), eps: onePodPerNode,
			pkt:  tcpTo(client, node1IP, nodePort),
			want: []string{half("ACCEPT 10.244.1.5:8080 masqueraded"), half("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		{
			name: "client outside, Local policy, node with endpoint: the local pod sees the client's IP",
			svc:  sourceIPApp(withNodePort, localPolicy), eps: onePodPerNode,
			pkt:  tcpTo(client, node1IP, nodePort),
			want: []string{all("ACCEPT 10.244.1.5:8080")},
		},
		{
			name: "client outside, Local policy, node without endpoint: dropped",
			svc:  sourceIPApp(withNodePort, localPolicy), eps: onlyOnNode2,
			pkt:  tcpTo(client, node1IP, nodePort),
			want: []string{all("DROP 10.240.0.3:30080")},
		},
		{
			name: "pod, Local policy, node without endpoint: still reaches the remote pod, unmasqueraded",
			svc:  sourceIPApp(withNodePort, localPolicy), eps: onlyOnNode2,
			pkt:  tcpTo(node1Pod2, node1IP, nodePort),
			want: []string{all("ACCEPT 10.244.2.6:8080")},
		},
		{
			name: "the node itself, Local policy, node without endpoint: reaches the remote pod, masqueraded",
			svc:  sourceIPApp(withNodePort, localPolicy), eps: onlyOnNode2,
			pkt:  fromNode(tcpTo(node1IP, node1IP, nodePort)),
			want: []string{all("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		{
			name: "client outside, --nodeport-addresses excludes the address: untouched",
			svc:  sourceIPApp(withNodePort), eps: onePodPerNode,
			cfg:  func(c *Config) { c.NodePortAddresses = []netip.Addr{netip.MustParseAddr("10.240.0.99")} },
			pkt:  tcpTo(client, node1IP, nodePort),
			want: []string{all("ACCEPT 10.240.0.3:30080")},
		},
		{
			name: "client outside, --nodeport-addresses includes the address: served",
			svc:  sourceIPApp(withNodePort), eps: onlyOnNode2,
			cfg:  func(c *Config) { c.NodePortAddresses = []netip.Addr{node1IP} },
			pkt:  tcpTo(client, node1IP, nodePort),
			want: []string{all("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		{
			name: "UDP NodePort, Cluster policy: masqueraded",
			svc:  sourceIPApp(withNodePort, udp), eps: onlyOnNode2,
			pkt:  iptables.Packet{Src: client, Dst: node1IP, Proto: "udp", DPort: nodePort},
			want: []string{all("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		// LoadBalancer and externalIPs
		{
			name: "client outside, Cluster policy, LoadBalancer IP: masqueraded",
			svc:  sourceIPApp(withLoadBalancer), eps: onlyOnNode2,
			pkt:  tcpTo(client, lbIP, 80),
			want: []string{all("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		{
			name: "client outside, Local policy, LoadBalancer IP, node with endpoint: client's IP kept",
			svc:  sourceIPApp(withLoadBalancer, localPolicy), eps: onePodPerNode,
			pkt:  tcpTo(client, lbIP, 80),
			want: []string{all("ACCEPT 10.244.1.5:8080")},
		},
		{
			name: "client outside, Local policy, LoadBalancer IP, node without endpoint: dropped",
			svc:  sourceIPApp(withLoadBalancer, localPolicy), eps: onlyOnNode2,
			pkt:  tcpTo(client, lbIP, 80),
			want: []string{all("DROP 203.0.113.140:80")},
		},
		{
			name: "client outside, Cluster policy, external IP: masqueraded",
			svc:  sourceIPApp(withExternalIP), eps: onlyOnNode2,
			pkt:  tcpTo(client, extIP, 80),
			want: []string{all("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		{
			name: "client outside, Local policy, external IP, node with endpoint: client's IP kept",
			svc:  sourceIPApp(withExternalIP, localPolicy), eps: onePodPerNode,
			pkt:  tcpTo(client, extIP, 80),
			want: []string{all("ACCEPT 10.244.1.5:8080")},
		},
		{
			name: "client inside loadBalancerSourceRanges: served",
			svc:  sourceIPApp(withLoadBalancer, sourceRanges("198.51.100.0/24")), eps: onlyOnNode2,
			pkt:  tcpTo(client, lbIP, 80),
			want: []string{all("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		{
			name: "client outside loadBalancerSourceRanges: dropped",
			svc:  sourceIPApp(withLoadBalancer, sourceRanges("192.0.2.0/24")), eps: onlyOnNode2,
			pkt:  tcpTo(client, lbIP, 80),
			want: []string{all("DROP 203.0.113.140:80")},
		},
		{
			name: "loadBalancerSourceRanges only of the other family: nobody admitted",
			svc:  sourceIPApp(withLoadBalancer, sourceRanges("2001:db8::/32")), eps: onlyOnNode2,
			pkt:  tcpTo(client, lbIP, 80),
			want: []string{all("DROP 203.0.113.140:80")},
		},
		{
			name: "loadBalancerSourceRanges, Local policy, node with endpoint: admitted client keeps its IP",
			svc:  sourceIPApp(withLoadBalancer, localPolicy, sourceRanges("198.51.100.0/24")), eps: onePodPerNode,
			pkt:  tcpTo(client, lbIP, 80),
			want: []string{all("ACCEPT 10.244.1.5:8080")},
		},
		{
			name: "loadBalancerSourceRanges do not restrict the NodePort",
			svc:  sourceIPApp(withLoadBalancer, sourceRanges("192.0.2.0/24")), eps: onlyOnNode2,
			pkt:  tcpTo(client, node1IP, nodePort),
			want: []string{all("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		// 3. No endpoints
		{
			name: "Service without endpoints, ClusterIP: rejected at once",
			svc:  sourceIPApp(), eps: nil,
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("REJECT 10.0.170.92:80")},
		},
		{
			name: "Service without endpoints, from the node itself: rejected",
			svc:  sourceIPApp(), eps: nil,
			pkt:  fromNode(tcpTo(node1IP, clusterIP, 80)),
			want: []string{all("REJECT 10.0.170.92:80")},
		},
		{
			name: "Service without endpoints, NodePort: rejected",
			svc:  sourceIPApp(withNodePort), eps: nil,
			pkt:  tcpTo(client, node1IP, nodePort),
			want: []string{all("REJECT 10.240.0.3:30080")},
		},
		{
			name: "Service without endpoints, LoadBalancer IP with Local policy: rejected, not dropped",
			svc:  sourceIPApp(withLoadBalancer, localPolicy), eps: nil,
			pkt:  tcpTo(client, lbIP, 80),
			want: []string{all("REJECT 203.0.113.140:80")},
		},
		{
			name: "Service whose only endpoint is not ready: rejected",
			svc:  sourceIPApp(), eps: []endpoints.Endpoint{terminating(ready(node2Pod, false), false)},
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("REJECT 10.0.170.92:80")},
		},
		// 4. internalTrafficPolicy, affinity, terminating, topology
		{
			name: "internalTrafficPolicy Local: only the pod on this node",
			svc:  sourceIPApp(internalLocal), eps: onePodPerNode,
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("ACCEPT 10.244.1.5:8080")},
		},
		{
			name: "internalTrafficPolicy Local, no pod on this node: dropped",
			svc:  sourceIPApp(internalLocal), eps: onlyOnNode2,
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("DROP 10.0.170.92:80")},
		},
		{
			name: "internalTrafficPolicy Local with a Cluster-policy NodePort: outside traffic still goes anywhere",
			svc:  sourceIPApp(internalLocal, withNodePort), eps: onlyOnNode2,
			pkt:  tcpTo(client, node1IP, nodePort),
			want: []string{all("ACCEPT 10.244.2.6:8080 masqueraded")},
		},
		{
			name: "both policies Local, pod to the NodePort: any endpoint, the pod's own address (found by the parity test)",
			svc:  sourceIPApp(withNodePort, localPolicy, internalLocal), eps: onePodPerNode,
			pkt:  tcpTo(node1Pod2, node1IP, nodePort),
			want: []string{half("ACCEPT 10.244.1.5:8080"), half("ACCEPT 10.244.2.6:8080")},
		},
		{
			name: "both policies Local, pod to the ClusterIP: this node's endpoint only",
			svc:  sourceIPApp(withNodePort, localPolicy, internalLocal), eps: onePodPerNode,
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("ACCEPT 10.244.1.5:8080")},
		},
		{
			name: "no ready endpoint, one serving and terminating: used as the fallback",
			svc:  sourceIPApp(), eps: []endpoints.Endpoint{terminating(ready(node2Pod, false), true), terminating(ready(node1Pod, true), false)},
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("ACCEPT 10.244.2.6:8080")},
		},
		{
			name: "a ready endpoint exists: terminating ones are not used",
			svc:  sourceIPApp(), eps: []endpoints.Endpoint{ready(node1Pod, true), terminating(ready(node2Pod, false), true)},
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("ACCEPT 10.244.1.5:8080")},
		},
		{
			name: "Local policy, the local pod is terminating but serving: used for outside clients",
			svc:  sourceIPApp(withNodePort, localPolicy), eps: []endpoints.Endpoint{terminating(ready(node1Pod, true), true), ready(node2Pod, false)},
			pkt:  tcpTo(client, node1IP, nodePort),
			want: []string{all("ACCEPT 10.244.1.5:8080")},
		},
		{
			name: "topology hints for this node's zone: only that zone's endpoint",
			svc:  sourceIPApp(), eps: []endpoints.Endpoint{hinted(ready(node1Pod, true), "zone-a"), hinted(ready(node2Pod, false), "zone-b")},
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("ACCEPT 10.244.1.5:8080")},
		},
		{
			name: "topology hints missing on one endpoint: hints ignored",
			svc:  sourceIPApp(), eps: []endpoints.Endpoint{hinted(ready(node1Pod, true), "zone-a"), ready(node2Pod, false)},
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{half("ACCEPT 10.244.1.5:8080"), half("ACCEPT 10.244.2.6:8080")},
		},
		{
			name: "node hints for this node (PreferSameNode): only this node's endpoint",
			svc:  sourceIPApp(), eps: []endpoints.Endpoint{nodeHinted(hinted(ready(node1Pod, true), "zone-a"), "node1"), nodeHinted(hinted(ready(node2Pod, false), "zone-a"), "node2")},
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("ACCEPT 10.244.1.5:8080")},
		},
		{
			name: "node hints for other nodes only: the zone hints decide",
			svc:  sourceIPApp(), eps: []endpoints.Endpoint{nodeHinted(hinted(ready(node1Pod, true), "zone-b"), "node3"), nodeHinted(hinted(ready(node2Pod, false), "zone-a"), "node2")},
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("ACCEPT 10.244.2.6:8080")},
		},
		{
			name: "node hints missing on one endpoint: node hints ignored, zone hints used",
			svc:  sourceIPApp(), eps: []endpoints.Endpoint{nodeHinted(hinted(ready(node1Pod, true), "zone-b"), "node1"), hinted(ready(node2Pod, false), "zone-a")},
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{all("ACCEPT 10.244.2.6:8080")},
		},
		{
			name: "topology hints name no endpoint for this zone: hints ignored",
			svc:  sourceIPApp(), eps: []endpoints.Endpoint{hinted(ready(node1Pod, true), "zone-b"), hinted(ready(node2Pod, false), "zone-c")},
			pkt:  tcpTo(node1Pod2, clusterIP, 80),
			want: []string{half("ACCEPT 10.244.1.5:8080"), half("ACCEPT 10.244.2.6:8080")},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			if tc.cfg != nil {
				tc.cfg(&cfg)
			}
			got := trace(t, snapshotOf(tc.svc, tc.eps), cfg, tc.pkt)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("outcomes (-want +got):\n%s", diff)
			}
		})
	}
}

func TestSpreadsEvenlyOverManyEndpoints(t *testing.T) {
	var eps []endpoints.Endpoint
	for i := 1; i <= 7; i++ {
		eps = append(eps, ready(netip.AddrFrom4([4]byte{10, 244, 2, byte(i)}), false))
	}
	tr, err := iptables.NewTracer(Build(snapshotOf(sourceIPApp(), eps), testConfig()), []netip.Addr{node1IP})
	if err != nil {
		t.Fatal(err)
	}
	outs, _ := tr.Trace(tcpTo(node1Pod2, clusterIP, 80))
	if len(outs) != 7 {
		t.Fatalf("want 7 outcomes, got %v", outs)
	}
	for _, o := range outs {
		if d := o.Probability - 1.0/7; d > 1e-6 || d < -1e-6 {
			t.Errorf("%s: want probability 1/7", o)
		}
	}
}

func TestSessionAffinityKeepsAClientOnItsEndpoint(t *testing.T) {
	tr, err := iptables.NewTracer(Build(snapshotOf(sourceIPApp(affinity), onePodPerNode), testConfig()), []netip.Addr{node1IP})
	if err != nil {
		t.Fatal(err)
	}
	first, _ := tr.Trace(tcpTo(node1Pod2, clusterIP, 80))
	if len(first) != 2 {
		t.Fatalf("first connection: want either endpoint, got %v", first)
	}
	for _, o := range first {
		if len(o.RecentSet) != 1 {
			t.Fatalf("first connection to %s should be remembered, got %v", o.Dst, o.RecentSet)
		}
		// The same client again: always the endpoint it had.
		p := tcpTo(node1Pod2, clusterIP, 80)
		p.Recent = map[string]bool{o.RecentSet[0]: true}
		again, _ := tr.Trace(p)
		if len(again) != 1 || again[0].Dst != o.Dst || again[0].Probability != 1 {
			t.Errorf("client sent to %s first, then %v", o.Dst, again)
		}
	}
	rs := Build(snapshotOf(sourceIPApp(affinity), onePodPerNode), testConfig())
	text := iptables.RenderRestore(rs, func(iptables.Table, string) bool { return true }, nil)
	if !strings.Contains(text, "--rcheck --seconds 10800 --reap") {
		t.Errorf("affinity timeout not in the rules:\n%s", text)
	}
}

func TestIPv6ClusterIPAndNodePort(t *testing.T) {
	cip := netip.MustParseAddr("fd00:10:96::a7")
	pod := netip.MustParseAddr("fd00:10:244:2::6")
	nodeIP6 := netip.MustParseAddr("fd00:10:240::3")
	svc := sourceIPApp(withNodePort, func(s *endpoints.ServicePort) { s.ClusterIPs = []netip.Addr{clusterIP, cip} })
	eps := []endpoints.Endpoint{ready(node2Pod, false), ready(pod, false)}
	cfg := Config{Family: iptables.IPv6, DetectLocal: clusterCIDR("fd00:10:244::/56")}
	tr, err := iptables.NewTracer(Build(snapshotOf(svc, eps), cfg), []netip.Addr{nodeIP6})
	if err != nil {
		t.Fatal(err)
	}
	outs, _ := tr.Trace(tcpTo(netip.MustParseAddr("fd00:10:244:1::9"), cip, 80))
	if got := fmt.Sprint(outs); got != "[ACCEPT [fd00:10:244:2::6]:8080 (p=1.000)]" {
		t.Errorf("pod to IPv6 ClusterIP: got %s", got)
	}
	outs, _ = tr.Trace(tcpTo(netip.MustParseAddr("2001:db8::79"), nodeIP6, nodePort))
	if got := fmt.Sprint(outs); got != "[ACCEPT [fd00:10:244:2::6]:8080 masqueraded (p=1.000)]" {
		t.Errorf("client to IPv6 NodePort: got %s", got)
	}
}

func TestAServiceIsProgrammedOnlyInTheFamiliesOfItsClusterIPs(t *testing.T) {
	v6ext := netip.MustParseAddr("2001:db8::10")
	svc := sourceIPApp(func(s *endpoints.ServicePort) { s.ExternalIPs = []netip.Addr{v6ext} })
	eps := []endpoints.Endpoint{ready(netip.MustParseAddr("fd00:10:244:2::6"), false)}
	tr, err := iptables.NewTracer(Build(snapshotOf(svc, eps), Config{Family: iptables.IPv6}), nil)
	if err != nil {
		t.Fatal(err)
	}
	outs, _ := tr.Trace(tcpTo(netip.MustParseAddr("2001:db8::79"), v6ext, 80))
	if got := fmt.Sprint(outs); got != "[ACCEPT [2001:db8::10]:80 (p=1.000)]" {
		t.Errorf("an IPv6 external IP of an IPv4-only Service must be left alone, got %s", got)
	}
}

// manyServices makes n ClusterIP Services with random addresses in
// 10.96.0.0/12 and two endpoints each, like the benchmark's clusters.
func manyServices(n int, seed int64) *endpoints.Snapshot {
	rng := rand.New(rand.NewSource(seed))
	snap := &endpoints.Snapshot{
		Node:      endpoints.Node{Name: "node1", Eligible: true},
		Services:  map[endpoints.ServicePortName]*endpoints.ServicePort{},
		Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{},
	}
	used := map[netip.Addr]bool{}
	for i := 0; i < n; i++ {
		var ip netip.Addr
		for {
			ip = netip.AddrFrom4([4]byte{10, byte(96 + rng.Intn(16)), byte(rng.Intn(256)), byte(rng.Intn(256))})
			if !used[ip] {
				used[ip] = true
				break
			}
		}
		name := endpoints.ServicePortName{Namespace: "bench", Name: fmt.Sprintf("svc-%05d", i)}
		snap.Services[name] = &endpoints.ServicePort{Name: name, Protocol: endpoints.TCP, Port: 80, ClusterIPs: []netip.Addr{ip}}
		snap.Endpoints[name] = []endpoints.Endpoint{
			ready(netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)}), false),
			ready(netip.AddrFrom4([4]byte{10, 245, byte(i >> 8), byte(i)}), false),
		}
	}
	return snap
}

func TestEveryServiceOfALargeClusterIsReachable(t *testing.T) {
	snap := manyServices(2000, 1)
	tr, err := iptables.NewTracer(Build(snap, testConfig()), []netip.Addr{node1IP})
	if err != nil {
		t.Fatal(err)
	}
	for name, svc := range snap.Services {
		outs, _ := tr.Trace(tcpTo(node1Pod2, svc.ClusterIPs[0], 80))
		want := fmt.Sprintf("[ACCEPT %s (p=0.500) ACCEPT %s (p=0.500)]", snap.Endpoints[name][0], snap.Endpoints[name][1])
		if got := fmt.Sprint(outs); got != want {
			t.Fatalf("%s at %s: got %s, want %s", name, svc.ClusterIPs[0], got, want)
		}
	}
}

// changedChains lists the chains whose rules differ between two rulesets,
// including chains present in only one of them.
func changedChains(a, b *iptables.Ruleset) []string {
	text := func(rs *iptables.Ruleset) map[string]string {
		m := map[string]string{}
		for _, t := range rs.Tables {
			for i := range t.Chains {
				m[string(t.Table)+"/"+t.Chains[i].Name] = iptables.ChainText(&t.Chains[i])
			}
		}
		return m
	}
	ta, tb := text(a), text(b)
	var out []string
	for k, v := range ta {
		if w, ok := tb[k]; !ok || w != v {
			out = append(out, k)
		}
	}
	for k := range tb {
		if _, ok := ta[k]; !ok {
			out = append(out, k)
		}
	}
	return out
}

func TestOneChangedServiceRewritesOneSmallChain(t *testing.T) {
	snap := manyServices(10000, 2)
	before := Build(snap, testConfig())
	name := endpoints.ServicePortName{Namespace: "bench", Name: "svc-04242"}
	snap.Endpoints[name] = append([]endpoints.Endpoint{ready(netip.MustParseAddr("10.246.0.1"), false)}, snap.Endpoints[name]...)
	after := Build(snap, testConfig())
	changed := changedChains(before, after)
	if len(changed) != 1 {
		t.Fatalf("one endpoint added: want exactly one chain rewritten, got %v", changed)
	}
	c := after.Chain("nat", strings.TrimPrefix(changed[0], "nat/"))
	if c == nil || len(c.Rules) > 200 {
		t.Fatalf("rewritten chain %s should be a small leaf", changed[0])
	}
	chains := 0
	for _, tab := range after.Tables {
		chains += len(tab.Chains)
	}
	if chains > 600 {
		t.Errorf("10,000 Services gave %d chains; the layout should stay in the hundreds", chains)
	}
}

// A node with many local endpoints: a new one adds its hairpin rule to one
// leaf of the hairpin dispatch; every other hairpin chain stays as it was,
// so the restore input of one change does not grow with the number of
// local endpoints, and a packet walks a leaf instead of every address.
func TestHairpinRulesAreSpreadSoThatOneChangeRewritesOneLeaf(t *testing.T) {
	snap := &endpoints.Snapshot{
		Node:      endpoints.Node{Name: "node1", Zone: "zone-a", Eligible: true},
		Services:  map[endpoints.ServicePortName]*endpoints.ServicePort{},
		Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{},
	}
	for i := range 2000 {
		svc := sourceIPApp(func(s *endpoints.ServicePort) {
			s.Name.Name = fmt.Sprintf("app-%d", i)
			s.ClusterIPs = []netip.Addr{netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)})}
		})
		snap.Services[svc.Name] = svc
		snap.Endpoints[svc.Name] = []endpoints.Endpoint{ready(netip.AddrFrom4([4]byte{10, 244, 1 + byte(i>>8), byte(i)}), true)}
	}
	hairpinChains := func(rs *iptables.Ruleset) map[string]string {
		out := map[string]string{}
		for _, tr := range rs.Tables {
			for _, c := range tr.Chains {
				if strings.HasPrefix(c.Name, ChainHairpin) {
					out[c.Name] = iptables.ChainText(&c)
				}
			}
		}
		return out
	}
	before := hairpinChains(Build(snap, testConfig()))
	longest := 0
	for _, text := range before {
		longest = max(longest, strings.Count(text, "\n"))
	}
	if longest > 40 {
		t.Errorf("a hairpin chain holds %d rules for 2,000 local endpoints; want them spread over leaves", longest)
	}

	added := sourceIPApp(func(s *endpoints.ServicePort) {
		s.Name.Name = "app-new"
		s.ClusterIPs = []netip.Addr{netip.MustParseAddr("10.96.200.1")}
	})
	snap.Services[added.Name] = added
	snap.Endpoints[added.Name] = []endpoints.Endpoint{ready(netip.MustParseAddr("10.244.200.7"), true)}
	after := hairpinChains(Build(snap, testConfig()))
	var changed []string
	for name, text := range after {
		if before[name] != text {
			changed = append(changed, name)
		}
	}
	if len(changed) != 1 || changed[0] != ChainHairpin+"-07" {
		t.Errorf("a new local endpoint changed the hairpin chains %v; want only its leaf %s-07", changed, ChainHairpin)
	}
}
