package rulestest

import (
	"net/netip"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// Setting is one way a node's settings shape the rules beyond its
// addresses: a --detect-local-mode, localhost NodePorts.
type Setting struct {
	Name  string
	Apply func(*rules.Config)
}

// EverySetting lists a Setting for every construct that node settings add
// to the rules, so that kernel tests put each through the real
// iptables-restore together with every shape. The CIDR modes keep the
// ranges of the Config they change; the interface modes detect the named
// bridge or interface prefix.
func EverySetting(bridge, ifPrefix string) []Setting {
	mode := func(m string) func(*rules.Config) {
		return func(c *rules.Config) {
			c.DetectLocal.Mode = m
			c.DetectLocal.BridgeInterface, c.DetectLocal.InterfaceNamePrefix = bridge, ifPrefix
		}
	}
	return []Setting{
		{"detect-local-mode ClusterCIDR", mode(rules.DetectClusterCIDR)},
		{"detect-local-mode NodeCIDR", mode(rules.DetectNodeCIDR)},
		{"detect-local-mode BridgeInterface", mode(rules.DetectBridgeInterface)},
		{"detect-local-mode InterfaceNamePrefix", mode(rules.DetectInterfaceNamePrefix)},
		{"no local detection", func(c *rules.Config) { c.DetectLocal = rules.DetectLocal{} }},
		{"localhost NodePorts", func(c *rules.Config) { c.LocalhostNodePorts = true }},
		{"localhost NodePorts on listed addresses", func(c *rules.Config) {
			c.LocalhostNodePorts = true
			c.NodePortAddresses = append(append(c.NodePortAddresses, c.NodeIPs...), loopback(c))
		}},
	}
}

// loopback is the loopback address of the Config's family.
func loopback(c *rules.Config) netip.Addr {
	if c.Family == iptables.IPv6 {
		return netip.IPv6Loopback()
	}
	return netip.AddrFrom4([4]byte{127, 0, 0, 1})
}

// Example gives, for fam, addresses for every shape and the Config of the
// node they are built for (node1 at 10.240.0.3 or fd00:240::3, cluster
// CIDR 10.244.0.0/16 and fd00:244::/32, --random-fully), so that kernel
// tests that need no traffic agree on one example.
func Example(fam iptables.Family) (Addrs, rules.Config) {
	a := Addrs{
		ServiceBase: netip.MustParseAddr("10.96.10.1"), LoadBalancerBase: netip.MustParseAddr("203.0.113.10"),
		ExternalBase: netip.MustParseAddr("203.0.113.100"), NodePortBase: 30100,
		LocalPod: netip.MustParseAddr("10.244.1.5"), RemotePod: netip.MustParseAddr("10.244.2.6"),
		TCPPort: 8080, UDPPort: 8081, Admitted: netip.MustParsePrefix("198.51.100.0/24"), Zone: "zone-a",
	}
	cfg := rules.Config{Family: fam, DetectLocal: rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:244::/32")}}, NodeIPs: []netip.Addr{netip.MustParseAddr("10.240.0.3")}, RandomFully: true}
	if fam == iptables.IPv6 {
		a.ServiceBase, a.LoadBalancerBase, a.ExternalBase = netip.MustParseAddr("fd00:96::10:1"), netip.MustParseAddr("fd00:203::10"), netip.MustParseAddr("fd00:203::100")
		a.LocalPod, a.RemotePod, a.Admitted = netip.MustParseAddr("fd00:244:1::5"), netip.MustParseAddr("fd00:244:2::6"), netip.MustParsePrefix("fd00:198::/64")
		cfg.NodeIPs = []netip.Addr{netip.MustParseAddr("fd00:240::3")}
	}
	return a, cfg
}
