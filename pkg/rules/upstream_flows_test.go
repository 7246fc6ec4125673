package rules

// The cases in this file come from upstream kube-proxy v1.37.2's iptables
// packet-flow tests (pkg/proxy/iptables/proxier_test.go). Each Go test below
// is named after the upstream test function its cases come from. What the
// cluster looks like (Services, EndpointSlices, the node's name and
// addresses, the pod CIDR, masqueradeAll, the local traffic detector,
// nodePortAddresses) and where each packet should end up are upstream's
// facts; the code that sets them up and checks them is ours.
//
// The state is built as the daemon builds it: API objects into an
// endpoints.Tracker, its Snapshot into Build with the Config the daemon would
// compute, the ruleset into an iptables.Tracer. Where miniproxy deliberately differs
// from upstream (docs/decisions.md) the row expects our behaviour and its name
// says which difference applies. Rows that assert upstream's expectation and
// fail are differences nobody decided on.

import (
	"fmt"
	"math"
	"net/netip"
	"sort"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// Upstream's test node and its surroundings.
const (
	upNode          = "test-node"
	upNodeIP        = "192.168.0.2"
	upNodeIPAlt     = "192.168.1.2"
	upNodeExtIP     = "192.168.99.11" // a node address; some Services use it as external IP
	upNodeIP6       = "2001:db8::1"
	upNodeIP6Alt    = "2001:db8:1::2"
	upPod           = "10.0.0.2"
	upPod6          = "fd00:10::2"
	upClient        = "203.0.113.2"   // inside the load balancer source range
	upClientBlocked = "203.0.113.130" // outside it
	upClient6       = "2600:5200::1"
)

// upNodeAddrs lists the node's addresses of one family the way the daemon
// finds them (cmd/miniproxy, localAddresses): IPv4 loopback is listed, IPv6
// loopback is not.
func upNodeAddrs(fam iptables.Family) []netip.Addr {
	list := []string{"127.0.0.1", upNodeIP, upNodeIPAlt, upNodeExtIP}
	if fam == iptables.IPv6 {
		list = []string{upNodeIP6, upNodeIP6Alt}
	}
	var out []netip.Addr
	for _, s := range list {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func upPtr[T any](v T) *T { return &v }

// ---- API objects ----

type upSvcOpt func(*v1.Service)

func upSvc(ns, name, clusterIP string, opts ...upSvcOpt) *v1.Service {
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       v1.ServiceSpec{Type: v1.ServiceTypeClusterIP, ClusterIP: clusterIP},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func upPort(name string, proto v1.Protocol, port, nodePort int32) upSvcOpt {
	return func(s *v1.Service) {
		s.Spec.Ports = append(s.Spec.Ports, v1.ServicePort{Name: name, Protocol: proto, Port: port, NodePort: nodePort})
	}
}

func upTypeNodePort(s *v1.Service) { s.Spec.Type = v1.ServiceTypeNodePort }

func upLoadBalancer(ingress ...string) upSvcOpt {
	return func(s *v1.Service) {
		s.Spec.Type = v1.ServiceTypeLoadBalancer
		for _, ip := range ingress {
			s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, v1.LoadBalancerIngress{IP: ip})
		}
	}
}

func upExternalIPs(ips ...string) upSvcOpt {
	return func(s *v1.Service) { s.Spec.ExternalIPs = ips }
}

func upSourceRanges(r ...string) upSvcOpt {
	return func(s *v1.Service) { s.Spec.LoadBalancerSourceRanges = r }
}

func upHealthCheck(port int32) upSvcOpt {
	return func(s *v1.Service) { s.Spec.HealthCheckNodePort = port }
}

func upExternalLocal(s *v1.Service) {
	s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
}

func upExternalCluster(s *v1.Service) {
	s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyCluster
}

func upInternalPolicy(p v1.ServiceInternalTrafficPolicy) upSvcOpt {
	return func(s *v1.Service) { s.Spec.InternalTrafficPolicy = &p }
}

func upSlicePort(name string, proto v1.Protocol, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: upPtr(name), Protocol: upPtr(proto), Port: upPtr(port)}
}

// upSlice is Service svc's only EndpointSlice; its address type follows the
// first endpoint.
func upSlice(ns, svc string, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	at := discoveryv1.AddressTypeIPv4
	if len(eps) > 0 && strings.Contains(eps[0].Addresses[0], ":") {
		at = discoveryv1.AddressTypeIPv6
	}
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns, Name: svc + "-1",
			Labels: map[string]string{discoveryv1.LabelServiceName: svc},
		},
		AddressType: at,
		Ports:       ports,
		Endpoints:   eps,
	}
}

// upEp is an endpoint without conditions (the API reads them as ready) on
// node ("" leaves nodeName unset).
func upEp(ip, node string) discoveryv1.Endpoint {
	ep := discoveryv1.Endpoint{Addresses: []string{ip}}
	if node != "" {
		ep.NodeName = upPtr(node)
	}
	return ep
}

// upEpWith is an endpoint with explicit conditions.
func upEpWith(ip, node string, ready, serving, terminating bool) discoveryv1.Endpoint {
	ep := upEp(ip, node)
	ep.Conditions = discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &terminating}
	return ep
}

func upReadyEp(ip, node string) discoveryv1.Endpoint { return upEpWith(ip, node, true, true, false) }
func upServingTerminatingEp(ip, node string) discoveryv1.Endpoint {
	return upEpWith(ip, node, false, true, true)
}
func upGoneEp(ip, node string) discoveryv1.Endpoint { return upEpWith(ip, node, false, false, true) }

// ---- the node ----

// upSetup is one upstream proxier: the cluster state it was fed and its
// flags.
type upSetup struct {
	ipv6     bool
	services []*v1.Service
	slices   []*discoveryv1.EndpointSlice
	// masqueradeAll is --masquerade-all.
	masqueradeAll bool
	// noLocalDetector is upstream's no-op local traffic detector; for us,
	// no cluster CIDR.
	noLocalDetector bool
	// noLocalhostNodePorts is --iptables-localhost-nodeports=false
	// (upstream's fake proxier has them on).
	noLocalhostNodePorts bool
	// nodePortAddresses is --nodeport-addresses (nil: not set).
	nodePortAddresses []string
}

func (s upSetup) family() iptables.Family {
	if s.ipv6 {
		return iptables.IPv6
	}
	return iptables.IPv4
}

