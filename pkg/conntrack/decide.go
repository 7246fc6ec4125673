// Package conntrack keeps the kernel's conntrack table in step with the
// Services. TCP needs no help (a connection to a removed endpoint fails and
// the client reconnects), but a UDP or SCTP "connection" is only conntrack's
// memory of a 5-tuple: as long as a client keeps sending, its packets go to
// the endpoint they were first translated to, even after that endpoint left
// the Service, and packets sent while a Service had no endpoint stay
// untranslated after it got one.
//
// The reconciler reads the kernel's table instead of guessing from what
// changed: every UDP and SCTP entry whose original destination is a Service
// frontend (ClusterIP, external IP, load balancer IP, or a NodePort on a
// node address that serves NodePorts) and whose reply source (the DNAT
// target) is not a serving endpoint of that service port is deleted. The
// decision (Frontends.Judge) is pure; the kernel is behind Table.
package conntrack

import (
	"maps"
	"net/netip"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// IP protocol numbers of the entries the reconciler looks at.
const (
	ProtoTCP  uint8 = 6
	ProtoUDP  uint8 = 17
	ProtoSCTP uint8 = 132
)

// Entry is one conntrack entry, as much of it as the decision reads.
type Entry struct {
	// Proto is the IP protocol number (ProtoUDP, ProtoSCTP, ...).
	Proto uint8
	// OrigSrc and OrigDst are the tuple the first packet carried: the
	// client and the address it sent to.
	OrigSrc, OrigDst netip.AddrPort
	// ReplySrc and ReplyDst are the tuple a reply carries: ReplySrc is the
	// DNAT target (an endpoint), or OrigDst for an untranslated entry.
	ReplySrc, ReplyDst netip.AddrPort
}

// Verdict is what Judge decided about one entry, and why.
type Verdict struct {
	Stale bool
	// Reason is one of the Reason constants.
	Reason string
	// Service names the service port whose frontend the entry goes to
	// (zero when it goes to none).
	Service endpoints.ServicePortName
}

// Why an entry is kept or deleted.
const (
	ReasonProtocol     = "not UDP or SCTP"
	ReasonNotService   = "not to a Service frontend"
	ReasonServing      = "to a serving endpoint"
	ReasonGone         = "to an endpoint that is not serving"
	ReasonUntranslated = "never translated (sent while the Service had no endpoint)"
	ReasonDeleted      = "to a Service deleted since the last reconciliation"
)

type frontend struct {
	proto uint8
	dst   netip.AddrPort
}

type nodePort struct {
	proto uint8
	port  uint16
}

// backends are the serving endpoints of the service port(s) behind one
// frontend.
type backends struct {
	service endpoints.ServicePortName
	serving map[netip.AddrPort]struct{}
	// deleted marks the frontend of a service port deleted since the
	// last reconciliation (Since).
	deleted bool
}

// Frontends is what the reconciler knows of a snapshot: for each UDP or
// SCTP frontend, the endpoints that serve it. Build it with NewFrontends;
// it is never modified afterwards.
type Frontends struct {
	ips       map[frontend]*backends
	nodePorts map[nodePort]*backends
	// nodeAddrs are the node addresses that serve NodePorts.
	nodeAddrs map[netip.Addr]struct{}
}

// NewFrontends collects the UDP and SCTP frontends of snap and their serving
// endpoints. nodePortAddrs are, per family, the node's addresses on which
// NodePorts are translated; entries to a NodePort on any other address are
// not miniproxy's and are never judged.
//
// An endpoint counts while it is serving, terminating or not: a flow to an
// endpoint that is shutting down gracefully keeps it, as a TCP connection
// would, and the rules use such endpoints as a fallback.
func NewFrontends(snap *endpoints.Snapshot, nodePortAddrs map[iptables.Family][]netip.Addr) *Frontends {
	f := &Frontends{
		ips:       map[frontend]*backends{},
		nodePorts: map[nodePort]*backends{},
		nodeAddrs: map[netip.Addr]struct{}{},
	}
	for _, addrs := range nodePortAddrs {
		for _, a := range addrs {
			f.nodeAddrs[a.Unmap()] = struct{}{}
		}
	}
	if snap == nil {
		return f
	}
	for name, sp := range snap.Services {
		proto := protoNumber(sp.Protocol)
		if proto == 0 {
			continue
		}
		b := &backends{service: name, serving: map[netip.AddrPort]struct{}{}}
		for _, ep := range snap.Endpoints[name] {
			if ep.Serving || ep.Ready {
				b.serving[netip.AddrPortFrom(ep.IP.Unmap(), uint16(ep.Port))] = struct{}{}
			}
		}
		for _, list := range [][]netip.Addr{sp.ClusterIPs, sp.ExternalIPs, sp.LoadBalancerIPs} {
			for _, a := range list {
				key := frontend{proto, netip.AddrPortFrom(a.Unmap(), uint16(sp.Port))}
				f.ips[key] = merge(f.ips[key], b)
			}
		}
		if sp.NodePort != 0 {
			key := nodePort{proto, uint16(sp.NodePort)}
			f.nodePorts[key] = merge(f.nodePorts[key], b)
		}
	}
	return f
}

// merge joins two service ports that share a frontend (two Services may
// list the same external IP and port): an entry to an endpoint of either is
// kept.
func merge(have, add *backends) *backends {
	if have == nil {
		return add
	}
	out := &backends{service: have.service, serving: maps.Clone(have.serving)}
	if endpoints.LessName(add.service, have.service) {
		out.service = add.service
	}
	maps.Copy(out.serving, add.serving)
	return out
}

func protoNumber(p endpoints.Protocol) uint8 {
	switch p {
	case endpoints.UDP:
		return ProtoUDP
	case endpoints.SCTP:
		return ProtoSCTP
	}
	return 0
}

// Judge decides about one entry. It is pure: the same Frontends and entry
// always give the same verdict.
func (f *Frontends) Judge(e *Entry) Verdict {
	if e.Proto != ProtoUDP && e.Proto != ProtoSCTP {
		return Verdict{Reason: ReasonProtocol}
	}
	dst := netip.AddrPortFrom(e.OrigDst.Addr().Unmap(), e.OrigDst.Port())
	b := f.ips[frontend{e.Proto, dst}]
	if b == nil {
		if _, local := f.nodeAddrs[dst.Addr()]; local {
			b = f.nodePorts[nodePort{e.Proto, dst.Port()}]
		}
	}
	if b == nil {
		return Verdict{Reason: ReasonNotService}
	}
	to := netip.AddrPortFrom(e.ReplySrc.Addr().Unmap(), e.ReplySrc.Port())
	if b.deleted {
		if to == dst {
			return Verdict{Reason: ReasonNotService}
		}
		return Verdict{Stale: true, Reason: ReasonDeleted, Service: b.service}
	}
	if _, ok := b.serving[to]; ok {
		return Verdict{Reason: ReasonServing, Service: b.service}
	}
	if to == dst {
		return Verdict{Stale: true, Reason: ReasonUntranslated, Service: b.service}
	}
	return Verdict{Stale: true, Reason: ReasonGone, Service: b.service}
}

// Since returns f plus the frontends of prev (the last frontends the table
// was reconciled against) that f lacks, with no serving endpoint: entries
// to a Service deleted since then go too, and are not left to reach the
// old endpoint for as long as the client keeps sending. f and prev are not
// changed. Only translated entries are judged at those frontends: the
// address may be used for something else now.
func (f *Frontends) Since(prev *Frontends) *Frontends {
	if prev == nil {
		return f
	}
	return &Frontends{
		ips:       withDeleted(f.ips, prev.ips),
		nodePorts: withDeleted(f.nodePorts, prev.nodePorts),
		nodeAddrs: f.nodeAddrs,
	}
}

// withDeleted returns cur plus the keys of prev it lacks, marked deleted
// (cur itself when there are none).
func withDeleted[K comparable](cur, prev map[K]*backends) map[K]*backends {
	out, cloned := cur, false
	for k, b := range prev {
		if _, ok := cur[k]; ok {
			continue
		}
		if !cloned {
			out, cloned = maps.Clone(cur), true
		}
		out[k] = &backends{service: b.service, deleted: true}
	}
	return out
}

// Protocols lists the protocols (ProtoUDP, ProtoSCTP) of f's frontends:
// entries of no other protocol can be stale.
func (f *Frontends) Protocols() []uint8 {
	has := map[uint8]bool{}
	for k := range f.ips {
		has[k.proto] = true
	}
	for k := range f.nodePorts {
		has[k.proto] = true
	}
	var out []uint8
	for _, p := range []uint8{ProtoUDP, ProtoSCTP} {
		if has[p] {
			out = append(out, p)
		}
	}
	return out
}

// SameServices says whether f and g have the same frontends with the same
// serving endpoints; then a table reconciled against f needs no work for g
// (node addresses are left out: a new address makes no entry stale).
func (f *Frontends) SameServices(g *Frontends) bool {
	if f == nil || g == nil {
		return f == g
	}
	return maps.EqualFunc(f.ips, g.ips, sameBackends) && maps.EqualFunc(f.nodePorts, g.nodePorts, sameBackends)
}

func sameBackends(a, b *backends) bool {
	return a.service == b.service && a.deleted == b.deleted && maps.Equal(a.serving, b.serving)
}
