package explain

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// The tutorial's cluster, seen from node1: the client outside, node1 and
// node2 on the LAN, one source-ip-app pod on each node.
var (
	client   = netip.MustParseAddr("198.51.100.79")
	node1IP  = netip.MustParseAddr("10.240.0.3")
	node1Pod = netip.MustParseAddr("10.244.1.5") // runs on node1 (this node)
	node2Pod = netip.MustParseAddr("10.244.2.6") // runs on node2
	otherPod = netip.MustParseAddr("10.244.2.7") // a client pod on node2
	vip      = netip.MustParseAddr("10.0.170.92")
	lbIP     = netip.MustParseAddr("203.0.113.140")
)

const nodePort = 30080

func sourceIPApp(mods ...func(*endpoints.ServicePort)) *endpoints.ServicePort {
	svc := &endpoints.ServicePort{
		Name:       endpoints.ServicePortName{Namespace: "default", Name: "source-ip-app"},
		Protocol:   endpoints.TCP,
		Port:       80,
		ClusterIPs: []netip.Addr{vip},
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
func localPolicy(s *endpoints.ServicePort)   { s.ExternalPolicyLocal = true }
func internalLocal(s *endpoints.ServicePort) { s.InternalPolicyLocal = true }
func affinity(s *endpoints.ServicePort)      { s.AffinityTimeoutSeconds = 10800 }
func sourceRanges(r string) func(*endpoints.ServicePort) {
	return func(s *endpoints.ServicePort) {
		s.LoadBalancerSourceRanges = []netip.Prefix{netip.MustParsePrefix(r)}
	}
}

func endpoint(ip netip.Addr, node string) endpoints.Endpoint {
	return endpoints.Endpoint{IP: ip, Port: 8080, Ready: true, Serving: true, NodeName: node, Local: node == "node1", Zone: "zone-" + node}
}

var (
	onNode1 = endpoint(node1Pod, "node1")
	onNode2 = endpoint(node2Pod, "node2")
)

func terminating(ep endpoints.Endpoint) endpoints.Endpoint {
	ep.Ready, ep.Terminating = false, true
	return ep
}

func hinted(zone string, ep endpoints.Endpoint) endpoints.Endpoint {
	ep.ZoneHints = []string{zone}
	return ep
}

// nodeView is node1's view with one Service and its endpoints.
func nodeView(svc *endpoints.ServicePort, eps ...endpoints.Endpoint) View {
	snap := &endpoints.Snapshot{
		Node:      endpoints.Node{Name: "node1", Zone: "zone-node1", Eligible: true},
		Services:  map[endpoints.ServicePortName]*endpoints.ServicePort{svc.Name: svc},
		Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{svc.Name: eps},
	}
	cfg := rules.Config{
		Family:      iptables.IPv4,
		DetectLocal: rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}},
		NodeIPs:     []netip.Addr{node1IP},
	}
	return View{Snapshot: snap, Configs: map[iptables.Family]rules.Config{iptables.IPv4: cfg}, LocalAddrs: []netip.Addr{node1IP}}
}

// kernelOf is the kernel after miniproxy's dataplane applied the rules it
// builds for v (into the Fake, which refuses what iptables-restore does).
func kernelOf(t *testing.T, v View) Kernel {
	t.Helper()
	fake := dataplane.NewFake()
	k := Kernel{}
	for fam, cfg := range v.Configs {
		dp, err := dataplane.New(fake, fam, rules.Prefix)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := dp.Apply(rules.Build(v.Snapshot, cfg), true); err != nil {
			t.Fatal(err)
		}
		k[fam] = fake.State(fam)
	}
	return k
}

func tcpTo(src netip.Addr, dst netip.Addr, port uint16) Query {
	return Query{Src: src, Dst: netip.AddrPortFrom(dst, port), Protocol: endpoints.TCP}
}

func fromNode(q Query) Query { q.FromNode = true; return q }

// answer is what a test asserts of an explanation, in short.
type answer struct {
	service    string   // "ns/name via address", "" for not a Service
	policies   []string // "field: value"
	candidates []string // "endpoint p=0.50", "masq" appended when masqueraded
	masq       bool
	verdict    string
}

