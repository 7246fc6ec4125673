package rules

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

func TestDetectLocalMatchArguments(t *testing.T) {
	cidrs := []netip.Prefix{netip.MustParsePrefix("10.244.1.7/24"), netip.MustParsePrefix("fd00:244:1::/64")}
	tests := []struct {
		name          string
		d             DetectLocal
		fam           iptables.Family
		local, notLoc []string
	}{
		{"ClusterCIDR, IPv4: the range, masked", DetectLocal{Mode: DetectClusterCIDR, CIDRs: cidrs}, iptables.IPv4,
			[]string{"-s", "10.244.1.0/24"}, []string{"!", "-s", "10.244.1.0/24"}},
		{"ClusterCIDR, IPv6: the range of the family", DetectLocal{Mode: DetectClusterCIDR, CIDRs: cidrs}, iptables.IPv6,
			[]string{"-s", "fd00:244:1::/64"}, []string{"!", "-s", "fd00:244:1::/64"}},
		{"ClusterCIDR without a range of the family: nothing detected", DetectLocal{Mode: DetectClusterCIDR, CIDRs: cidrs[:1]}, iptables.IPv6, nil, nil},
		{"ClusterCIDR without any range: nothing detected", DetectLocal{Mode: DetectClusterCIDR}, iptables.IPv4, nil, nil},
		{"NodeCIDR: the node's range", DetectLocal{Mode: DetectNodeCIDR, CIDRs: cidrs}, iptables.IPv4,
			[]string{"-s", "10.244.1.0/24"}, []string{"!", "-s", "10.244.1.0/24"}},
		{"BridgeInterface: the bridge, in both families", DetectLocal{Mode: DetectBridgeInterface, BridgeInterface: "cni0"}, iptables.IPv6,
			[]string{"-i", "cni0"}, []string{"!", "-i", "cni0"}},
		{"InterfaceNamePrefix: a wildcard name", DetectLocal{Mode: DetectInterfaceNamePrefix, InterfaceNamePrefix: "veth"}, iptables.IPv4,
			[]string{"-i", "veth+"}, []string{"!", "-i", "veth+"}},
		{"an interface mode ignores CIDRs", DetectLocal{Mode: DetectBridgeInterface, BridgeInterface: "br0", CIDRs: cidrs}, iptables.IPv4,
			[]string{"-i", "br0"}, []string{"!", "-i", "br0"}},
		{"no mode: nothing detected", DetectLocal{CIDRs: cidrs, BridgeInterface: "cni0"}, iptables.IPv4, nil, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.local, tc.d.IfLocal(tc.fam)); diff != "" {
				t.Errorf("IfLocal (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.notLoc, tc.d.IfNotLocal(tc.fam)); diff != "" {
				t.Errorf("IfNotLocal (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDetectLocalValidate(t *testing.T) {
	tests := []struct {
		name string
		d    DetectLocal
		ok   bool
	}{
		{"ClusterCIDR with one range per family", clusterCIDR("10.244.0.0/16", "fd00:244::/48"), true},
		{"ClusterCIDR without a range (detects nothing, as upstream)", DetectLocal{Mode: DetectClusterCIDR}, true},
		{"two IPv4 ranges", clusterCIDR("10.244.0.0/16", "10.245.0.0/16"), false},
		{"BridgeInterface", DetectLocal{Mode: DetectBridgeInterface, BridgeInterface: "cni0"}, true},
		{"BridgeInterface without a name", DetectLocal{Mode: DetectBridgeInterface}, false},
		{"BridgeInterface with a name of 16 characters", DetectLocal{Mode: DetectBridgeInterface, BridgeInterface: "abcdefghijklmnop"}, false},
		{"InterfaceNamePrefix of 14 characters (15 with its +)", DetectLocal{Mode: DetectInterfaceNamePrefix, InterfaceNamePrefix: "abcdefghijklmn"}, true},
		{"InterfaceNamePrefix of 15 characters", DetectLocal{Mode: DetectInterfaceNamePrefix, InterfaceNamePrefix: "abcdefghijklmno"}, false},
		{"InterfaceNamePrefix without a prefix", DetectLocal{Mode: DetectInterfaceNamePrefix}, false},
		{"an unknown mode", DetectLocal{Mode: "PodCIDR"}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.d.Validate(); (err == nil) != tc.ok {
				t.Errorf("Validate() = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

// What each --detect-local-mode means for traffic, traced through the
// rules: the node's pods reach a ClusterIP with their own address and an
// external address of an externalTrafficPolicy: Local Service on any
// endpoint; everything else is masqueraded or kept to local endpoints. The
// node's own traffic is never local, also in the interface modes (it has no
// input interface), as upstream.
func TestEachDetectLocalModeTellsPodsFromOthers(t *testing.T) {
	all := func(s string) string { return s + " (p=1.000)" }
	from := func(src netip.Addr, iface string) func(iptables.Packet) iptables.Packet {
		return func(p iptables.Packet) iptables.Packet { p.Src, p.InIface = src, iface; return p }
	}
	modes := []struct {
		name string
		d    DetectLocal
		// pod is a pod of this node; other a client that is not one.
		pod, other func(iptables.Packet) iptables.Packet
	}{
		{"ClusterCIDR", clusterCIDR("10.244.0.0/16"), from(node1Pod2, "cni0"), from(client, "eth0")},
		{"ClusterCIDR, a pod of another node routed here", clusterCIDR("10.244.0.0/16"), from(otherPod, "eth0"), from(client, "eth0")},
		{"NodeCIDR", DetectLocal{Mode: DetectNodeCIDR, CIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}}, from(node1Pod2, "cni0"), from(otherPod, "eth0")},
		{"BridgeInterface", DetectLocal{Mode: DetectBridgeInterface, BridgeInterface: "cni0"}, from(node1Pod2, "cni0"), from(node1Pod2, "eth0")},
		{"InterfaceNamePrefix", DetectLocal{Mode: DetectInterfaceNamePrefix, InterfaceNamePrefix: "veth"}, from(node1Pod2, "veth12ab"), from(client, "vet")},
	}
	clusterIPOnNode2 := snapshotOf(sourceIPApp(), onlyOnNode2)
	lbLocalOnNode2 := snapshotOf(sourceIPApp(withLoadBalancer, localPolicy), onlyOnNode2)
	for _, m := range modes {
		cfg := testConfig()
		cfg.DetectLocal = m.d
		for _, tc := range []struct {
			name string
			snap *endpoints.Snapshot
			pkt  iptables.Packet
			want string
		}{
			{"pod to a ClusterIP: not masqueraded", clusterIPOnNode2, m.pod(tcpTo(netip.Addr{}, clusterIP, 80)), "ACCEPT 10.244.2.6:8080"},
			{"a client that is not local to a ClusterIP: masqueraded", clusterIPOnNode2, m.other(tcpTo(netip.Addr{}, clusterIP, 80)), "ACCEPT 10.244.2.6:8080 masqueraded"},
			{"the node itself to a ClusterIP: masqueraded", clusterIPOnNode2, fromNode(tcpTo(node1IP, clusterIP, 80)), "ACCEPT 10.244.2.6:8080 masqueraded"},
			{"pod to the LB IP of a Local Service without a local endpoint: the remote endpoint", lbLocalOnNode2, m.pod(tcpTo(netip.Addr{}, lbIP, 80)), "ACCEPT 10.244.2.6:8080"},
			{"pod to the NodePort of that Service: the remote endpoint", lbLocalOnNode2, m.pod(tcpTo(netip.Addr{}, node1IP, nodePort)), "ACCEPT 10.244.2.6:8080"},
			{"a client that is not local to that LB IP: dropped", lbLocalOnNode2, m.other(tcpTo(netip.Addr{}, lbIP, 80)), "DROP 203.0.113.140:80"},
			{"the node itself to that LB IP: the remote endpoint, masqueraded", lbLocalOnNode2, fromNode(tcpTo(node1IP, lbIP, 80)), "ACCEPT 10.244.2.6:8080 masqueraded"},
		} {
			t.Run(m.name+", "+tc.name, func(t *testing.T) {
				got := trace(t, tc.snap, cfg, tc.pkt)
				if diff := cmp.Diff([]string{all(tc.want)}, got); diff != "" {
					t.Errorf("(-want +got):\n%s", diff)
				}
			})
		}
	}
}

func TestLocalhostNodePorts(t *testing.T) {
	all := func(s string) string { return s + " (p=1.000)" }
	lo := netip.MustParseAddr("127.0.0.1")
	fromLoopback := fromNode(tcpTo(lo, lo, nodePort))
	neighbour := tcpTo(netip.MustParseAddr("10.240.0.4"), lo, nodePort)
	neighbourToLocalService := tcpTo(netip.MustParseAddr("10.240.0.4"), lo, 9099)
	onNode2 := func(mods ...func(*endpoints.ServicePort)) *endpoints.Snapshot {
		return snapshotOf(sourceIPApp(append([]func(*endpoints.ServicePort){withNodePort}, mods...)...), onlyOnNode2)
	}
	tests := []struct {
		name string
		cfg  func(*Config)
		snap *endpoints.Snapshot
		pkt  iptables.Packet
		want []string
	}{
		{"on, Cluster policy: localhost reaches the endpoint, masqueraded",
			func(c *Config) { c.LocalhostNodePorts = true }, onNode2(), fromLoopback, []string{all("ACCEPT 10.244.2.6:8080 masqueraded")}},
		{"on, Local policy without a local endpoint: localhost reaches the remote endpoint, masqueraded (as upstream)",
			func(c *Config) { c.LocalhostNodePorts = true }, onNode2(localPolicy), fromLoopback, []string{all("ACCEPT 10.244.2.6:8080 masqueraded")}},
		{"on, --nodeport-addresses lists 127.0.0.1: served",
			func(c *Config) { c.LocalhostNodePorts, c.NodePortAddresses = true, []netip.Addr{node1IP, lo} }, onNode2(), fromLoopback, []string{all("ACCEPT 10.244.2.6:8080 masqueraded")}},
		{"on, --nodeport-addresses without loopback: untouched",
			func(c *Config) { c.LocalhostNodePorts, c.NodePortAddresses = true, []netip.Addr{node1IP} }, onNode2(), fromLoopback, []string{all("ACCEPT 127.0.0.1:30080")}},
		{"on, no endpoints at all: localhost is refused",
			func(c *Config) { c.LocalhostNodePorts = true }, snapshotOf(sourceIPApp(withNodePort), nil), fromLoopback, []string{all("REJECT 127.0.0.1:30080")}},
		{"off: localhost untouched",
			nil, onNode2(), fromLoopback, []string{all("ACCEPT 127.0.0.1:30080")}},
		{"off, --nodeport-addresses lists 127.0.0.1: still untouched",
			func(c *Config) { c.NodePortAddresses = []netip.Addr{node1IP, lo} }, onNode2(), fromLoopback, []string{all("ACCEPT 127.0.0.1:30080")}},
		{"on: a neighbour routing 127.0.0.1 to the node is not translated, and dropped (CVE-2020-8558)",
			func(c *Config) { c.LocalhostNodePorts = true }, onNode2(), neighbour, []string{all("DROP 127.0.0.1:30080")}},
		{"on: a neighbour reaching a service the node binds to 127.0.0.1: dropped",
			func(c *Config) { c.LocalhostNodePorts = true }, onNode2(), neighbourToLocalService, []string{all("DROP 127.0.0.1:9099")}},
		{"on: the node's own NodePort traffic on its address still served",
			func(c *Config) { c.LocalhostNodePorts = true }, onNode2(), fromNode(tcpTo(node1IP, node1IP, nodePort)), []string{all("ACCEPT 10.244.2.6:8080 masqueraded")}},
		{"on: a client outside still served on the node's address",
			func(c *Config) { c.LocalhostNodePorts = true }, onNode2(), tcpTo(client, node1IP, nodePort), []string{all("ACCEPT 10.244.2.6:8080 masqueraded")}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			if tc.cfg != nil {
				tc.cfg(&cfg)
			}
			if diff := cmp.Diff(tc.want, trace(t, tc.snap, cfg, tc.pkt)); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestLocalhostNodePortsRulesOnlyInIPv4(t *testing.T) {
	for _, tc := range []struct {
		name      string
		cfg       Config
		wantGuard bool
	}{
		{"IPv4, on", Config{Family: iptables.IPv4, LocalhostNodePorts: true}, true},
		{"IPv4, off", Config{Family: iptables.IPv4}, false},
		{"IPv6, on: ignored", Config{Family: iptables.IPv6, LocalhostNodePorts: true}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs := Build(snapshotOf(sourceIPApp(withNodePort), onlyOnNode2), tc.cfg)
			guard := rs.Chain("filter", ChainLocalnet) != nil
			jumps := slices.ContainsFunc(rs.Jumps, func(j iptables.Jump) bool { return j.Rule.Target() == ChainLocalnet })
			if guard != tc.wantGuard || jumps != tc.wantGuard {
				t.Errorf("chain %s: %v, jumps to it: %v; want %v", ChainLocalnet, guard, jumps, tc.wantGuard)
			}
			if tc.wantGuard && (rs.Jumps[0].Rule.Target() != ChainLocalnet || rs.Jumps[1].Rule.Target() != ChainLocalnet) {
				t.Errorf("the jumps to %s must come first (nothing may accept what it drops): %v", ChainLocalnet, rs.Jumps)
			}
		})
	}
}

func TestNodePortAddressesAndLoopback(t *testing.T) {
	local := []netip.Addr{netip.MustParseAddr("127.0.0.1"), node1IP, netip.IPv6Loopback(), netip.MustParseAddr("fd00::3")}
	all := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
	tests := []struct {
		name      string
		ranges    []netip.Prefix
		localhost bool
		want      []netip.Addr
	}{
		{"no ranges: nil (every local address)", nil, true, nil},
		{"every address, localhost NodePorts off: no loopback", all, false, []netip.Addr{node1IP, netip.MustParseAddr("fd00::3")}},
		{"every address, localhost NodePorts on: IPv4 loopback only", all, true, []netip.Addr{netip.MustParseAddr("127.0.0.1"), node1IP, netip.MustParseAddr("fd00::3")}},
		{"loopback ranges only, on", []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}, true, []netip.Addr{netip.MustParseAddr("127.0.0.1")}},
		{"IPv4 ranges only: every IPv6 address still serves, as upstream", []netip.Prefix{netip.MustParsePrefix("10.240.0.0/24")}, false,
			[]netip.Addr{node1IP, netip.MustParseAddr("fd00::3")}},
		{"IPv6 ranges only: every IPv4 address still serves, loopback with localhost NodePorts", []netip.Prefix{netip.MustParsePrefix("fd00::/64")}, true,
			[]netip.Addr{netip.MustParseAddr("127.0.0.1"), node1IP, netip.MustParseAddr("fd00::3")}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := NodePortAddresses(local, tc.ranges, tc.localhost)
			if diff := cmp.Diff(tc.want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
	for _, tc := range []struct {
		name   string
		on     bool
		fam    iptables.Family
		ranges []netip.Prefix
		want   bool
	}{
		{"on, IPv4, no ranges", true, iptables.IPv4, nil, true},
		{"on, IPv6: never", true, iptables.IPv6, nil, false},
		{"off", false, iptables.IPv4, nil, false},
		{"on, ranges covering 127.0.0.1", true, iptables.IPv4, []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}, true},
		{"on, IPv6 ranges only: IPv4 is every address, loopback too", true, iptables.IPv4, []netip.Prefix{netip.MustParsePrefix("fd00::/64")}, true},
		{"on, a loopback range", true, iptables.IPv4, []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}, true},
		{"on, ranges without loopback", true, iptables.IPv4, []netip.Prefix{netip.MustParsePrefix("10.240.0.0/16"), netip.MustParsePrefix("::/0")}, false},
	} {
		t.Run("LocalhostNodePorts "+tc.name, func(t *testing.T) {
			if got := LocalhostNodePorts(tc.on, tc.fam, tc.ranges); got != tc.want {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestIsLocalAgreesWithTheMatch(t *testing.T) {
	cidr := DetectLocal{Mode: DetectClusterCIDR, CIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}}
	bridge := DetectLocal{Mode: DetectBridgeInterface, BridgeInterface: "cni0"}
	prefix := DetectLocal{Mode: DetectInterfaceNamePrefix, InterfaceNamePrefix: "veth"}
	pod, client := netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("198.51.100.79")
	tests := []struct {
		name            string
		d               DetectLocal
		fam             iptables.Family
		src             netip.Addr
		iface           string
		local, detected bool
	}{
		{"cluster CIDR, a pod", cidr, iptables.IPv4, pod, "", true, true},
		{"cluster CIDR, a client outside", cidr, iptables.IPv4, client, "eth0", false, true},
		{"cluster CIDR, no IPv6 range: nothing detected", cidr, iptables.IPv6, netip.MustParseAddr("fd00::1"), "", false, false},
		{"bridge, on the bridge", bridge, iptables.IPv4, client, "cni0", true, true},
		{"bridge, the node's own packet has no interface", bridge, iptables.IPv4, pod, "", false, true},
		{"prefix, a pod's veth", prefix, iptables.IPv4, pod, "veth12ab", true, true},
		{"prefix, another interface", prefix, iptables.IPv4, pod, "eth0", false, true},
		{"no detection", DetectLocal{}, iptables.IPv4, pod, "", false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			local, detected := tc.d.IsLocal(tc.fam, tc.src, tc.iface)
			if local != tc.local || detected != tc.detected {
				t.Errorf("IsLocal = %v, %v; want %v, %v", local, detected, tc.local, tc.detected)
			}
		})
	}
}