// config is the Config the daemon computes for this node (pkg/proxy,
// rulesConfig): the node's addresses as NodeIPs, and as NodePort addresses
// those NodePortAddresses picks for --nodeport-addresses.
func (s upSetup) config() Config {
	fam := s.family()
	local := upNodeAddrs(fam)
	cfg := Config{Family: fam, MasqueradeAll: s.masqueradeAll, NodeIPs: local}
	if !s.noLocalDetector {
		cfg.DetectLocal = clusterCIDR("10.0.0.0/8", "fd00:10::/64")
	}
	var ranges []netip.Prefix
	if s.nodePortAddresses != nil {
		ranges = []netip.Prefix{}
		for _, r := range s.nodePortAddresses {
			ranges = append(ranges, netip.MustParsePrefix(r))
		}
	}
	cfg.LocalhostNodePorts = LocalhostNodePorts(!s.noLocalhostNodePorts, fam, ranges)
	if ranges != nil {
		cfg.NodePortAddresses = NodePortAddresses(local, ranges, cfg.LocalhostNodePorts)
	}
	return cfg
}

// upStage is a moment in a test: a change to the cluster (nil for none),
// then packets sent against the rules built after it.
type upStage struct {
	name   string
	change func(*endpoints.Tracker)
	flows  []upFlow
}

func upRun(t *testing.T, s upSetup, stages ...upStage) {
	t.Helper()
	tracker := endpoints.NewTracker(upNode, nil, nil)
	for _, svc := range s.services {
		tracker.OnServiceAdd(svc)
	}
	for _, sl := range s.slices {
		tracker.OnEndpointSliceAdd(sl)
	}
	for _, st := range stages {
		if st.change != nil {
			st.change(tracker)
		}
		tr, err := iptables.NewTracer(Build(tracker.Snapshot(), s.config()), upNodeAddrs(s.family()))
		if err != nil {
			t.Fatalf("load rules: %v", err)
		}
		for _, f := range st.flows {
			name := f.name
			if st.name != "" {
				name = st.name + ": " + name
			}
			t.Run(name, func(t *testing.T) { upCheck(t, tr, f) })
		}
	}
}

// ---- packets and what becomes of them ----

type upFlow struct {
	name     string
	src, dst string
	port     int
	proto    string // "" is tcp
	// fromNode: the node itself sends it (nat OUTPUT) rather than it
	// arriving from a network.
	fromNode bool
	// nodeFirewall ends filter INPUT with a DROP, as on a node whose own
	// firewall drops what nobody accepted. Our tracer reports a packet that
	// matched no rule as ACCEPT (the built-in policy); behind this firewall
	// only an explicit ACCEPT gets through, which is what upstream's
	// "ACCEPT" outcome means.
	nodeFirewall bool
	want         upResult
}

// upResult is upstream's expectation: a verdict, and for an accepted packet
// the endpoints it is spread over (nil: not translated) and whether it is
// masqueraded.
type upResult struct {
	verdict string
	to      []string
	masq    bool
}

func (r upResult) String() string {
	switch {
	case r.verdict != "ACCEPT":
		return r.verdict
	case r.to == nil:
		return "ACCEPT, not translated"
	case r.masq:
		return fmt.Sprintf("spread over {%s}, masqueraded", strings.Join(r.to, ", "))
	}
	return fmt.Sprintf("spread over {%s}, source kept", strings.Join(r.to, ", "))
}

func upTo(eps ...string) upResult     { return upResult{verdict: "ACCEPT", to: eps} }
func upMasqTo(eps ...string) upResult { return upResult{verdict: "ACCEPT", to: eps, masq: true} }

var (
	upUntouched = upResult{verdict: "ACCEPT"}
	upDropped   = upResult{verdict: "DROP"}
	upRejected  = upResult{verdict: "REJECT"}
)

func upCheck(t *testing.T, tr *iptables.Tracer, f upFlow) {
	t.Helper()
	proto := f.proto
	if proto == "" {
		proto = "tcp"
	}
	pkt := iptables.Packet{
		Src: netip.MustParseAddr(f.src), Dst: netip.MustParseAddr(f.dst),
		Proto: proto, DPort: f.port, FromNode: f.fromNode,
	}
	if f.nodeFirewall {
		st := tr.State.Clone()
		st["filter"]["INPUT"].Rules = append(st["filter"]["INPUT"].Rules, iptables.Rule{"-j", "DROP"})
		tr = &iptables.Tracer{State: st, LocalAddrs: tr.LocalAddrs}
	}
	outs, err := tr.Trace(pkt)
	if err != nil {
		t.Fatalf("trace: %v", err)
	}
	if why := upMismatch(pkt, outs, f.want); why != "" {
		t.Errorf("%s %s -> %s: %s\n  upstream: %s\n  miniproxy: %v",
			proto, f.src, netip.AddrPortFrom(pkt.Dst, uint16(pkt.DPort)), why, f.want, outs)
	}
}

// upMismatch compares our outcomes with upstream's expectation: the verdict,
// the set of destinations, the masquerade flag, and an even spread.
func upMismatch(pkt iptables.Packet, outs []iptables.Outcome, want upResult) string {
	total := 0.0
	for _, o := range outs {
		total += o.Probability
	}
	if len(outs) == 0 || math.Abs(total-1) > 1e-6 {
		return fmt.Sprintf("outcomes add up to p=%.3f", total)
	}
	switch {
	case want.verdict != "ACCEPT":
		for _, o := range outs {
			if o.Verdict != want.verdict {
				return "wrong verdict"
			}
		}
	case want.to == nil:
		o := outs[0]
		orig := netip.AddrPortFrom(pkt.Dst, uint16(pkt.DPort))
		if len(outs) != 1 || o.Verdict != "ACCEPT" || o.DNAT || o.Dst != orig || o.Masquerade {
			return "should pass untouched"
		}
	default:
		share := map[string]float64{}
		for _, o := range outs {
			if o.Verdict != "ACCEPT" || !o.DNAT {
				return "should be translated to an endpoint"
			}
			if o.Masquerade != want.masq {
				return "wrong masquerade"
			}
			share[o.Dst.String()] += o.Probability
		}
		var got []string
		for d := range share {
			got = append(got, d)
		}
		wantSet := append([]string(nil), want.to...)
		sort.Strings(got)
		sort.Strings(wantSet)
		if strings.Join(got, ",") != strings.Join(wantSet, ",") {
			return "wrong endpoints"
		}
		for d, p := range share {
			if math.Abs(p-1/float64(len(wantSet))) > 1e-6 {
				return fmt.Sprintf("uneven spread: %s gets p=%.3f", d, p)
			}
		}
	}
	return ""
}

// ---- the cases ----

