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
//
// TCP gets one kind of help, only where the rules may have been missing (at
// start-up, after another program flushed them, and at frontends that are
// new in this sync): an entry to a TCP frontend that was never translated. A
// SYN sent while the rules were not there leaves such an entry, UNREPLIED in
// SYN_SENT for two minutes; the client's retransmissions, and any later
// connection that happens to reuse its source port, match it and so skip the
// nat table, and go nowhere even though the rules are in place (WithTCP).
// Translated TCP entries are never touched.
package conntrack

import (
	"maps"
	"net/netip"
	"slices"

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
	// Replied says the reply direction has been seen (IPS_SEEN_REPLY). A
	// Table passes TCP entries only while they have not been: an
	// untranslated SYN is never answered.
	Replied bool
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
	ReasonProtocol     = "a protocol not judged (TCP outside a sweep made WithTCP)"
	ReasonNotService   = "not to a Service frontend"
	ReasonServing      = "to a serving endpoint"
	ReasonGone         = "to an endpoint that is not serving"
	ReasonUntranslated = "never translated (sent while the Service had no endpoint)"
	ReasonDeleted      = "to a Service deleted since the last reconciliation"
	// ReasonTCPUntranslated: a TCP entry to a frontend that skipped the
	// nat table because the rules were missing when it began.
	ReasonTCPUntranslated = "TCP, never translated (sent while the rules were missing)"
	// ReasonTCPTranslated: a translated TCP connection, left to end on its
	// own as kube-proxy leaves it.
	ReasonTCPTranslated = "TCP, translated (left alone)"
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
	// tcpIPs and tcpNodePorts are the TCP frontends, only in Frontends made
	// by WithTCP; nil otherwise.
	tcpIPs       map[netip.AddrPort]endpoints.ServicePortName
	tcpNodePorts map[uint16]endpoints.ServicePortName
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

// WithTCP returns f plus the TCP frontends of snap's service ports named in
// only, or of all its TCP service ports when only is nil (ClusterIPs,
// external IPs, load balancer IPs, and NodePorts on f's node addresses), for
// a sweep where the rules may have been missing: Judge then also deletes the
// TCP entries to those frontends that were never translated. f is not
// changed. It costs a map of the frontends, so it is made only for such a
// sweep, never kept.
func (f *Frontends) WithTCP(snap *endpoints.Snapshot, only []endpoints.ServicePortName) *Frontends {
	out := *f
	out.tcpIPs = map[netip.AddrPort]endpoints.ServicePortName{}
	out.tcpNodePorts = map[uint16]endpoints.ServicePortName{}
	if snap == nil {
		return &out
	}
	names := only
	if names == nil {
		for name := range snap.Services {
			names = append(names, name)
		}
	}
	for _, name := range names {
		sp := snap.Services[name]
		if sp == nil || sp.Protocol != endpoints.TCP {
			continue
		}
		for _, list := range [][]netip.Addr{sp.ClusterIPs, sp.ExternalIPs, sp.LoadBalancerIPs} {
			for _, a := range list {
				out.tcpIPs[netip.AddrPortFrom(a.Unmap(), uint16(sp.Port))] = name
			}
		}
		if sp.NodePort != 0 {
			out.tcpNodePorts[uint16(sp.NodePort)] = name
		}
	}
	return &out
}

// NewTCPFrontends names the TCP service ports of cur, among those it marks
// changed, that have a frontend prev's rules did not (a new Service, port or
// address). Until the sync that programs them, a client's SYN to such a
// frontend finds no rule and leaves an untranslated entry: a client that
// connects to a Service the moment it is created (a deployment script, a
// test) would otherwise see every retransmission of its SYN go nowhere for
// the two minutes of SYN_SENT, rules or not. A nil prev means every port.
func NewTCPFrontends(prev, cur *endpoints.Snapshot) []endpoints.ServicePortName {
	var out []endpoints.ServicePortName
	for name := range cur.Changed {
		sp := cur.Services[name]
		if sp == nil || sp.Protocol != endpoints.TCP {
			continue
		}
		var old *endpoints.ServicePort
		if prev != nil {
			old = prev.Services[name]
		}
		if old == nil || !sameFrontends(old, sp) {
			out = append(out, name)
		}
	}
	return out
}

// sameFrontends says whether two versions of a service port are reached at
// the same addresses and ports.
func sameFrontends(a, b *endpoints.ServicePort) bool {
	return a.Port == b.Port && a.NodePort == b.NodePort && slices.Equal(a.ClusterIPs, b.ClusterIPs) &&
		slices.Equal(a.ExternalIPs, b.ExternalIPs) && slices.Equal(a.LoadBalancerIPs, b.LoadBalancerIPs)
}

// judgeTCP decides about a TCP entry: stale only when it goes to a TCP
// frontend untranslated.
func (f *Frontends) judgeTCP(e *Entry) Verdict {
	dst := netip.AddrPortFrom(e.OrigDst.Addr().Unmap(), e.OrigDst.Port())
	name, ok := f.tcpIPs[dst]
	if !ok {
		if _, local := f.nodeAddrs[dst.Addr()]; local {
			name, ok = f.tcpNodePorts[dst.Port()]
		}
	}
	if !ok {
		return Verdict{Reason: ReasonNotService}
	}
	if netip.AddrPortFrom(e.ReplySrc.Addr().Unmap(), e.ReplySrc.Port()) == dst {
		return Verdict{Stale: true, Reason: ReasonTCPUntranslated, Service: name}
	}
	return Verdict{Reason: ReasonTCPTranslated, Service: name}
}

// Judge decides about one entry. It is pure: the same Frontends and entry
// always give the same verdict.
func (f *Frontends) Judge(e *Entry) Verdict {
	if e.Proto == ProtoTCP && f.tcpIPs != nil {
		return f.judgeTCP(e)
	}
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
	out := *f
	out.ips = withDeleted(f.ips, prev.ips)
	out.nodePorts = withDeleted(f.nodePorts, prev.nodePorts)
	return &out
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

// Protocols lists the protocols of f's frontends (ProtoUDP, ProtoSCTP, and
// ProtoTCP in Frontends made by WithTCP): entries of no other protocol can
// be stale.
func (f *Frontends) Protocols() []uint8 {
	has := map[uint8]bool{ProtoTCP: len(f.tcpIPs)+len(f.tcpNodePorts) > 0}
	for k := range f.ips {
		has[k.proto] = true
	}
	for k := range f.nodePorts {
		has[k.proto] = true
	}
	var out []uint8
	for _, p := range []uint8{ProtoTCP, ProtoUDP, ProtoSCTP} {
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
