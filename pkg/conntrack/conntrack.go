// Package conntrack removes UDP conntrack entries that rule changes made
// stale. TCP needs no help (a connection to a removed endpoint fails and the
// client reconnects), but a UDP "connection" is only conntrack's memory of
// a 5-tuple: as long as a client keeps sending, it keeps going to the
// endpoint it was first sent to, even after that endpoint left the Service.
package conntrack

import (
	"fmt"
	"net/netip"
	"sort"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
)

// Flow selects the UDP conntrack entries to delete. A zero field matches
// anything.
type Flow struct {
	// OrigDst is the address the client sent to (a Service IP); zero for a
	// NodePort, which any local address may carry.
	OrigDst netip.Addr
	// OrigDstPort is the port the client sent to.
	OrigDstPort uint16
	// ReplySrc is the endpoint the entry was translated to.
	ReplySrc netip.Addr
	// IPv6 says which family's table to look in.
	IPv6 bool
}

// String is the conntrack(8) spelling, for logs.
func (f Flow) String() string {
	s := "-p udp"
	if f.OrigDst.IsValid() {
		s += " --orig-dst " + f.OrigDst.String()
	}
	s += fmt.Sprintf(" --orig-port-dst %d", f.OrigDstPort)
	if f.ReplySrc.IsValid() {
		s += " --reply-src " + f.ReplySrc.String()
	}
	return s
}

// Stale lists the entries that the change from prev (the last snapshot whose
// rules were applied; nil at start) to cur leaves pointing the wrong way:
//   - for an endpoint that no UDP service port uses any more, the entries
//     translated to it from that port's addresses and NodePort;
//   - for a UDP service port that had no endpoint and now has one, every
//     entry to its addresses and NodePort (packets sent while it had none
//     left entries that were never translated).
func Stale(prev, cur *endpoints.Snapshot) []Flow {
	if prev == nil {
		prev = &endpoints.Snapshot{}
	}
	seen := map[Flow]bool{}
	var out []Flow
	add := func(f Flow) {
		if !seen[f] {
			seen[f] = true
			out = append(out, f)
		}
	}
	for name, before := range prev.Services {
		if before.Protocol != endpoints.UDP {
			continue
		}
		after := cur.Services[name]
		now := map[netip.AddrPort]bool{}
		if after != nil && after.Protocol == endpoints.UDP {
			for _, ep := range cur.Endpoints[name] {
				if usable(ep) {
					now[netip.AddrPortFrom(ep.IP, uint16(ep.Port))] = true
				}
			}
		}
		for _, ep := range prev.Endpoints[name] {
			if !usable(ep) || now[netip.AddrPortFrom(ep.IP, uint16(ep.Port))] {
				continue
			}
			for _, f := range flowsTo(before) {
				if f.IPv6 == ep.IP.Is6() && !ep.IP.Is4In6() {
					f.ReplySrc = ep.IP
					add(f)
				}
			}
		}
	}
	for name, after := range cur.Services {
		if after.Protocol != endpoints.UDP || !anyUsable(cur.Endpoints[name]) {
			continue
		}
		if before := prev.Services[name]; before != nil && before.Protocol == endpoints.UDP && anyUsable(prev.Endpoints[name]) {
			continue
		}
		for _, f := range flowsTo(after) {
			add(f)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out
}

func usable(ep endpoints.Endpoint) bool { return ep.Ready || (ep.Serving && ep.Terminating) }

func anyUsable(eps []endpoints.Endpoint) bool {
	for _, ep := range eps {
		if usable(ep) {
			return true
		}
	}
	return false
}

// flowsTo gives the entry points of a service port: each of its addresses
// with its port, and its NodePort in each family it has a ClusterIP of.
func flowsTo(s *endpoints.ServicePort) []Flow {
	var out []Flow
	for _, list := range [][]netip.Addr{s.ClusterIPs, s.ExternalIPs, s.LoadBalancerIPs} {
		for _, a := range list {
			a = a.Unmap()
			out = append(out, Flow{OrigDst: a, OrigDstPort: uint16(s.Port), IPv6: a.Is6()})
		}
	}
	if s.NodePort != 0 {
		for _, c := range s.ClusterIPs {
			out = append(out, Flow{OrigDstPort: uint16(s.NodePort), IPv6: c.Unmap().Is6()})
		}
	}
	return out
}

// matcher adapts a Flow to netlink's filter interface.
type matcher Flow

func (m matcher) MatchConntrackFlow(f *netlink.ConntrackFlow) bool {
	if f.Forward.Protocol != unix.IPPROTO_UDP || f.Forward.DstPort != m.OrigDstPort {
		return false
	}
	if m.OrigDst.IsValid() && !addrIs(f.Forward.DstIP, m.OrigDst) {
		return false
	}
	return !m.ReplySrc.IsValid() || addrIs(f.Reverse.SrcIP, m.ReplySrc)
}

func addrIs(ip []byte, a netip.Addr) bool {
	b, ok := netip.AddrFromSlice(ip)
	return ok && b.Unmap() == a.Unmap()
}

// Delete removes the entries the flows select from the conntrack table of
// the calling thread's network namespace, and says how many went.
func Delete(flows []Flow) (uint, error) {
	var v4, v6 []netlink.CustomConntrackFilter
	for _, f := range flows {
		if f.IPv6 {
			v6 = append(v6, matcher(f))
		} else {
			v4 = append(v4, matcher(f))
		}
	}
	var total uint
	for _, fam := range []struct {
		family  netlink.InetFamily
		filters []netlink.CustomConntrackFilter
	}{{unix.AF_INET, v4}, {unix.AF_INET6, v6}} {
		if len(fam.filters) == 0 {
			continue
		}
		n, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, fam.family, fam.filters...)
		total += n
		if err != nil {
			return total, fmt.Errorf("delete stale UDP conntrack entries: %w", err)
		}
	}
	return total, nil
}