func short(e *Explanation) answer {
	var a answer
	if e.Service != nil {
		a.service = fmt.Sprintf("%s %s %s", e.Service, e.Service.Via, e.Service.Address)
	}
	for _, p := range e.Policies {
		a.policies = append(a.policies, p.Field+": "+p.Value)
	}
	for _, c := range e.Candidates {
		s := fmt.Sprintf("%s p=%.2f", c.Endpoint, c.Probability)
		if c.Masquerade {
			s += " masq"
		}
		a.candidates = append(a.candidates, s)
	}
	a.masq, a.verdict = e.Masquerade.Masqueraded, e.Outcome.Verdict
	return a
}

func TestExplainTheTutorial(t *testing.T) {
	tests := []struct {
		name string
		view View
		q    Query
		want answer
	}{
		{
			name: "ClusterIP from a pod: any endpoint, the pod's address kept",
			view: nodeView(sourceIPApp(), onNode1, onNode2),
			q:    tcpTo(otherPod, vip, 80),
			want: answer{
				service:    "default/source-ip-app cluster IP 10.0.170.92:80",
				policies:   []string{"spec.internalTrafficPolicy: Cluster"},
				candidates: []string{"10.244.1.5:8080 p=0.50", "10.244.2.6:8080 p=0.50"},
				verdict:    VerdictDNAT,
			},
		},
		{
			name: "ClusterIP from the node itself: masqueraded (not local traffic)",
			view: nodeView(sourceIPApp(), onNode1, onNode2),
			q:    fromNode(tcpTo(node1IP, vip, 80)),
			want: answer{
				service:    "default/source-ip-app cluster IP 10.0.170.92:80",
				policies:   []string{"spec.internalTrafficPolicy: Cluster"},
				candidates: []string{"10.244.1.5:8080 p=0.50 masq", "10.244.2.6:8080 p=0.50 masq"},
				masq:       true,
				verdict:    VerdictDNAT,
			},
		},
		{
			name: "NodePort, Cluster policy, client outside: masqueraded, any endpoint",
			view: nodeView(sourceIPApp(withNodePort), onNode1, onNode2),
			q:    tcpTo(client, node1IP, nodePort),
			want: answer{
				service:    "default/source-ip-app nodePort 10.240.0.3:30080",
				policies:   []string{"spec.externalTrafficPolicy: Cluster"},
				candidates: []string{"10.244.1.5:8080 p=0.50 masq", "10.244.2.6:8080 p=0.50 masq"},
				masq:       true,
				verdict:    VerdictDNAT,
			},
		},
		{
			name: "NodePort, Local policy, client outside, node with an endpoint: client IP kept",
			view: nodeView(sourceIPApp(withNodePort, localPolicy), onNode1, onNode2),
			q:    tcpTo(client, node1IP, nodePort),
			want: answer{
				service:    "default/source-ip-app nodePort 10.240.0.3:30080",
				policies:   []string{"spec.externalTrafficPolicy: Local"},
				candidates: []string{"10.244.1.5:8080 p=1.00"},
				verdict:    VerdictDNAT,
			},
		},
		{
			name: "NodePort, Local policy, client outside, node without endpoint: dropped",
			view: nodeView(sourceIPApp(withNodePort, localPolicy), onNode2),
			q:    tcpTo(client, node1IP, nodePort),
			want: answer{
				service:  "default/source-ip-app nodePort 10.240.0.3:30080",
				policies: []string{"spec.externalTrafficPolicy: Local", "endpoints: none on this node"},
				verdict:  VerdictDrop,
			},
		},
		{
			name: "NodePort, Local policy, from a pod: every endpoint, source kept",
			view: nodeView(sourceIPApp(withNodePort, localPolicy), onNode2),
			q:    tcpTo(otherPod, node1IP, nodePort),
			want: answer{
				service:    "default/source-ip-app nodePort 10.240.0.3:30080",
				policies:   []string{"spec.externalTrafficPolicy: Local"},
				candidates: []string{"10.244.2.6:8080 p=1.00"},
				verdict:    VerdictDNAT,
			},
		},
		{
			name: "LoadBalancer, Local policy, client outside, node with an endpoint: client IP kept",
			view: nodeView(sourceIPApp(withLoadBalancer, localPolicy), onNode1, onNode2),
			q:    tcpTo(client, lbIP, 80),
			want: answer{
				service:    "default/source-ip-app loadbalancer IP 203.0.113.140:80",
				policies:   []string{"spec.externalTrafficPolicy: Local"},
				candidates: []string{"10.244.1.5:8080 p=1.00"},
				verdict:    VerdictDNAT,
			},
		},
		{
			name: "LoadBalancer, Local policy, client outside, node without endpoint: dropped",
			view: nodeView(sourceIPApp(withLoadBalancer, localPolicy), onNode2),
			q:    tcpTo(client, lbIP, 80),
			want: answer{
				service:  "default/source-ip-app loadbalancer IP 203.0.113.140:80",
				policies: []string{"spec.externalTrafficPolicy: Local", "endpoints: none on this node"},
				verdict:  VerdictDrop,
			},
		},
		{
			name: "LoadBalancer, loadBalancerSourceRanges admit the client",
			view: nodeView(sourceIPApp(withLoadBalancer, sourceRanges("198.51.100.0/24")), onNode1, onNode2),
			q:    tcpTo(client, lbIP, 80),
			want: answer{
				service:    "default/source-ip-app loadbalancer IP 203.0.113.140:80",
				policies:   []string{"spec.loadBalancerSourceRanges: 198.51.100.0/24", "spec.externalTrafficPolicy: Cluster"},
				candidates: []string{"10.244.1.5:8080 p=0.50 masq", "10.244.2.6:8080 p=0.50 masq"},
				masq:       true,
				verdict:    VerdictDNAT,
			},
		},
		{
			name: "LoadBalancer, loadBalancerSourceRanges do not admit the client: dropped",
			view: nodeView(sourceIPApp(withLoadBalancer, sourceRanges("192.0.2.0/24")), onNode1, onNode2),
			q:    tcpTo(client, lbIP, 80),
			want: answer{
				service:  "default/source-ip-app loadbalancer IP 203.0.113.140:80",
				policies: []string{"spec.loadBalancerSourceRanges: 192.0.2.0/24"},
				verdict:  VerdictDrop,
			},
		},
		{
			name: "session affinity: a new client may go to either endpoint",
			view: nodeView(sourceIPApp(affinity), onNode1, onNode2),
			q:    tcpTo(otherPod, vip, 80),
			want: answer{
				service:    "default/source-ip-app cluster IP 10.0.170.92:80",
				policies:   []string{"spec.internalTrafficPolicy: Cluster", "spec.sessionAffinity: ClientIP (10800 s)"},
				candidates: []string{"10.244.1.5:8080 p=0.50", "10.244.2.6:8080 p=0.50"},
				verdict:    VerdictDNAT,
			},
		},
		{
			name: "no endpoints: rejected",
			view: nodeView(sourceIPApp()),
			q:    tcpTo(otherPod, vip, 80),
			want: answer{
				service:  "default/source-ip-app cluster IP 10.0.170.92:80",
				policies: []string{"spec.internalTrafficPolicy: Cluster", "endpoints: none usable"},
				verdict:  VerdictReject,
			},
		},
		{
			name: "internalTrafficPolicy Local, node without endpoint: dropped",
			view: nodeView(sourceIPApp(internalLocal), onNode2),
			q:    tcpTo(otherPod, vip, 80),
			want: answer{
				service:  "default/source-ip-app cluster IP 10.0.170.92:80",
				policies: []string{"spec.internalTrafficPolicy: Local", "endpoints: none on this node"},
				verdict:  VerdictDrop,
			},
		},
		{
			name: "only terminating endpoints: they serve as a fallback",
			view: nodeView(sourceIPApp(), terminating(onNode2)),
			q:    tcpTo(otherPod, vip, 80),
			want: answer{
				service:    "default/source-ip-app cluster IP 10.0.170.92:80",
				policies:   []string{"spec.internalTrafficPolicy: Cluster", "conditions.terminating: fallback"},
				candidates: []string{"10.244.2.6:8080 p=1.00"},
				verdict:    VerdictDNAT,
			},
		},
		{
			name: "zone hints: only the endpoint for this node's zone",
			view: nodeView(sourceIPApp(), hinted("zone-node1", onNode1), hinted("zone-node2", onNode2)),
			q:    tcpTo(otherPod, vip, 80),
			want: answer{
				service:    "default/source-ip-app cluster IP 10.0.170.92:80",
				policies:   []string{"spec.internalTrafficPolicy: Cluster", "hints.forZones (topology-aware routing, trafficDistribution: PreferSameZone): this node's zone"},
				candidates: []string{"10.244.1.5:8080 p=1.00"},
				verdict:    VerdictDNAT,
			},
		},
		{
			name: "hairpin: the pod reaching itself is masqueraded, on the way to itself only",
			view: nodeView(sourceIPApp(), onNode1, onNode2),
			q:    tcpTo(node1Pod, vip, 80),
			want: answer{
				service:    "default/source-ip-app cluster IP 10.0.170.92:80",
				policies:   []string{"spec.internalTrafficPolicy: Cluster"},
				candidates: []string{"10.244.1.5:8080 p=0.50 masq", "10.244.2.6:8080 p=0.50"},
				verdict:    VerdictDNAT,
			},
		},
		{
			name: "not a Service: accepted unchanged",
			view: nodeView(sourceIPApp(), onNode1, onNode2),
			q:    tcpTo(client, netip.MustParseAddr("10.0.0.99"), 80),
			want: answer{verdict: VerdictAccept},
		},
		{
			name: "the Service's address on another port is not the Service",
			view: nodeView(sourceIPApp(), onNode1, onNode2),
			q:    tcpTo(otherPod, vip, 81),
			want: answer{verdict: VerdictAccept},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, err := Explain(tc.view, kernelOf(t, tc.view), tc.q)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, short(e), cmp.AllowUnexported(answer{})); diff != "" {
				t.Errorf("explanation (-want +got):\n%s\n%s", diff, e.Text())
			}
			if len(e.Warnings) > 0 || len(e.Drift) > 0 {
				t.Errorf("the kernel holds miniproxy's rules, yet: %v\n%s", e.Warnings, e.Text())
			}
		})
	}
}

