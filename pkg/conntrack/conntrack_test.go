package conntrack

import (
	"net/netip"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

var (
	dns     = endpoints.ServicePortName{Namespace: "kube-system", Name: "kube-dns", Port: "dns"}
	ap      = netip.MustParseAddrPort
	client  = ap("10.244.3.7:40053")
	nodeIP  = netip.MustParseAddr("192.168.0.10")
	podA    = ap("10.244.1.5:53")
	podB    = ap("10.244.2.6:53")
	cluster = ap("10.96.0.10:53")
)

type svcOpt func(*endpoints.ServicePort)

func dnsService(opts ...svcOpt) *endpoints.ServicePort {
	s := &endpoints.ServicePort{
		Name: dns, Protocol: endpoints.UDP, Port: 53,
		ClusterIPs: []netip.Addr{cluster.Addr()},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func withNodePort(p int32) svcOpt { return func(s *endpoints.ServicePort) { s.NodePort = p } }
func withExternalIP(ip string) svcOpt {
	return func(s *endpoints.ServicePort) { s.ExternalIPs = append(s.ExternalIPs, netip.MustParseAddr(ip)) }
}
func withLoadBalancerIP(ip string) svcOpt {
	return func(s *endpoints.ServicePort) { s.LoadBalancerIPs = append(s.LoadBalancerIPs, netip.MustParseAddr(ip)) }
}
func protocol(p endpoints.Protocol) svcOpt { return func(s *endpoints.ServicePort) { s.Protocol = p } }

func ready(a netip.AddrPort) endpoints.Endpoint {
	return endpoints.Endpoint{IP: a.Addr(), Port: int32(a.Port()), Ready: true, Serving: true}
}

func notReady(a netip.AddrPort) endpoints.Endpoint {
	return endpoints.Endpoint{IP: a.Addr(), Port: int32(a.Port())}
}

func terminatingServing(a netip.AddrPort) endpoints.Endpoint {
	return endpoints.Endpoint{IP: a.Addr(), Port: int32(a.Port()), Serving: true, Terminating: true}
}

func state(svc *endpoints.ServicePort, eps ...endpoints.Endpoint) *endpoints.Snapshot {
	s := &endpoints.Snapshot{Services: map[endpoints.ServicePortName]*endpoints.ServicePort{}, Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{}}
	if svc != nil {
		s.Services[svc.Name] = svc
		s.Endpoints[svc.Name] = eps
	}
	return s
}

// udp is an entry of a client's datagrams to dst that conntrack translated
// to endpoint (dst itself when untranslated).
func udp(dst, endpoint netip.AddrPort) Entry {
	return Entry{Proto: ProtoUDP, OrigSrc: client, OrigDst: dst, ReplySrc: endpoint, ReplyDst: client}
}

func TestJudge(t *testing.T) {
	tests := []struct {
		name  string
		state *endpoints.Snapshot
		// before, when set, is the state the table was last reconciled
		// against.
		before *endpoints.Snapshot
		entry  Entry
		want   Verdict
	}{
		{
			name:  "UDP client to a ClusterIP whose endpoint left: entry deleted",
			state: state(dnsService(), ready(podB)),
			entry: udp(cluster, podA),
			want:  Verdict{Stale: true, Reason: ReasonGone, Service: dns},
		},
		{
			name:  "entry to an endpoint that is still serving: kept",
			state: state(dnsService(), ready(podA), ready(podB)),
			entry: udp(cluster, podA),
			want:  Verdict{Reason: ReasonServing, Service: dns},
		},
		{
			name:  "terminating but serving endpoint used as fallback: kept",
			state: state(dnsService(), terminatingServing(podA)),
			entry: udp(cluster, podA),
			want:  Verdict{Reason: ReasonServing, Service: dns},
		},
		{
			name:  "endpoint no longer ready nor serving: entry deleted",
			state: state(dnsService(), notReady(podA), ready(podB)),
			entry: udp(cluster, podA),
			want:  Verdict{Stale: true, Reason: ReasonGone, Service: dns},
		},
		{
			name:  "endpoint kept its address but moved to another port: entry deleted",
			state: state(dnsService(), ready(ap("10.244.1.5:5353"))),
			entry: udp(cluster, podA),
			want:  Verdict{Stale: true, Reason: ReasonGone, Service: dns},
		},
		{
			name:  "the Service lost its last endpoint: entry deleted (the reject rule cannot catch a translated flow)",
			state: state(dnsService()),
			entry: udp(cluster, podA),
			want:  Verdict{Stale: true, Reason: ReasonGone, Service: dns},
		},
		{
			name:   "the UDP Service was deleted since the last reconciliation: entries to its endpoints deleted",
			before: state(dnsService(), ready(podA)),
			state:  state(nil),
			entry:  udp(cluster, podA),
			want:   Verdict{Stale: true, Reason: ReasonDeleted, Service: dns},
		},
		{
			name:   "the UDP Service was deleted: untranslated entries to its old address are not ours any more",
			before: state(dnsService(), ready(podA)),
			state:  state(nil),
			entry:  udp(cluster, cluster),
			want:   Verdict{Reason: ReasonNotService},
		},
		{
			name:  "a Service unknown to the last reconciliation (after a restart) is not guessed at: kept",
			state: state(nil),
			entry: udp(cluster, podA),
			want:  Verdict{Reason: ReasonNotService},
		},
		{
			name:  "NodePort on a node address, endpoint left: entry deleted",
			state: state(dnsService(withNodePort(30053)), ready(podB)),
			entry: udp(netip.AddrPortFrom(nodeIP, 30053), podA),
			want:  Verdict{Stale: true, Reason: ReasonGone, Service: dns},
		},
		{
			name:  "NodePort on a node address, endpoint serving: kept",
			state: state(dnsService(withNodePort(30053)), ready(podA)),
			entry: udp(netip.AddrPortFrom(nodeIP, 30053), podA),
			want:  Verdict{Reason: ReasonServing, Service: dns},
		},
		{
			name:  "the NodePort's number on an address that is not the node's (forwarded traffic): never touched",
			state: state(dnsService(withNodePort(30053)), ready(podB)),
			entry: udp(ap("203.0.113.9:30053"), ap("203.0.113.9:30053")),
			want:  Verdict{Reason: ReasonNotService},
		},
		{
			name:  "NodePort sent to while the Service had no endpoint: deleted once it has one",
			state: state(dnsService(withNodePort(30053)), ready(podA)),
			entry: udp(netip.AddrPortFrom(nodeIP, 30053), netip.AddrPortFrom(nodeIP, 30053)),
			want:  Verdict{Stale: true, Reason: ReasonUntranslated, Service: dns},
		},
		{
			name:  "entry created while the Service had no endpoint: deleted once it has one",
			state: state(dnsService(), ready(podA)),
			entry: udp(cluster, cluster),
			want:  Verdict{Stale: true, Reason: ReasonUntranslated, Service: dns},
		},
		{
			name:  "external IP, endpoint left: entry deleted",
			state: state(dnsService(withExternalIP("203.0.113.53")), ready(podB)),
			entry: udp(ap("203.0.113.53:53"), podA),
			want:  Verdict{Stale: true, Reason: ReasonGone, Service: dns},
		},
		{
			name:  "load balancer IP, endpoint left: entry deleted",
			state: state(dnsService(withLoadBalancerIP("203.0.113.140")), ready(podB)),
			entry: udp(ap("203.0.113.140:53"), podA),
			want:  Verdict{Stale: true, Reason: ReasonGone, Service: dns},
		},
		{
			name:  "the ClusterIP on another port than the Service's: never touched",
			state: state(dnsService(), ready(podB)),
			entry: udp(ap("10.96.0.10:54"), podA),
			want:  Verdict{Reason: ReasonNotService},
		},
		{
			name:  "TCP entries: never touched",
			state: state(dnsService(protocol(endpoints.TCP)), ready(podB)),
			entry: Entry{Proto: ProtoTCP, OrigSrc: client, OrigDst: cluster, ReplySrc: podA, ReplyDst: client},
			want:  Verdict{Reason: ReasonProtocol},
		},
		{
			name:  "a TCP entry to the ClusterIP and port of a UDP Service: never touched",
			state: state(dnsService(), ready(podB)),
			entry: Entry{Proto: ProtoTCP, OrigSrc: client, OrigDst: cluster, ReplySrc: podA, ReplyDst: client},
			want:  Verdict{Reason: ReasonProtocol},
		},
		{
			name:  "a UDP entry to the ClusterIP and port of an SCTP Service: never touched",
			state: state(dnsService(protocol(endpoints.SCTP)), ready(podB)),
			entry: udp(cluster, podA),
			want:  Verdict{Reason: ReasonNotService},
		},
		{
			name:  "SCTP association whose endpoint left: entry deleted",
			state: state(dnsService(protocol(endpoints.SCTP)), ready(podB)),
			entry: Entry{Proto: ProtoSCTP, OrigSrc: client, OrigDst: cluster, ReplySrc: podA, ReplyDst: client},
			want:  Verdict{Stale: true, Reason: ReasonGone, Service: dns},
		},
		{
			name:  "entries to non-Service destinations: never touched",
			state: state(dnsService(), ready(podB)),
			entry: udp(ap("8.8.8.8:53"), ap("8.8.8.8:53")),
			want:  Verdict{Reason: ReasonNotService},
		},
		{
			name:  "a pod talking to another pod directly: never touched",
			state: state(dnsService(), ready(podB)),
			entry: udp(podA, podA),
			want:  Verdict{Reason: ReasonNotService},
		},
		{
			name: "IPv6 ClusterIP, endpoint left: entry deleted",
			state: state(&endpoints.ServicePort{Name: dns, Protocol: endpoints.UDP, Port: 53, ClusterIPs: []netip.Addr{netip.MustParseAddr("fd00:96::a")}},
				ready(ap("[fd00:244:2::6]:53"))),
			entry: Entry{Proto: ProtoUDP, OrigSrc: ap("[fd00:244:3::7]:40053"), OrigDst: ap("[fd00:96::a]:53"), ReplySrc: ap("[fd00:244:1::5]:53")},
			want:  Verdict{Stale: true, Reason: ReasonGone, Service: dns},
		},
	}
	nodePortAddrs := map[iptables.Family][]netip.Addr{iptables.IPv4: {nodeIP}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := NewFrontends(tc.state, nodePortAddrs)
			if tc.before != nil {
				f = f.Since(NewFrontends(tc.before, nodePortAddrs))
			}
			if got := f.Judge(&tc.entry); got != tc.want {
				t.Errorf("Judge(%+v)\n got %+v\nwant %+v", tc.entry, got, tc.want)
			}
		})
	}
}

// Two Services that list the same external IP and port share a frontend:
// an entry to an endpoint of either is kept.
func TestJudgeSharedFrontend(t *testing.T) {
	other := endpoints.ServicePortName{Namespace: "default", Name: "other-dns"}
	a := dnsService(withExternalIP("203.0.113.53"))
	b := &endpoints.ServicePort{Name: other, Protocol: endpoints.UDP, Port: 53, ClusterIPs: []netip.Addr{netip.MustParseAddr("10.96.0.11")},
		ExternalIPs: []netip.Addr{netip.MustParseAddr("203.0.113.53")}}
	s := state(a, ready(podA))
	s.Services[other], s.Endpoints[other] = b, []endpoints.Endpoint{ready(podB)}
	f := NewFrontends(s, nil)
	for _, to := range []netip.AddrPort{podA, podB} {
		if v := f.Judge(&Entry{Proto: ProtoUDP, OrigSrc: client, OrigDst: ap("203.0.113.53:53"), ReplySrc: to}); v.Stale {
			t.Errorf("entry to %s judged stale: %+v", to, v)
		}
	}
	if v := f.Judge(&Entry{Proto: ProtoUDP, OrigSrc: client, OrigDst: ap("203.0.113.53:53"), ReplySrc: ap("10.244.9.9:53")}); !v.Stale {
		t.Errorf("entry to an endpoint of neither kept: %+v", v)
	}
}

func TestSameServices(t *testing.T) {
	base := NewFrontends(state(dnsService(), ready(podA)), nil)
	for _, tc := range []struct {
		name string
		snap *endpoints.Snapshot
		same bool
	}{
		{"same endpoints", state(dnsService(), ready(podA)), true},
		{"an endpoint more", state(dnsService(), ready(podA), ready(podB)), false},
		{"the endpoint stops serving", state(dnsService(), notReady(podA)), false},
		{"terminating but serving: still the same for conntrack", state(dnsService(), terminatingServing(podA)), true},
		{"the Service becomes TCP", state(dnsService(protocol(endpoints.TCP)), ready(podA)), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := base.SameServices(NewFrontends(tc.snap, nil)); got != tc.same {
				t.Errorf("SameServices = %v, want %v", got, tc.same)
			}
		})
	}
}

