// Package explain answers, for one node, "what happens to a packet from A
// to B, and why": the Service and port it reaches, the policies that
// decided where it may go, the endpoints it may go to with their
// probabilities, whether it is masqueraded, and what finally happens to it.
// The candidates and the outcome come from tracing the rules the kernel
// holds (iptables-save of each family), so the answer is what the kernel
// does; the reasons come from the node's view of the cluster through
// pkg/rules' own decisions. It also compares the kernel's rules with what
// miniproxy would write for that view and names the chains that differ.
//
// It is pure: the view and the kernel's rules in, the explanation out. The
// daemon (/debug/trace) and the `miniproxy explain` command gather both.
package explain

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// View is the node's view of the cluster: everything miniproxy builds its
// rules from.
type View struct {
	// Snapshot is the cluster state (the last synced one on a daemon).
	Snapshot *endpoints.Snapshot
	// Configs holds the rules.Config of each family the node programs.
	Configs map[iptables.Family]rules.Config
	// LocalAddrs are the node's addresses, both families: they decide
	// addrtype LOCAL and whether a packet is for the node or forwarded.
	LocalAddrs []netip.Addr
}

// Kernel holds the rules the kernel has, per family, as read from
// iptables-save and ip6tables-save (iptables.ParseSave(...).State()). A
// family missing from it is not explained and not compared.
type Kernel map[iptables.Family]iptables.State

// Query is the packet to explain: the first packet of a new connection.
type Query struct {
	Src      netip.Addr
	Dst      netip.AddrPort
	Protocol endpoints.Protocol
	// FromNode says the node itself sends it (a process on the node, or
	// a pod on the host network); otherwise it arrives from a network
	// (another host, a pod of this node).
	FromNode bool
	// InIface is the interface a packet from a network arrives on, which
	// the interface modes of --detect-local-mode look at ("" for none).
	InIface string
}

// ParseQuery reads a query as the command line and /debug/trace take it:
// addresses, a port, and tcp, udp or sctp in any case ("" is tcp).
func ParseQuery(src, dst, port, proto string, fromNode bool) (Query, error) {
	s, err := netip.ParseAddr(src)
	if err != nil {
		return Query{}, fmt.Errorf("source %q: %w", src, err)
	}
	d, err := netip.ParseAddr(dst)
	if err != nil {
		return Query{}, fmt.Errorf("destination %q: %w", dst, err)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return Query{}, fmt.Errorf("port %q: want 1..65535", port)
	}
	if iptables.FamilyOf(s) != iptables.FamilyOf(d) {
		return Query{}, fmt.Errorf("source %s and destination %s are of different families", s, d)
	}
	q := Query{Src: s.Unmap(), Dst: netip.AddrPortFrom(d.Unmap(), uint16(p)), FromNode: fromNode}
	switch strings.ToUpper(proto) {
	case "", "TCP":
		q.Protocol = endpoints.TCP
	case "UDP":
		q.Protocol = endpoints.UDP
	case "SCTP":
		q.Protocol = endpoints.SCTP
	default:
		return Query{}, fmt.Errorf("protocol %q: want tcp, udp or sctp", proto)
	}
	return q, nil
}

// ParseDestination reads "ADDR:PORT/PROTO" (PROTO optional, tcp by
// default; IPv6 as [ADDR]:PORT), the form `miniproxy explain --dst` takes,
// into ParseQuery's address, port and protocol.
func ParseDestination(s string) (addr, port, proto string, err error) {
	hostPort, proto, _ := strings.Cut(s, "/")
	ap, err := netip.ParseAddrPort(hostPort)
	if err != nil {
		return "", "", "", fmt.Errorf("destination %q: want ADDR:PORT[/tcp|udp|sctp]: %w", s, err)
	}
	return ap.Addr().String(), strconv.Itoa(int(ap.Port())), proto, nil
}

// Services is the daemon's view as /debug/services serves it: enough for a
// client to explain offline (View gives it back).
type Services struct {
	Node endpoints.Node `json:"node"`
	// LocalAddresses are the node's addresses, both families.
	LocalAddresses []netip.Addr `json:"localAddresses"`
	// Configs has one entry per family the node programs.
	Configs []rules.Config `json:"configs"`
	// Services lists every service port, sorted by name, with its
	// endpoints.
	Services []ServicePort `json:"services"`
}

// ServicePort is one service port of Services with its endpoints.
type ServicePort struct {
	endpoints.ServicePort
	Endpoints []endpoints.Endpoint `json:"endpoints"`
}

// NewServices gives v in the form /debug/services serves.
func NewServices(v View) Services {
	out := Services{LocalAddresses: v.LocalAddrs, Services: []ServicePort{}}
	for _, fam := range families(v) {
		out.Configs = append(out.Configs, v.Configs[fam])
	}
	if v.Snapshot == nil {
		return out
	}
	out.Node = v.Snapshot.Node
	for _, name := range v.Snapshot.SortedNames() {
		eps := v.Snapshot.Endpoints[name]
		if eps == nil {
			eps = []endpoints.Endpoint{}
		}
		out.Services = append(out.Services, ServicePort{ServicePort: *v.Snapshot.Services[name], Endpoints: eps})
	}
	return out
}

// View gives the view s describes.
func (s Services) View() View {
	snap := &endpoints.Snapshot{
		Node:      s.Node,
		Services:  map[endpoints.ServicePortName]*endpoints.ServicePort{},
		Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{},
	}
	for _, sp := range s.Services {
		svc := sp.ServicePort
		snap.Services[svc.Name] = &svc
		if len(sp.Endpoints) > 0 {
			snap.Endpoints[svc.Name] = sp.Endpoints
		}
	}
	v := View{Snapshot: snap, Configs: map[iptables.Family]rules.Config{}, LocalAddrs: s.LocalAddresses}
	for _, c := range s.Configs {
		v.Configs[c.Family] = c
	}
	return v
}