// upstream TestTracePacket checks upstream's tracer against hand-written
// rules; here the cluster those rules describe is built from API objects.
func TestUpstreamTracePacketFlows(t *testing.T) {
	p80 := []discoveryv1.EndpointPort{upSlicePort("p80", v1.ProtocolTCP, 80)}
	s := upSetup{
		services: []*v1.Service{
			upSvc("ns1", "svc1", "172.30.0.41", upPort("p80", v1.ProtocolTCP, 80, 0)),
			upSvc("ns2", "svc2", "172.30.0.42", upPort("p80", v1.ProtocolTCP, 80, 3001),
				upExternalIPs("192.168.99.22"), upLoadBalancer("1.2.3.4"), upExternalLocal, upHealthCheck(30000)),
			upSvc("ns3", "svc3", "172.30.0.43", upPort("p80", v1.ProtocolTCP, 80, 3003), upTypeNodePort),
			upSvc("ns4", "svc4", "172.30.0.44", upPort("p80", v1.ProtocolTCP, 80, 0), upExternalIPs("192.168.99.33")),
			upSvc("ns5", "svc5", "172.30.0.45", upPort("p80", v1.ProtocolTCP, 80, 3002),
				upLoadBalancer("5.6.7.8"), upSourceRanges("203.0.113.0/25")),
			upSvc("ns6", "svc6", "172.30.0.46", upPort("p80", v1.ProtocolTCP, 80, 0)),
		},
		slices: []*discoveryv1.EndpointSlice{
			upSlice("ns1", "svc1", p80, upEp("10.180.0.1", "")),
			upSlice("ns2", "svc2", p80, upEp("10.180.0.2", "other-node")),
			upSlice("ns3", "svc3", p80, upEp("10.180.0.3", "")),
			upSlice("ns4", "svc4", p80, upEp("10.180.0.4", ""), upEp("10.180.0.5", "")),
			upSlice("ns5", "svc5", p80, upEp("10.180.0.3", "")),
		},
	}
	upRun(t, s, upStage{flows: []upFlow{
		{name: "pod to an address no Service uses: untouched",
			src: "10.0.0.2", dst: "10.0.0.3", port: 80, want: upUntouched},
		{name: "pod to a ClusterIP with one endpoint: sent to it",
			src: "10.0.0.2", dst: "172.30.0.41", port: 80, want: upTo("10.180.0.1:80")},
		{name: "pod to a ClusterIP with two endpoints: spread over both",
			src: "10.0.0.2", dst: "172.30.0.44", port: 80, want: upTo("10.180.0.4:80", "10.180.0.5:80")},
		{name: "node to the external IP of a Local-policy Service without local endpoint: sent to the remote one, masqueraded",
			src: upNodeIP, dst: "192.168.99.22", port: 80, fromNode: true, want: upMasqTo("10.180.0.2:80")},
		{name: "external client to the external IP of a Local-policy Service without local endpoint: dropped",
			src: upClient, dst: "192.168.99.22", port: 80, want: upDropped},
		// Traced as arriving: the node's packet to its own address meets
		// filter INPUT on delivery, which our tracer walks for arriving
		// packets only.
		{name: "node to its healthCheckNodePort, behind a firewall dropping the rest: accepted",
			src: upNodeIP, dst: upNodeIP, port: 30000, nodeFirewall: true, want: upResult{verdict: "ACCEPT"}},
		{name: "pod to the ClusterIP of a Service without endpoints: rejected",
			src: "10.0.0.2", dst: "172.30.0.46", port: 80, want: upRejected},
	}})
}

// upstream TestNoEndpointsReject. Upstream rejects with ICMP port
// unreachable; miniproxy rejects TCP with a reset (decisions.md). Both are
// the REJECT verdict.
func TestUpstreamNoEndpointsRejectFlows(t *testing.T) {
	s := upSetup{services: []*v1.Service{
		upSvc("ns1", "svc1", "172.30.0.41", upPort("p80", v1.ProtocolTCP, 80, 3001),
			upExternalIPs(upNodeExtIP), upLoadBalancer("1.2.3.4")),
	}}
	upRun(t, s, upStage{flows: []upFlow{
		{name: "pod to ClusterIP, no endpoints: rejected",
			src: upPod, dst: "172.30.0.41", port: 80, want: upRejected},
		{name: "external client to external IP, no endpoints: rejected",
			src: upClient, dst: upNodeExtIP, port: 80, want: upRejected},
		{name: "pod to NodePort, no endpoints: rejected",
			src: upPod, dst: upNodeIP, port: 3001, want: upRejected},
		{name: "external client to NodePort, no endpoints: rejected",
			src: upClient, dst: upNodeIP, port: 3001, want: upRejected},
		{name: "pod to LoadBalancer IP, no endpoints: rejected",
			src: upPod, dst: "1.2.3.4", port: 80, want: upRejected},
		{name: "external client to LoadBalancer IP, no endpoints: rejected",
			src: upClient, dst: "1.2.3.4", port: 80, want: upRejected},
	}})
}

// upstream TestClusterIPGeneral.
func TestUpstreamClusterIPGeneralFlows(t *testing.T) {
	s := upSetup{
		services: []*v1.Service{
			upSvc("ns1", "svc1", "172.30.0.41", upPort("http", v1.ProtocolTCP, 80, 0)),
			upSvc("ns2", "svc2", "172.30.0.42",
				upPort("http", v1.ProtocolTCP, 80, 0),
				upPort("https", v1.ProtocolTCP, 443, 0),
				upPort("dns-udp", v1.ProtocolUDP, 53, 0),
				upPort("dns-tcp", v1.ProtocolTCP, 53, 0),
				upPort("dns-sctp", v1.ProtocolSCTP, 53, 0)),
		},
		slices: []*discoveryv1.EndpointSlice{
			upSlice("ns1", "svc1", []discoveryv1.EndpointPort{upSlicePort("http", v1.ProtocolTCP, 80)},
				upEp("10.180.0.1", upNode)),
			upSlice("ns2", "svc2", []discoveryv1.EndpointPort{
				upSlicePort("http", v1.ProtocolTCP, 80),
				upSlicePort("https", v1.ProtocolTCP, 8443),
				upSlicePort("dns-udp", v1.ProtocolUDP, 53),
				upSlicePort("dns-tcp", v1.ProtocolTCP, 5353),
				upSlicePort("dns-sctp", v1.ProtocolSCTP, 53),
			}, upEp("10.180.0.1", upNode), upEp("10.180.2.1", "node2")),
		},
	}
	upRun(t, s, upStage{flows: []upFlow{
		{name: "pod to a ClusterIP with one endpoint: sent to it, source kept",
			src: "10.180.0.2", dst: "172.30.0.41", port: 80, want: upTo("10.180.0.1:80")},
		{name: "the endpoint itself to its ClusterIP (hairpin): sent to itself, masqueraded",
			src: "10.180.0.1", dst: "172.30.0.41", port: 80, want: upMasqTo("10.180.0.1:80")},
		{name: "pod to a ClusterIP with two endpoints: spread over both",
			src: "10.180.0.2", dst: "172.30.0.42", port: 80, want: upTo("10.180.0.1:80", "10.180.2.1:80")},
		{name: "pod to a port with another target port: sent to the target port",
			src: "10.180.0.2", dst: "172.30.0.42", port: 443, want: upTo("10.180.0.1:8443", "10.180.2.1:8443")},
		{name: "TCP to a port number that TCP, UDP and SCTP share: the TCP port's endpoints",
			src: "10.180.0.2", dst: "172.30.0.42", port: 53, proto: "tcp", want: upTo("10.180.0.1:5353", "10.180.2.1:5353")},
		{name: "UDP to a port number that TCP, UDP and SCTP share: the UDP port's endpoints",
			src: "10.180.0.2", dst: "172.30.0.42", port: 53, proto: "udp", want: upTo("10.180.0.1:53", "10.180.2.1:53")},
		{name: "SCTP to a port number that TCP, UDP and SCTP share: the SCTP port's endpoints",
			src: "10.180.0.2", dst: "172.30.0.42", port: 53, proto: "sctp", want: upTo("10.180.0.1:53", "10.180.2.1:53")},
		{name: "UDP to a TCP-only port: untouched",
			src: "10.180.0.2", dst: "172.30.0.42", port: 80, proto: "udp", want: upUntouched},
		{name: "pod to another Service's port on this ClusterIP: untouched",
			src: "10.180.0.2", dst: "172.30.0.41", port: 443, want: upUntouched},
	}})
}

