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