func TestExplainSaysWhyItMasquerades(t *testing.T) {
	local := nodeView(sourceIPApp(withNodePort, localPolicy), onNode1, onNode2)
	for _, tc := range []struct {
		name string
		view View
		q    Query
		want string
	}{
		{"ClusterIP, client outside the cluster CIDR", nodeView(sourceIPApp(), onNode1), tcpTo(client, vip, 80), "not local traffic, source in 10.244.0.0/16 (--detect-local-mode ClusterCIDR)"},
		{"ClusterIP, from a pod", nodeView(sourceIPApp(), onNode1), tcpTo(otherPod, vip, 80), "is local traffic"},
		{"NodePort, Cluster policy", nodeView(sourceIPApp(withNodePort), onNode1), tcpTo(client, node1IP, nodePort), "externalTrafficPolicy: Cluster"},
		{"NodePort, Local policy, client outside", local, tcpTo(client, node1IP, nodePort), "keeps the client's IP"},
		{"NodePort, Local policy, the node itself", local, fromNode(tcpTo(node1IP, node1IP, nodePort)), "the node's own traffic"},
		{"hairpin", nodeView(sourceIPApp(), onNode1), tcpTo(node1Pod, vip, 80), "hairpin"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := Explain(tc.view, kernelOf(t, tc.view), tc.q)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(e.Masquerade.Reason, tc.want) {
				t.Errorf("masquerade reason %q does not say %q", e.Masquerade.Reason, tc.want)
			}
		})
	}
}