// upstream TestLoadBalancer.
func TestUpstreamLoadBalancerFlows(t *testing.T) {
	s := upSetup{
		services: []*v1.Service{
			upSvc("ns1", "svc1", "172.30.0.41", upPort("p80", v1.ProtocolTCP, 80, 3001),
				upLoadBalancer("1.2.3.4", "5.6.7.8"),
				// The stray space is upstream's too: it must be ignored.
				upSourceRanges("192.168.0.0/24", " 203.0.113.0/25")),
		},
		slices: []*discoveryv1.EndpointSlice{
			upSlice("ns1", "svc1", []discoveryv1.EndpointPort{upSlicePort("p80", v1.ProtocolTCP, 80)},
				upEp("10.180.0.1", "")),
		},
	}
	ep := upMasqTo("10.180.0.1:80")
	upRun(t, s, upStage{flows: []upFlow{
		{name: "pod to ClusterIP: sent to the endpoint, source kept",
			src: upPod, dst: "172.30.0.41", port: 80, want: upTo("10.180.0.1:80")},
		{name: "external client to NodePort: sent to the endpoint, masqueraded",
			src: upClient, dst: upNodeIP, port: 3001, want: ep},
		{name: "client outside the source ranges to NodePort: admitted (ranges guard only the LB IPs), masqueraded",
			src: upClientBlocked, dst: upNodeIP, port: 3001, want: ep},
		{name: "client inside the source ranges to the first LB IP: masqueraded to the endpoint",
			src: upClient, dst: "1.2.3.4", port: 80, want: ep},
		{name: "client inside the source ranges to the second LB IP: masqueraded to the endpoint",
			src: upClient, dst: "5.6.7.8", port: 80, want: ep},
		{name: "client outside the source ranges to the first LB IP: dropped",
			src: upClientBlocked, dst: "1.2.3.4", port: 80, want: upDropped},
		{name: "client outside the source ranges to the second LB IP: dropped",
			src: upClientBlocked, dst: "5.6.7.8", port: 80, want: upDropped},
		{name: "pod (outside the source ranges) to the first LB IP: dropped",
			src: upPod, dst: "1.2.3.4", port: 80, want: upDropped},
		{name: "pod (outside the source ranges) to the second LB IP: dropped",
			src: upPod, dst: "5.6.7.8", port: 80, want: upDropped},
		{name: "node (inside the source ranges) to the first LB IP: masqueraded to the endpoint",
			src: upNodeIP, dst: "1.2.3.4", port: 80, fromNode: true, want: ep},
		{name: "node (inside the source ranges) to the second LB IP: masqueraded to the endpoint",
			src: upNodeIP, dst: "5.6.7.8", port: 80, fromNode: true, want: ep},
		{name: "the first LB IP to itself (the node's traffic SNATed to it on the way): admitted because the node is",
			src: "1.2.3.4", dst: "1.2.3.4", port: 80, want: ep},
		{name: "the second LB IP to itself (the node's traffic SNATed to it on the way): admitted because the node is",
			src: "5.6.7.8", dst: "5.6.7.8", port: 80, want: ep},
	}})
}