// The fake deletes what the decision judges stale and nothing else, and
// shows Sweep only the family and protocols asked for, like the kernel.
func TestReconcileWithFake(t *testing.T) {
	table := &Fake{}
	kept := []Entry{
		udp(cluster, podB),
		{Proto: ProtoTCP, OrigSrc: client, OrigDst: cluster, ReplySrc: podA, ReplyDst: client},
		udp(ap("8.8.8.8:53"), ap("8.8.8.8:53")),
		{Proto: ProtoUDP, OrigSrc: ap("[fd00::7]:1"), OrigDst: ap("[fd00:96::a]:53"), ReplySrc: ap("[fd00::9]:53")},
	}
	table.Add(udp(cluster, podA), udp(cluster, cluster))
	table.Add(kept...)
	f := NewFrontends(state(dnsService(), ready(podB)), nil)
	r := Reconcile(table, iptables.IPv4, f, discard)
	if r.Err != nil || r.Deleted != 2 || r.Seen != 4 {
		t.Errorf("Reconcile = %+v, want 2 of 4 UDP IPv4 entries deleted", r)
	}
	if got := table.Entries(); len(got) != len(kept) {
		t.Errorf("table holds %v, want %v", got, kept)
	}
}

// After the rules were missing (WithTCP), a TCP entry that skipped the nat
// table is deleted so that the client's next SYN is translated; translated
// connections are never touched.
func TestJudgeTCPAfterTheRulesWereMissing(t *testing.T) {
	web := endpoints.ServicePortName{Namespace: "default", Name: "web"}
	webService := &endpoints.ServicePort{Name: web, Protocol: endpoints.TCP, Port: 80, NodePort: 30080,
		ClusterIPs: []netip.Addr{netip.MustParseAddr("10.96.0.80")}, LoadBalancerIPs: []netip.Addr{netip.MustParseAddr("203.0.113.80")}}
	snap := state(webService, ready(podB))
	tcp := func(dst, replySrc netip.AddrPort) Entry {
		return Entry{Proto: ProtoTCP, OrigSrc: client, OrigDst: dst, ReplySrc: replySrc, ReplyDst: client}
	}
	clusterIP, nodePort := ap("10.96.0.80:80"), netip.AddrPortFrom(nodeIP, 30080)
	tests := []struct {
		name  string
		sweep bool // WithTCP: the rules may have been missing
		entry Entry
		want  Verdict
	}{
		{"SYN to the ClusterIP sent while the rules were gone: deleted", true, tcp(clusterIP, clusterIP),
			Verdict{Stale: true, Reason: ReasonTCPUntranslated, Service: web}},
		{"SYN to a NodePort on a node address sent while the rules were gone: deleted", true, tcp(nodePort, nodePort),
			Verdict{Stale: true, Reason: ReasonTCPUntranslated, Service: web}},
		{"SYN to the load balancer IP sent while the rules were gone: deleted", true, tcp(ap("203.0.113.80:80"), ap("203.0.113.80:80")),
			Verdict{Stale: true, Reason: ReasonTCPUntranslated, Service: web}},
		{"a translated connection, even to an endpoint that left: left alone", true, tcp(clusterIP, podA),
			Verdict{Reason: ReasonTCPTranslated, Service: web}},
		{"the NodePort's number on an address that is not the node's: not ours", true, tcp(ap("192.168.0.99:30080"), ap("192.168.0.99:30080")),
			Verdict{Reason: ReasonNotService}},
		{"the ClusterIP on another port: not ours", true, tcp(ap("10.96.0.80:81"), ap("10.96.0.80:81")),
			Verdict{Reason: ReasonNotService}},
		{"untranslated, but no sweep after missing rules: left alone", false, tcp(clusterIP, clusterIP),
			Verdict{Reason: ReasonProtocol}},
	}
	nodePortAddrs := map[iptables.Family][]netip.Addr{iptables.IPv4: {nodeIP}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := NewFrontends(snap, nodePortAddrs)
			if tc.sweep {
				f = f.WithTCP(snap, nil)
			}
			if got := f.Judge(&tc.entry); got != tc.want {
				t.Errorf("Judge(%+v)\n got %+v\nwant %+v", tc.entry, got, tc.want)
			}
		})
	}
	// Only such a sweep reads TCP entries at all.
	if p := NewFrontends(snap, nodePortAddrs).Protocols(); len(p) != 0 {
		t.Errorf("Protocols of a TCP-only state = %v, want none", p)
	}
	if p := NewFrontends(snap, nodePortAddrs).WithTCP(snap, nil).Protocols(); len(p) != 1 || p[0] != ProtoTCP {
		t.Errorf("Protocols after WithTCP = %v, want [TCP]", p)
	}
}