func TestMasqueradeAllIsNamed(t *testing.T) {
	v := nodeView(sourceIPApp(), onNode1)
	cfg := v.Configs[iptables.IPv4]
	cfg.MasqueradeAll = true
	v.Configs[iptables.IPv4] = cfg
	e, err := Explain(v, kernelOf(t, v), tcpTo(otherPod, vip, 80))
	if err != nil {
		t.Fatal(err)
	}
	if !e.Masquerade.Masqueraded || !strings.Contains(e.Masquerade.Reason, "--masquerade-all") {
		t.Errorf("masquerade %+v, want masqueraded because of --masquerade-all", e.Masquerade)
	}
}

func TestTheOutcomeQuotesTheKernelsRule(t *testing.T) {
	v := nodeView(sourceIPApp(withLoadBalancer, localPolicy), onNode2)
	e, err := Explain(v, kernelOf(t, v), tcpTo(client, lbIP, 80))
	if err != nil {
		t.Fatal(err)
	}
	if len(e.Outcome.Rules) != 1 || !strings.Contains(e.Outcome.Rules[0], `"default/source-ip-app loadbalancer IP has no local endpoints"`) || !strings.HasSuffix(e.Outcome.Rules[0], "-j DROP") {
		t.Errorf("rules %q, want the filter rule that drops for want of a local endpoint", e.Outcome.Rules)
	}
	text := e.Text()
	for _, want := range []string{"Service:    default/source-ip-app (TCP), by its loadbalancer IP 203.0.113.140:80", "Outcome:    DROP: dropped", "by filter MP-VIPF-8C #"} {
		if !strings.Contains(text, want) {
			t.Errorf("text does not say %q:\n%s", want, text)
		}
	}
}