// upstream TestNodePorts, one NodePort Service under each combination of
// family, --iptables-localhost-nodeports and --nodeport-addresses upstream
// tries.
func TestUpstreamNodePortsFlows(t *testing.T) {
	configs := []struct {
		name               string
		ipv6               bool
		localhostNodePorts bool
		nodePortAddresses  []string
		altIPServes        bool
	}{
		{name: "IPv4, localhost NodePorts on", localhostNodePorts: true, altIPServes: true},
		{name: "IPv4, localhost NodePorts off", altIPServes: true},
		{name: "IPv4, localhost NodePorts off, 127.0.0.1/32 among the nodeport-addresses",
			nodePortAddresses: []string{"192.168.0.0/24", "127.0.0.1/32"}},
		{name: "IPv4, localhost NodePorts off, several nodeport-addresses",
			nodePortAddresses: []string{"192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"}, altIPServes: true},
		{name: "IPv6, localhost NodePorts on", ipv6: true, localhostNodePorts: true, altIPServes: true},
		{name: "IPv6, localhost NodePorts off", ipv6: true, altIPServes: true},
		{name: "IPv6, localhost NodePorts off, several nodeport-addresses", ipv6: true,
			nodePortAddresses: []string{"192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"}},
	}
	for _, c := range configs {
		t.Run(c.name, func(t *testing.T) {
			svcIP, ep1, ep2 := "172.30.0.41", "10.180.0.1", "10.180.2.1"
			pod, client, nodeIP, altIP, lo := upPod, upClient, upNodeIP, upNodeIPAlt, "127.0.0.1"
			if c.ipv6 {
				svcIP, ep1, ep2 = "fd00:172:30::41", "fd00:10:180::1", "fd00:10:180::2:1"
				pod, client, nodeIP, altIP, lo = upPod6, upClient6, upNodeIP6, upNodeIP6Alt, "::1"
			}
			both := []string{
				netip.AddrPortFrom(netip.MustParseAddr(ep1), 80).String(),
				netip.AddrPortFrom(netip.MustParseAddr(ep2), 80).String(),
			}
			s := upSetup{
				ipv6:                 c.ipv6,
				nodePortAddresses:    c.nodePortAddresses,
				noLocalhostNodePorts: !c.localhostNodePorts,
				services: []*v1.Service{
					upSvc("ns1", "svc1", svcIP, upPort("p80", v1.ProtocolTCP, 80, 3001), upTypeNodePort),
				},
				slices: []*discoveryv1.EndpointSlice{
					upSlice("ns1", "svc1", []discoveryv1.EndpointPort{upSlicePort("p80", v1.ProtocolTCP, 80)},
						upEp(ep1, ""), upEp(ep2, upNode)),
				},
			}
			flows := []upFlow{
				{name: "pod to ClusterIP: spread over both endpoints, source kept",
					src: pod, dst: svcIP, port: 80, want: upTo(both...)},
				{name: "external client to NodePort: spread over both, masqueraded",
					src: client, dst: nodeIP, port: 3001, want: upMasqTo(both...)},
				{name: "node to NodePort: spread over both, masqueraded",
					src: nodeIP, dst: nodeIP, port: 3001, fromNode: true, want: upMasqTo(both...)},
			}
			if !c.ipv6 && c.localhostNodePorts {
				flows = append(flows, upFlow{
					name: "localhost to NodePort: spread over both, masqueraded",
					src:  lo, dst: lo, port: 3001, fromNode: true, want: upMasqTo(both...)})
			} else {
				flows = append(flows, upFlow{
					name: "localhost to NodePort: untouched",
					src:  lo, dst: lo, port: 3001, fromNode: true, want: upUntouched})
			}
			if c.altIPServes {
				flows = append(flows, upFlow{
					name: "external client to NodePort on the node's second address: spread over both, masqueraded",
					src:  client, dst: altIP, port: 3001, want: upMasqTo(both...)})
			} else {
				flows = append(flows, upFlow{
					name: "external client to NodePort on an address outside nodeport-addresses: untouched",
					src:  client, dst: altIP, port: 3001, want: upUntouched})
			}
			upRun(t, s, upStage{flows: flows})
		})
	}
}

// upstream TestHealthCheckNodePort. Its "accepted" is an explicit ACCEPT in
// filter, which only shows behind a node firewall (see upFlow.nodeFirewall);
// once the Service is gone the packet meets that firewall.
func TestUpstreamHealthCheckNodePortFlows(t *testing.T) {
	svc := upSvc("ns1", "svc1", "172.30.0.42", upPort("p80", v1.ProtocolTCP, 80, 3001),
		upLoadBalancer(), upExternalLocal, upHealthCheck(30000))
	s := upSetup{services: []*v1.Service{svc}, nodePortAddresses: []string{"127.0.0.0/8"}}
	upRun(t, s,
		upStage{flows: []upFlow{
			{name: "outside client to the healthCheckNodePort, behind a firewall dropping the rest: accepted",
				src: "1.2.3.4", dst: upNodeIP, port: 30000, nodeFirewall: true, want: upResult{verdict: "ACCEPT"}},
		}},
		upStage{
			name:   "Service deleted",
			change: func(tr *endpoints.Tracker) { tr.OnServiceDelete(svc) },
			flows: []upFlow{
				{name: "outside client to the old healthCheckNodePort: no rule of ours, the node's firewall drops it",
					src: "1.2.3.4", dst: upNodeIP, port: 30000, nodeFirewall: true, want: upDropped},
			},
		})
}

// upExternalPolicySetup is the Service of upstream's TestExternalTrafficPolicy*:
// a LoadBalancer with an external IP (one of the node's addresses), one
// endpoint without a node and one on this node.
func upExternalPolicySetup(policy upSvcOpt) upSetup {
	return upSetup{
		services: []*v1.Service{
			upSvc("ns1", "svc1", "172.30.0.41", upPort("p80", v1.ProtocolTCP, 80, 3001),
				upLoadBalancer("1.2.3.4"), upExternalIPs(upNodeExtIP), policy, upHealthCheck(30000)),
		},
		slices: []*discoveryv1.EndpointSlice{
			upSlice("ns1", "svc1", []discoveryv1.EndpointPort{upSlicePort("p80", v1.ProtocolTCP, 80)},
				upEp("10.180.0.1", ""), upEp("10.180.2.1", upNode)),
		},
	}
}

// upstream TestExternalTrafficPolicyLocal.
func TestUpstreamExternalTrafficPolicyLocalFlows(t *testing.T) {
	both := upTo("10.180.0.1:80", "10.180.2.1:80")
	local := upTo("10.180.2.1:80")
	upRun(t, upExternalPolicySetup(upExternalLocal), upStage{flows: []upFlow{
		{name: "pod to ClusterIP: both endpoints, source kept",
			src: upPod, dst: "172.30.0.41", port: 80, want: both},
		{name: "pod to external IP: both endpoints, source kept",
			src: upPod, dst: upNodeExtIP, port: 80, want: both},
		{name: "external client to external IP: the local endpoint only, source kept",
			src: upClient, dst: upNodeExtIP, port: 80, want: local},
		{name: "pod to LB IP: both endpoints, source kept",
			src: upPod, dst: "1.2.3.4", port: 80, want: both},
		{name: "external client to LB IP: the local endpoint only, source kept",
			src: upClient, dst: "1.2.3.4", port: 80, want: local},
		{name: "pod to NodePort: both endpoints, source kept",
			src: upPod, dst: upNodeIP, port: 3001, want: both},
		{name: "external client to NodePort: the local endpoint only, source kept",
			src: upClient, dst: upNodeIP, port: 3001, want: local},
	}})
}

// upstream TestExternalTrafficPolicyCluster.
func TestUpstreamExternalTrafficPolicyClusterFlows(t *testing.T) {
	masq := upMasqTo("10.180.0.1:80", "10.180.2.1:80")
	upRun(t, upExternalPolicySetup(upExternalCluster), upStage{flows: []upFlow{
		{name: "pod to ClusterIP: both endpoints, source kept",
			src: upPod, dst: "172.30.0.41", port: 80, want: upTo("10.180.0.1:80", "10.180.2.1:80")},
		{name: "pod to external IP: both endpoints, masqueraded",
			src: upPod, dst: upNodeExtIP, port: 80, want: masq},
		{name: "external client to external IP: both endpoints, masqueraded",
			src: upClient, dst: upNodeExtIP, port: 80, want: masq},
		{name: "pod to LB IP: both endpoints, masqueraded",
			src: upPod, dst: "1.2.3.4", port: 80, want: masq},
		{name: "external client to LB IP: both endpoints, masqueraded",
			src: upClient, dst: "1.2.3.4", port: 80, want: masq},
		{name: "pod to NodePort: both endpoints, masqueraded",
			src: upPod, dst: upNodeIP, port: 3001, want: masq},
		{name: "external client to NodePort: both endpoints, masqueraded",
			src: upClient, dst: upNodeIP, port: 3001, want: masq},
	}})
}