// The TCP service ports a sync must sweep for SYNs that found no rule: those
// with a frontend the previous rules lacked, and no others.
func TestNewTCPFrontends(t *testing.T) {
	web := endpoints.ServicePortName{Namespace: "default", Name: "web"}
	webPort := func(opts ...svcOpt) *endpoints.ServicePort {
		sp := &endpoints.ServicePort{Name: web, Protocol: endpoints.TCP, Port: 80, ClusterIPs: []netip.Addr{netip.MustParseAddr("10.96.0.80")}}
		for _, o := range opts {
			o(sp)
		}
		return sp
	}
	changed := func(sp *endpoints.ServicePort, eps ...endpoints.Endpoint) *endpoints.Snapshot {
		s := state(sp, eps...)
		s.Changed = map[endpoints.ServicePortName]bool{sp.Name: true}
		return s
	}
	for _, tc := range []struct {
		name      string
		prev, cur *endpoints.Snapshot
		want      int
	}{
		{"a new Service", state(dnsService(), ready(podA)), changed(webPort(), ready(podB)), 1},
		{"the first sync (nothing before)", nil, changed(webPort(), ready(podB)), 1},
		{"only its endpoints changed", state(webPort(), ready(podA)), changed(webPort(), ready(podB)), 0},
		{"it got a NodePort", state(webPort(), ready(podA)), changed(webPort(withNodePort(30080)), ready(podA)), 1},
		{"it got a load balancer IP", state(webPort(), ready(podA)), changed(webPort(withLoadBalancerIP("203.0.113.80")), ready(podA)), 1},
		{"a new UDP Service: not TCP's concern", state(webPort(), ready(podA)), changed(dnsService(), ready(podA)), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := NewTCPFrontends(tc.prev, tc.cur); len(got) != tc.want {
				t.Errorf("NewTCPFrontends = %v, want %d service ports", got, tc.want)
			}
		})
	}
}

