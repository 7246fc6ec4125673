package main

import (
	"fmt"
	"net/netip"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/vishvananda/netlink"
)

// localAddresses lists the node's addresses of a family, leaving out IPv6
// link-local ones (they are never a Service's or NodePort's address).
func localAddresses(fam iptables.Family) ([]netip.Addr, error) {
	nf := netlink.FAMILY_V4
	if fam == iptables.IPv6 {
		nf = netlink.FAMILY_V6
	}
	list, err := netlink.AddrList(nil, nf)
	if err != nil {
		return nil, fmt.Errorf("list %s addresses: %w", fam, err)
	}
	var out []netip.Addr
	for _, a := range list {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLinkLocalUnicast() || (fam == iptables.IPv6 && ip.IsLoopback()) {
			continue
		}
		out = append(out, ip)
	}
	return out, nil
}