// upPolicySlice is the single-port slice of upstream's traffic policy and
// terminating-endpoint tests (unnamed port 80).
func upPolicySlice(eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return upSlice("ns1", "svc1", []discoveryv1.EndpointPort{upSlicePort("", v1.ProtocolTCP, 80)}, eps...)
}

// upstream TestInternalTrafficPolicy: a ClusterIP Service, then its slice
// deleted.
func TestUpstreamInternalTrafficPolicyFlows(t *testing.T) {
	cases := []struct {
		name   string
		policy v1.ServiceInternalTrafficPolicy
		eps    []discoveryv1.Endpoint
		flow   upFlow
	}{
		{
			name: "Cluster policy", policy: v1.ServiceInternalTrafficPolicyCluster,
			eps: []discoveryv1.Endpoint{upReadyEp("10.0.1.1", upNode), upReadyEp("10.0.1.2", "node1"), upReadyEp("10.0.1.3", "node2")},
			flow: upFlow{name: "pod to ClusterIP: every endpoint",
				want: upTo("10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80")},
		},
		{
			name: "Local policy, one local endpoint", policy: v1.ServiceInternalTrafficPolicyLocal,
			eps: []discoveryv1.Endpoint{upReadyEp("10.0.1.1", upNode), upReadyEp("10.0.1.2", "node1"), upReadyEp("10.0.1.3", "node2")},
			flow: upFlow{name: "pod to ClusterIP: the local endpoint only",
				want: upTo("10.0.1.1:80")},
		},
		{
			name: "Local policy, two local endpoints", policy: v1.ServiceInternalTrafficPolicyLocal,
			eps: []discoveryv1.Endpoint{upReadyEp("10.0.1.1", upNode), upReadyEp("10.0.1.2", upNode), upReadyEp("10.0.1.3", "node2")},
			flow: upFlow{name: "pod to ClusterIP: both local endpoints",
				want: upTo("10.0.1.1:80", "10.0.1.2:80")},
		},
		{
			name: "Local policy, no local endpoint", policy: v1.ServiceInternalTrafficPolicyLocal,
			eps: []discoveryv1.Endpoint{upReadyEp("10.0.1.1", "node0"), upReadyEp("10.0.1.2", "node1"), upReadyEp("10.0.1.3", "node2")},
			flow: upFlow{name: "pod to ClusterIP: dropped",
				want: upDropped},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sl := upPolicySlice(c.eps...)
			s := upSetup{
				services: []*v1.Service{upSvc("ns1", "svc1", "172.30.1.1",
					upPort("", v1.ProtocolTCP, 80, 0), upInternalPolicy(c.policy))},
				slices: []*discoveryv1.EndpointSlice{sl},
			}
			f := c.flow
			f.src, f.dst, f.port = upPod, "172.30.1.1", 80
			upRun(t, s,
				upStage{flows: []upFlow{f}},
				upStage{
					name:   "slice deleted",
					change: func(tr *endpoints.Tracker) { tr.OnEndpointSliceDelete(sl) },
					flows: []upFlow{{name: "pod to ClusterIP: rejected",
						src: upPod, dst: "172.30.1.1", port: 80, want: upRejected}},
				})
		})
	}
}

// upTerminatingCase is one slice of upstream's terminating-endpoint tests
// with where a pod's packet to the ClusterIP and an external client's to the
// LB IP should go.
type upTerminatingCase struct {
	name         string
	eps          []discoveryv1.Endpoint
	pod, outside upResult
}

// upRunTerminating runs the cases against upstream's LoadBalancer Service
// 172.30.1.1 / 1.2.3.4 with the given external policy; after each case's
// slice is deleted, both packets are rejected.
func upRunTerminating(t *testing.T, policy upSvcOpt, cases []upTerminatingCase) {
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sl := upPolicySlice(c.eps...)
			s := upSetup{
				services: []*v1.Service{upSvc("ns1", "svc1", "172.30.1.1",
					upPort("", v1.ProtocolTCP, 80, 0), upLoadBalancer("1.2.3.4"), policy, upHealthCheck(30000))},
				slices: []*discoveryv1.EndpointSlice{sl},
			}
			upRun(t, s,
				upStage{flows: []upFlow{
					{name: "pod to ClusterIP: " + c.pod.String(), src: upPod, dst: "172.30.1.1", port: 80, want: c.pod},
					{name: "external client to LB IP: " + c.outside.String(), src: upClient, dst: "1.2.3.4", port: 80, want: c.outside},
				}},
				upStage{
					name:   "slice deleted",
					change: func(tr *endpoints.Tracker) { tr.OnEndpointSliceDelete(sl) },
					flows: []upFlow{
						{name: "pod to ClusterIP: rejected", src: upPod, dst: "172.30.1.1", port: 80, want: upRejected},
						{name: "external client to LB IP: rejected", src: upClient, dst: "1.2.3.4", port: 80, want: upRejected},
					},
				})
		})
	}
}

// upstream TestTerminatingEndpointsTrafficPolicyLocal.
func TestUpstreamTerminatingEndpointsLocalPolicyFlows(t *testing.T) {
	upRunTerminating(t, upExternalLocal, []upTerminatingCase{
		{
			name: "ready endpoints exist: terminating ones unused, outside traffic stays local",
			eps: []discoveryv1.Endpoint{
				upReadyEp("10.0.1.1", upNode), upReadyEp("10.0.1.2", upNode),
				upServingTerminatingEp("10.0.1.3", upNode), upGoneEp("10.0.1.4", upNode),
				upReadyEp("10.0.1.5", "node-1"),
			},
			pod:     upTo("10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"),
			outside: upTo("10.0.1.1:80", "10.0.1.2:80"),
		},
		{
			name: "only local endpoints terminating: outside traffic goes to the serving ones",
			eps: []discoveryv1.Endpoint{
				upServingTerminatingEp("10.0.1.2", upNode), upServingTerminatingEp("10.0.1.3", upNode),
				upGoneEp("10.0.1.4", upNode), upReadyEp("10.0.1.5", "node-1"),
			},
			pod:     upTo("10.0.1.5:80"),
			outside: upTo("10.0.1.2:80", "10.0.1.3:80"),
		},
		{
			name:    "one serving terminating endpoint on another node: pods use it, outside traffic dropped",
			eps:     []discoveryv1.Endpoint{upServingTerminatingEp("10.0.1.5", "node-1")},
			pod:     upTo("10.0.1.5:80"),
			outside: upDropped,
		},
		{
			name:    "no serving endpoint anywhere: rejected",
			eps:     []discoveryv1.Endpoint{upGoneEp("10.0.1.5", upNode), upGoneEp("10.0.1.5", "node-1")},
			pod:     upRejected,
			outside: upRejected,
		},
	})
}