// A datagram the node itself sends and its rules drop never leaves: the
// kernel fails the send at once, where a client elsewhere (or the node's
// TCP connection) waits for an answer that never comes.
func TestTheNodesOwnDroppedDatagramFailsAtOnce(t *testing.T) {
	udp := func(s *endpoints.ServicePort) { s.Protocol = endpoints.UDP }
	v := nodeView(sourceIPApp(udp, internalLocal), onNode2)
	for _, tc := range []struct {
		name string
		q    Query
		want string
	}{
		{"UDP from the node", fromNode(Query{Src: node1IP, Dst: netip.AddrPortFrom(vip, 80), Protocol: endpoints.UDP}), "the sending program's send fails at once (EPERM)"},
		{"UDP from a pod", Query{Src: otherPod, Dst: netip.AddrPortFrom(vip, 80), Protocol: endpoints.UDP}, "the client gets no answer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := Explain(v, kernelOf(t, v), tc.q)
			if err != nil {
				t.Fatal(err)
			}
			if e.Outcome.Verdict != VerdictDrop || !strings.Contains(e.Outcome.Summary, tc.want) {
				t.Errorf("outcome %+v, want DROP saying %q", e.Outcome, tc.want)
			}
		})
	}
}

func TestJSONCarriesTheSameAnswer(t *testing.T) {
	v := nodeView(sourceIPApp(withLoadBalancer, localPolicy), onNode1, onNode2)
	e, err := Explain(v, kernelOf(t, v), tcpTo(client, lbIP, 80))
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	var back Explanation
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(e, &back); diff != "" {
		t.Errorf("JSON round trip (-want +got):\n%s", diff)
	}
	for _, key := range []string{`"service":{"namespace":"default","name":"source-ip-app"`, `"candidates":[{"endpoint":"10.244.1.5:8080","probability":1`, `"masquerade":{"masqueraded":false`, `"outcome":{"verdict":"DNAT"`} {
		if !strings.Contains(string(b), key) {
			t.Errorf("JSON lacks %s:\n%s", key, b)
		}
	}
}

func TestServicesGiveTheViewBack(t *testing.T) {
	v := nodeView(sourceIPApp(withLoadBalancer, localPolicy, affinity), onNode1, terminating(onNode2))
	b, err := json.Marshal(NewServices(v))
	if err != nil {
		t.Fatal(err)
	}
	var s Services
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	back := s.View()
	if diff := cmp.Diff(v, back, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Errorf("view after JSON (-want +got):\n%s\n%s", diff, b)
	}
}

func TestParseQuery(t *testing.T) {
	addr, port, proto, err := ParseDestination("[fd00::10]:53/UDP")
	if err != nil {
		t.Fatal(err)
	}
	q, err := ParseQuery("fd00::1", addr, port, proto, true)
	if err != nil {
		t.Fatal(err)
	}
	if want := (Query{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddrPort("[fd00::10]:53"), Protocol: endpoints.UDP, FromNode: true}); q != want {
		t.Errorf("query %+v, want %+v", q, want)
	}
	for _, bad := range [][4]string{
		{"10.0.0.1", "fd00::10", "53", "udp"},
		{"10.0.0.1", "10.0.0.2", "0", "tcp"},
		{"10.0.0.1", "10.0.0.2", "80", "icmp"},
		{"nonsense", "10.0.0.2", "80", "tcp"},
	} {
		if _, err := ParseQuery(bad[0], bad[1], bad[2], bad[3], false); err == nil {
			t.Errorf("ParseQuery%q took it", bad)
		}
	}
	if _, _, _, err := ParseDestination("10.0.0.2"); err == nil {
		t.Error("ParseDestination took an address without a port")
	}
}
