package iptables

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// tracerRules exercise each thing the tracer reads: a dispatch by a
// non-contiguous mask, a statistic split, affinity (recent), a mark set in
// one chain and matched in another, RETURN, negation, -i with a wildcard,
// addrtype, and verdicts in filter.
const tracerRules = `*nat
:MP-SERVICES - [0:0]
:MP-X7 - [0:0]
:MP-SVC - [0:0]
:MP-MARK - [0:0]
:MP-POSTROUTING - [0:0]
-A PREROUTING -j MP-SERVICES
-A OUTPUT -j MP-SERVICES
-A POSTROUTING -j MP-POSTROUTING
-A MP-SERVICES -d 0.0.0.7/0.0.0.15 -j MP-X7
-A MP-SERVICES -m addrtype --dst-type LOCAL -p tcp -m tcp --dport 30080 -j MP-SVC
-A MP-X7 -d 10.96.0.7/32 -p tcp -m tcp --dport 80 -j MP-SVC
-A MP-SVC ! -s 10.244.0.0/16 -j MP-MARK
-A MP-SVC -m recent --name MP-AFF --rcheck --seconds 10800 --reap -m recent --name MP-AFF --set -p tcp -j DNAT --to-destination 10.244.2.7:8080
-A MP-SVC -m statistic --mode random --probability 0.2500000000 -p tcp -j DNAT --to-destination 10.244.1.5:8080
-A MP-SVC -m recent --name MP-AFF --set -p tcp -j DNAT --to-destination 10.244.2.7:8080
-A MP-MARK -j MARK --or-mark 0x4000
-A MP-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A MP-POSTROUTING -j MASQUERADE
COMMIT
*filter
:MP-FILTER - [0:0]
-A INPUT -j MP-FILTER
-A FORWARD -j MP-FILTER
-A OUTPUT -j MP-FILTER
-A MP-FILTER -i eth+ -d 10.96.0.9/32 -p tcp -m tcp --dport 80 -j DROP
-A MP-FILTER -d 10.96.0.9/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset
-A MP-FILTER -d 10.96.0.8/32 -p udp -m udp --dport 53:54 -j ACCEPT
COMMIT
`

var (
	tracerNode   = netip.MustParseAddr("10.240.0.3")
	tracerPod    = netip.MustParseAddr("10.244.1.9")
	tracerClient = netip.MustParseAddr("198.51.100.79")
)