// upstream TestTerminatingEndpointsTrafficPolicyCluster.
func TestUpstreamTerminatingEndpointsClusterPolicyFlows(t *testing.T) {
	upRunTerminating(t, upExternalCluster, []upTerminatingCase{
		{
			name: "ready endpoints exist: terminating ones unused",
			eps: []discoveryv1.Endpoint{
				upReadyEp("10.0.1.1", upNode), upReadyEp("10.0.1.2", upNode),
				upServingTerminatingEp("10.0.1.3", "another-node"), upGoneEp("10.0.1.4", "another-node"),
				upReadyEp("10.0.1.5", "another-node"),
			},
			pod:     upTo("10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"),
			outside: upMasqTo("10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"),
		},
		{
			name: "only terminating endpoints: the serving ones are used",
			eps: []discoveryv1.Endpoint{
				upServingTerminatingEp("10.0.1.2", upNode), upServingTerminatingEp("10.0.1.3", upNode),
				upGoneEp("10.0.1.4", "another-node"), upServingTerminatingEp("10.0.1.5", "another-node"),
			},
			pod:     upTo("10.0.1.2:80", "10.0.1.3:80", "10.0.1.5:80"),
			outside: upMasqTo("10.0.1.2:80", "10.0.1.3:80", "10.0.1.5:80"),
		},
		{
			name:    "one serving terminating endpoint on another node: everyone uses it",
			eps:     []discoveryv1.Endpoint{upServingTerminatingEp("10.0.1.5", "node-1")},
			pod:     upTo("10.0.1.5:80"),
			outside: upMasqTo("10.0.1.5:80"),
		},
		{
			name:    "no serving endpoint anywhere: rejected",
			eps:     []discoveryv1.Endpoint{upGoneEp("10.0.1.5", upNode), upGoneEp("10.0.1.5", "node-1")},
			pod:     upRejected,
			outside: upRejected,
		},
	})
}