// Like the kernel, the fake passes a TCP sweep only the entries that never
// saw a reply: an untranslated entry that was answered (a SYN to a NodePort
// delivered to the node and reset) is not an untranslated SYN waiting.
func TestFakeSweepsOnlyUnrepliedTCP(t *testing.T) {
	web := &endpoints.ServicePort{Name: endpoints.ServicePortName{Namespace: "default", Name: "web"}, Protocol: endpoints.TCP, Port: 80,
		ClusterIPs: []netip.Addr{netip.MustParseAddr("10.96.0.80")}}
	snap := state(web, ready(podB))
	syn := Entry{Proto: ProtoTCP, OrigSrc: client, OrigDst: ap("10.96.0.80:80"), ReplySrc: ap("10.96.0.80:80"), ReplyDst: client}
	answered := syn
	answered.OrigSrc, answered.Replied = ap("10.244.3.7:40054"), true
	table := &Fake{}
	table.Add(syn, answered)
	r := Reconcile(table, iptables.IPv4, NewFrontends(snap, nil).WithTCP(snap, nil), discard)
	if r.Err != nil || r.Seen != 1 || r.Deleted != 1 {
		t.Errorf("Reconcile = %+v, want the unreplied SYN seen and deleted, the answered entry not seen", r)
	}
	if got := table.Entries(); len(got) != 1 || got[0] != answered {
		t.Errorf("table holds %v, want only %v", got, answered)
	}
}