func TestTracerFollowsTheKernelsWalk(t *testing.T) {
	tr := &Tracer{State: mustApply(t, NewState(), tracerRules, true), LocalAddrs: []netip.Addr{tracerNode}}
	tcp := func(src, dst netip.Addr, port int) Packet {
		return Packet{Src: src, Dst: dst, Proto: "tcp", DPort: port}
	}
	vip := netip.MustParseAddr("10.96.0.7")
	blocked := netip.MustParseAddr("10.96.0.9")
	tests := []struct {
		name string
		pkt  Packet
		want []string
	}{
		{
			name: "a pod's packet is split by the statistic, the rest goes to the last endpoint",
			pkt:  tcp(tracerPod, vip, 80),
			want: []string{"ACCEPT 10.244.1.5:8080 (p=0.250)", "ACCEPT 10.244.2.7:8080 (p=0.750)"},
		},
		{
			name: "a source outside the pod range is marked, so it is masqueraded after DNAT",
			pkt:  tcp(tracerClient, vip, 80),
			want: []string{"ACCEPT 10.244.1.5:8080 masqueraded (p=0.250)", "ACCEPT 10.244.2.7:8080 masqueraded (p=0.750)"},
		},
		{
			name: "a source already in the affinity list goes to its endpoint only",
			pkt:  func() Packet { p := tcp(tracerPod, vip, 80); p.Recent = map[string]bool{"MP-AFF": true}; return p }(),
			want: []string{"ACCEPT 10.244.2.7:8080 (p=1.000)"},
		},
		{
			name: "another port of the address matches nothing and is accepted untranslated",
			pkt:  tcp(tracerPod, vip, 81),
			want: []string{"ACCEPT 10.96.0.7:81 (p=1.000)"},
		},
		{
			name: "an address outside the mask's dispatch is not looked at",
			pkt:  tcp(tracerPod, netip.MustParseAddr("10.96.0.6"), 80),
			want: []string{"ACCEPT 10.96.0.6:80 (p=1.000)"},
		},
		{
			name: "a node address is delivered locally and the NodePort applies",
			pkt:  tcp(tracerClient, tracerNode, 30080),
			want: []string{"ACCEPT 10.244.1.5:8080 masqueraded (p=0.250)", "ACCEPT 10.244.2.7:8080 masqueraded (p=0.750)"},
		},
		{
			name: "a wildcard interface matches the interface the packet came in on",
			pkt:  func() Packet { p := tcp(tracerPod, blocked, 80); p.InIface = "eth0"; return p }(),
			want: []string{"DROP 10.96.0.9:80 (p=1.000)"},
		},
		{
			name: "another interface falls through to the next rule",
			pkt:  func() Packet { p := tcp(tracerPod, blocked, 80); p.InIface = "cni0"; return p }(),
			want: []string{"REJECT 10.96.0.9:80 (p=1.000)"},
		},
		{
			name: "the node's own packets have no input interface and take the OUTPUT path",
			pkt:  func() Packet { p := tcp(tracerNode, blocked, 80); p.FromNode = true; p.InIface = "eth0"; return p }(),
			want: []string{"REJECT 10.96.0.9:80 (p=1.000)"},
		},
		{
			name: "a port range matches a port inside it",
			pkt:  Packet{Src: tracerPod, Dst: netip.MustParseAddr("10.96.0.8"), Proto: "udp", DPort: 54},
			want: []string{"ACCEPT 10.96.0.8:54 (p=1.000)"},
		},
		{
			name: "the protocol is part of the match",
			pkt:  Packet{Src: tracerPod, Dst: blocked, Proto: "udp", DPort: 80},
			want: []string{"ACCEPT 10.96.0.9:80 (p=1.000)"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			outs, err := tr.Trace(tc.pkt)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, o := range outs {
				got = append(got, o.String())
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestTracerRecordsAffinityItSets(t *testing.T) {
	tr := &Tracer{State: mustApply(t, NewState(), tracerRules, true), LocalAddrs: []netip.Addr{tracerNode}}
	outs, err := tr.Trace(Packet{Src: tracerPod, Dst: netip.MustParseAddr("10.96.0.7"), Proto: "tcp", DPort: 80})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, o := range outs {
		got = append(got, o.Dst.String()+" sets "+strings.Join(o.RecentSet, ","))
	}
	want := []string{"10.244.1.5:8080 sets ", "10.244.2.7:8080 sets MP-AFF"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestAddrMatches(t *testing.T) {
	tests := []struct {
		addr, spec string
		want       bool
	}{
		{"10.96.0.7", "10.96.0.7", true},
		{"10.96.0.7", "10.96.0.7/32", true},
		{"10.96.0.8", "10.96.0.7/32", false},
		{"10.96.3.7", "10.96.0.0/16", true},
		{"10.97.0.7", "10.96.0.0/16", false},
		{"10.96.3.7", "0.0.0.7/0.0.0.15", true},
		{"10.96.3.23", "0.0.0.7/0.0.0.15", true},
		{"10.96.3.8", "0.0.0.7/0.0.0.15", false},
		{"::ffff:10.96.0.7", "10.96.0.7/32", true},
		{"fd00::7", "10.96.0.7/32", false},
		{"fd00::7", "fd00::/64", true},
		{"10.96.0.7", "not-an-address", false},
	}
	for _, tc := range tests {
		if got := addrMatches(netip.MustParseAddr(tc.addr), tc.spec); got != tc.want {
			t.Errorf("addrMatches(%s, %s) = %v, want %v", tc.addr, tc.spec, got, tc.want)
		}
	}
}

func TestNewTracerLoadsAsTheDataplaneWould(t *testing.T) {
	svc := Chain{Name: "MP-SVC", Rules: []Rule{{"-d", "10.96.0.7/32", "-p", "tcp", "-m", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", "10.244.1.5:8080"}}}
	rs := &Ruleset{
		Family: IPv4,
		Tables: []TableRules{{Table: "nat", Chains: []Chain{svc}}},
		Jumps:  []Jump{{Table: "nat", Chain: "PREROUTING", Rule: Rule{"-j", "MP-SVC"}}},
	}
	tr, err := NewTracer(rs, []netip.Addr{tracerNode})
	if err != nil {
		t.Fatal(err)
	}
	outs, err := tr.Trace(Packet{Src: tracerPod, Dst: netip.MustParseAddr("10.96.0.7"), Proto: "tcp", DPort: 80})
	if err != nil {
		t.Fatal(err)
	}
	if len(outs) != 1 || outs[0].String() != "ACCEPT 10.244.1.5:8080 (p=1.000)" || !outs[0].DNAT {
		t.Errorf("got %v, want the packet translated by the jump's chain", outs)
	}

	// What iptables-restore refuses, the tracer refuses to load.
	rs.Tables[0].Chains[0].Rules[0] = Rule{"-d", "10.96.0.7/32", "--dport", "80", "-j", "DNAT", "--to-destination", "10.244.1.5:8080"}
	if _, err := NewTracer(rs, nil); err == nil {
		t.Error("a --dport without a protocol was loaded; iptables-restore refuses it")
	}
}

func TestTracerReadsTheKernelsSpellingAndGivesThePath(t *testing.T) {
	// tracerRules as iptables-save prints them back: MARK as --set-xmark,
	// recent with its defaults.
	saved := strings.NewReplacer(
		"-j MARK --or-mark 0x4000", "-j MARK --set-xmark 0x4000/0x4000",
		"--name MP-AFF --set", "--set --name MP-AFF --mask 255.255.255.255 --rsource",
	).Replace(tracerRules)
	tr := &Tracer{State: mustApply(t, NewState(), saved, true), LocalAddrs: []netip.Addr{tracerNode}}
	out, err := tr.Trace(Packet{Src: tracerClient, Dst: netip.MustParseAddr("10.96.0.7"), Proto: "tcp", DPort: 80})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, o := range out {
		got = append(got, o.String())
	}
	if want := []string{"ACCEPT 10.244.1.5:8080 masqueraded (p=0.250)", "ACCEPT 10.244.2.7:8080 masqueraded (p=0.750)"}; !cmp.Equal(got, want) {
		t.Errorf("outcomes %v, want %v", got, want)
	}
	var path []string
	for _, h := range out[0].Path {
		path = append(path, string(h.Table)+" "+h.Chain+" "+h.Rule.Target())
	}
	want := []string{
		"nat PREROUTING MP-SERVICES", "nat MP-SERVICES MP-X7", "nat MP-X7 MP-SVC", "nat MP-SVC MP-MARK", "nat MP-MARK MARK", "nat MP-SVC DNAT",
		"filter FORWARD MP-FILTER",
		"nat POSTROUTING MP-POSTROUTING", "nat MP-POSTROUTING MASQUERADE",
	}
	if !cmp.Equal(path, want) {
		t.Errorf("path of the first outcome:\n%s\nwant\n%s", strings.Join(path, "\n"), strings.Join(want, "\n"))
	}
}