// upstream TestInternalExternalMasquerade: three LoadBalancer Services (plain,
// externalTrafficPolicy Local, internalTrafficPolicy Local), each with one
// endpoint here and one remote, reached every way under four settings.
func TestUpstreamInternalExternalMasqueradeFlows(t *testing.T) {
	p80 := []discoveryv1.EndpointPort{upSlicePort("p80", v1.ProtocolTCP, 80)}
	variants := []struct {
		name string
		upSetup
	}{
		{name: "pod CIDR known", upSetup: upSetup{}},
		{name: "no local traffic detector", upSetup: upSetup{noLocalDetector: true}},
		{name: "masquerade-all", upSetup: upSetup{masqueradeAll: true}},
		{name: "masquerade-all, no local traffic detector", upSetup: upSetup{masqueradeAll: true, noLocalDetector: true}},
	}
	const (
		noDetector = 1 << iota
		masqAll
	)
	plain := []string{"10.180.0.1:80", "10.180.1.1:80"}
	etp := []string{"10.180.0.2:80", "10.180.1.2:80"}
	itp := []string{"10.180.0.3:80", "10.180.1.3:80"}
	rows := []struct {
		flow upFlow
		// unless maps a variant (noDetector, masqAll or both) to what
		// upstream expects there instead of flow.want.
		unless map[int]upResult
	}{
		{flow: upFlow{name: "pod to ClusterIP: both endpoints, source kept",
			src: upPod, dst: "172.30.0.41", port: 80, want: upTo(plain...)},
			unless: map[int]upResult{masqAll: upMasqTo(plain...), masqAll | noDetector: upMasqTo(plain...)}},
		{flow: upFlow{name: "pod to NodePort: both endpoints, masqueraded",
			src: upPod, dst: upNodeIP, port: 3001, want: upMasqTo(plain...)}},
		{flow: upFlow{name: "pod to LB IP: both endpoints, masqueraded",
			src: upPod, dst: "1.2.3.4", port: 80, want: upMasqTo(plain...)}},
		{flow: upFlow{name: "node to ClusterIP: both endpoints, masqueraded",
			src: upNodeIP, dst: "172.30.0.41", port: 80, fromNode: true, want: upMasqTo(plain...)},
			unless: map[int]upResult{noDetector: upTo(plain...)}},
		{flow: upFlow{name: "node to NodePort: both endpoints, masqueraded",
			src: upNodeIP, dst: upNodeIP, port: 3001, fromNode: true, want: upMasqTo(plain...)}},
		{flow: upFlow{name: "localhost to NodePort: both endpoints, masqueraded",
			src: "127.0.0.1", dst: "127.0.0.1", port: 3001, fromNode: true, want: upMasqTo(plain...)}},
		{flow: upFlow{name: "node to LB IP: both endpoints, masqueraded",
			src: upNodeIP, dst: "1.2.3.4", port: 80, fromNode: true, want: upMasqTo(plain...)}},
		{flow: upFlow{name: "external client to ClusterIP: both endpoints, masqueraded",
			src: upClient, dst: "172.30.0.41", port: 80, want: upMasqTo(plain...)},
			unless: map[int]upResult{noDetector: upTo(plain...)}},
		{flow: upFlow{name: "external client to NodePort: both endpoints, masqueraded",
			src: upClient, dst: upNodeIP, port: 3001, want: upMasqTo(plain...)}},
		{flow: upFlow{name: "external client to LB IP: both endpoints, masqueraded",
			src: upClient, dst: "1.2.3.4", port: 80, want: upMasqTo(plain...)}},

		{flow: upFlow{name: "pod to ClusterIP of an eTP:Local Service: both endpoints, source kept",
			src: upPod, dst: "172.30.0.42", port: 80, want: upTo(etp...)},
			unless: map[int]upResult{masqAll: upMasqTo(etp...), masqAll | noDetector: upMasqTo(etp...)}},
		{flow: upFlow{name: "pod to NodePort of an eTP:Local Service: both endpoints (pods bypass the policy), source kept",
			src: upPod, dst: upNodeIP, port: 3002, want: upTo(etp...)},
			unless: map[int]upResult{noDetector: upTo(etp[0]), masqAll | noDetector: upTo(etp[0])}},
		{flow: upFlow{name: "pod to LB IP of an eTP:Local Service: both endpoints (pods bypass the policy), source kept",
			src: upPod, dst: "5.6.7.8", port: 80, want: upTo(etp...)},
			unless: map[int]upResult{noDetector: upTo(etp[0]), masqAll | noDetector: upTo(etp[0])}},
		{flow: upFlow{name: "node to ClusterIP of an eTP:Local Service: both endpoints, masqueraded",
			src: upNodeIP, dst: "172.30.0.42", port: 80, fromNode: true, want: upMasqTo(etp...)},
			unless: map[int]upResult{noDetector: upTo(etp...)}},
		// Upstream sends this one to the plain Service's NodePort 3001.
		{flow: upFlow{name: "node to NodePort (upstream's row uses the plain Service's port): both endpoints, masqueraded",
			src: upNodeIP, dst: upNodeIP, port: 3001, fromNode: true, want: upMasqTo(plain...)}},
		{flow: upFlow{name: "localhost to NodePort of an eTP:Local Service: both endpoints (the node bypasses the policy), masqueraded",
			src: "127.0.0.1", dst: "127.0.0.1", port: 3002, fromNode: true, want: upMasqTo(etp...)}},
		{flow: upFlow{name: "node to LB IP of an eTP:Local Service: both endpoints (the node bypasses the policy), masqueraded",
			src: upNodeIP, dst: "5.6.7.8", port: 80, fromNode: true, want: upMasqTo(etp...)}},
		{flow: upFlow{name: "external client to ClusterIP of an eTP:Local Service: both endpoints, masqueraded",
			src: upClient, dst: "172.30.0.42", port: 80, want: upMasqTo(etp...)},
			unless: map[int]upResult{noDetector: upTo(etp...)}},
		{flow: upFlow{name: "external client to NodePort of an eTP:Local Service: the local endpoint only, source kept",
			src: upClient, dst: upNodeIP, port: 3002, want: upTo(etp[0])}},
		{flow: upFlow{name: "external client to LB IP of an eTP:Local Service: the local endpoint only, source kept",
			src: upClient, dst: "5.6.7.8", port: 80, want: upTo(etp[0])}},

		{flow: upFlow{name: "pod to ClusterIP of an iTP:Local Service: the local endpoint only, source kept",
			src: upPod, dst: "172.30.0.43", port: 80, want: upTo(itp[0])},
			unless: map[int]upResult{masqAll: upMasqTo(itp[0]), masqAll | noDetector: upMasqTo(itp[0])}},
		{flow: upFlow{name: "pod to NodePort of an iTP:Local Service: both endpoints, masqueraded",
			src: upPod, dst: upNodeIP, port: 3003, want: upMasqTo(itp...)}},
		{flow: upFlow{name: "pod to LB IP of an iTP:Local Service: both endpoints, masqueraded",
			src: upPod, dst: "9.10.11.12", port: 80, want: upMasqTo(itp...)}},
		{flow: upFlow{name: "node to ClusterIP of an iTP:Local Service: the local endpoint only, masqueraded",
			src: upNodeIP, dst: "172.30.0.43", port: 80, fromNode: true, want: upMasqTo(itp[0])},
			unless: map[int]upResult{noDetector: upTo(itp[0])}},
		{flow: upFlow{name: "node to NodePort of an iTP:Local Service: both endpoints, masqueraded",
			src: upNodeIP, dst: upNodeIP, port: 3003, fromNode: true, want: upMasqTo(itp...)}},
		{flow: upFlow{name: "localhost to NodePort of an iTP:Local Service: both endpoints, masqueraded",
			src: "127.0.0.1", dst: "127.0.0.1", port: 3003, fromNode: true, want: upMasqTo(itp...)}},
		{flow: upFlow{name: "node to LB IP of an iTP:Local Service: both endpoints, masqueraded",
			src: upNodeIP, dst: "9.10.11.12", port: 80, fromNode: true, want: upMasqTo(itp...)}},
		{flow: upFlow{name: "external client to ClusterIP of an iTP:Local Service: the local endpoint only, masqueraded",
			src: upClient, dst: "172.30.0.43", port: 80, want: upMasqTo(itp[0])},
			unless: map[int]upResult{noDetector: upTo(itp[0])}},
		{flow: upFlow{name: "external client to NodePort of an iTP:Local Service: both endpoints, masqueraded",
			src: upClient, dst: upNodeIP, port: 3003, want: upMasqTo(itp...)}},
		{flow: upFlow{name: "external client to LB IP of an iTP:Local Service: both endpoints, masqueraded",
			src: upClient, dst: "9.10.11.12", port: 80, want: upMasqTo(itp...)}},
	}
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			key := 0
			if v.noLocalDetector {
				key |= noDetector
			}
			if v.masqueradeAll {
				key |= masqAll
			}
			s := v.upSetup
			s.services = []*v1.Service{
				upSvc("ns1", "svc1", "172.30.0.41", upPort("p80", v1.ProtocolTCP, 80, 3001),
					upLoadBalancer("1.2.3.4"), upHealthCheck(30001)),
				upSvc("ns2", "svc2", "172.30.0.42", upPort("p80", v1.ProtocolTCP, 80, 3002),
					upLoadBalancer("5.6.7.8"), upExternalLocal, upHealthCheck(30002)),
				upSvc("ns3", "svc3", "172.30.0.43", upPort("p80", v1.ProtocolTCP, 80, 3003),
					upLoadBalancer("9.10.11.12"), upInternalPolicy(v1.ServiceInternalTrafficPolicyLocal), upHealthCheck(30003)),
			}
			s.slices = []*discoveryv1.EndpointSlice{
				upSlice("ns1", "svc1", p80, upEp("10.180.0.1", upNode), upEp("10.180.1.1", "remote")),
				upSlice("ns2", "svc2", p80, upEp("10.180.0.2", upNode), upEp("10.180.1.2", "remote")),
				upSlice("ns3", "svc3", p80, upEp("10.180.0.3", upNode), upEp("10.180.1.3", "remote")),
			}
			var flows []upFlow
			for _, r := range rows {
				f := r.flow
				if w, ok := r.unless[key]; ok {
					f.want = w
					f.name = fmt.Sprintf("%s [here: %s]", f.name, w)
				}
				flows = append(flows, f)
			}
			upRun(t, s, upStage{flows: flows})
		})
	}
}
