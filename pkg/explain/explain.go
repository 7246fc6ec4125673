package explain

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// The ways a packet reaches a Service (Service.Via), as the rule comments
// name them.
const (
	ViaClusterIP    = "cluster IP"
	ViaNodePort     = "nodePort"
	ViaLoadBalancer = "loadbalancer IP"
	ViaExternalIP   = "external IP"
)

// The final outcomes (Outcome.Verdict).
const (
	VerdictDNAT   = "DNAT"   // sent to an endpoint
	VerdictReject = "REJECT" // refused at once
	VerdictDrop   = "DROP"   // dropped, the client times out
	VerdictAccept = "ACCEPT" // passed on unchanged
	VerdictMixed  = "MIXED"  // several of the above, by chance (never from miniproxy's own rules)
)

// Explanation is the answer for one query, in the order an operator reads
// it. Its JSON is what `-o json` and /debug/trace?o=json give.
type Explanation struct {
	Query QueryInfo `json:"query"`
	// Service is the service port the packet reaches; nil when it is not
	// a Service's address and port.
	Service *Service `json:"service"`
	// Policies are the settings that decided where it may go, in order.
	Policies []Policy `json:"policies"`
	// Candidates are the endpoints the kernel's rules may send it to.
	Candidates []Candidate `json:"candidates"`
	Masquerade Masquerade  `json:"masquerade"`
	Outcome    Outcome     `json:"outcome"`
	// Drift names the chains whose kernel rules differ from what
	// miniproxy would write now (every family, not only the packet's).
	Drift []ChainDrift `json:"drift"`
	// Warnings are what the operator should not miss: drift, a kernel
	// whose answer differs from miniproxy's rules, a family not read.
	Warnings []string `json:"warnings"`
}

// QueryInfo is the query as explained.
type QueryInfo struct {
	Src      string `json:"src"`
	Dst      string `json:"dst"`
	Protocol string `json:"protocol"`
	FromNode bool   `json:"fromNode"`
	InIface  string `json:"inIface,omitempty"`
	Family   string `json:"family"`
}

// Service is the service port a packet reaches, and how.
type Service struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Port is the port's name ("" for a single unnamed port).
	Port     string `json:"port,omitempty"`
	Protocol string `json:"protocol"`
	// Via is one of the Via* values; Address is the address and port
	// matched (for a NodePort, the node's address and the NodePort).
	Via     string `json:"via"`
	Address string `json:"address"`
}

// String gives "ns/name:port".
func (s Service) String() string {
	return endpoints.ServicePortName{Namespace: s.Namespace, Name: s.Name, Port: s.Port}.String()
}

// Policy is one setting that applied, with the field that holds it and what
// it did to this packet.
type Policy struct {
	Field  string `json:"field"`
	Value  string `json:"value"`
	Effect string `json:"effect"`
}

// Candidate is an endpoint the kernel's rules may send the packet to.
type Candidate struct {
	Endpoint    string  `json:"endpoint"`
	Probability float64 `json:"probability"`
	// Masquerade says the source is replaced by the node's address on
	// the way to this endpoint.
	Masquerade bool `json:"masquerade"`
	// Node, Zone and the conditions are the EndpointSlice's; Known is
	// false for an address no endpoint of the Service has (drift).
	Known       bool   `json:"known"`
	Node        string `json:"node,omitempty"`
	Zone        string `json:"zone,omitempty"`
	Local       bool   `json:"local"`
	Ready       bool   `json:"ready"`
	Serving     bool   `json:"serving"`
	Terminating bool   `json:"terminating"`
}

// Masquerade says whether the endpoint sees the node's address instead of
// the client's, and why.
type Masquerade struct {
	// Masqueraded is the kernel's verdict (for a DNAT: on the way to every
	// candidate; Partly when only to some, the hairpin case).
	Masqueraded bool   `json:"masqueraded"`
	Partly      bool   `json:"partly,omitempty"`
	Reason      string `json:"reason"`
}

// Outcome is what finally happens to the packet.
type Outcome struct {
	// Verdict is one of the Verdict* values.
	Verdict string `json:"verdict"`
	// Summary says it in a sentence.
	Summary string `json:"summary"`
	// Rules are the kernel's rules that decided ("table chain #n: rule"),
	// one per distinct way the packet goes.
	Rules []string `json:"rules"`
}

// Explain answers q with the kernel's rules k and the view v; see
// Explainer.Explain. To answer many queries against one view and one
// reading of the kernel, make an Explainer once.
func Explain(v View, k Kernel, q Query) (*Explanation, error) {
	x, err := New(v, k)
	if err != nil {
		return nil, err
	}
	return x.Explain(q)
}

// Explainer answers queries against one view and one reading of the
// kernel's rules. It compares them once (the drift) and loads miniproxy's
// own rules for the view once, to check each answer of the kernel against
// theirs. It is not modified by Explain, so it may answer concurrently.
type Explainer struct {
	view   View
	kernel Kernel
	drift  []ChainDrift
	// model traces miniproxy's rules for the view, per family; modelErr
	// says why a family's could not be loaded.
	model    map[iptables.Family]*iptables.Tracer
	modelErr map[iptables.Family]error
}

// New prepares answers for v and k; it fails only without a snapshot.
func New(v View, k Kernel) (*Explainer, error) {
	if v.Snapshot == nil {
		return nil, fmt.Errorf("explain: no cluster state")
	}
	x := &Explainer{view: v, kernel: k, drift: Drift(v, k),
		model: map[iptables.Family]*iptables.Tracer{}, modelErr: map[iptables.Family]error{}}
	for _, fam := range families(v) {
		tr, err := iptables.NewTracer(rules.Build(v.Snapshot, v.Configs[fam]), v.LocalAddrs)
		if err != nil {
			x.modelErr[fam] = err
			continue
		}
		x.model[fam] = tr
	}
	return x, nil
}

// Drift names the chains whose kernel rules differ from what miniproxy
// would write for the view (see the function Drift).
func (x *Explainer) Drift() []ChainDrift { return x.drift }

// Explain answers q: the trace of the kernel's rules gives the candidates,
// the masquerade verdict and the outcome; the view gives the Service, the
// policies and the reasons, from pkg/rules' decisions. It fails only when
// the packet's family has no rules in the kernel's reading or the view.
func (x *Explainer) Explain(q Query) (*Explanation, error) {
	v := x.view
	fam := iptables.FamilyOf(q.Dst.Addr())
	state, ok := x.kernel[fam]
	if !ok {
		return nil, fmt.Errorf("explain: no %s rules were read from the kernel", fam)
	}
	cfg, ok := v.Configs[fam]
	if !ok {
		return nil, fmt.Errorf("explain: the node does not program %s", fam)
	}
	e := &Explanation{
		Query: QueryInfo{Src: q.Src.String(), Dst: q.Dst.String(), Protocol: strings.ToLower(string(q.Protocol)),
			FromNode: q.FromNode, InIface: q.InIface, Family: fam.String()},
		Policies: []Policy{}, Candidates: []Candidate{}, Drift: x.drift, Warnings: []string{},
	}
	if e.Drift == nil {
		e.Drift = []ChainDrift{}
	}
	pkt := iptables.Packet{Src: q.Src, Dst: q.Dst.Addr(), Proto: e.Query.Protocol, DPort: int(q.Dst.Port()), FromNode: q.FromNode, InIface: q.InIface}
	kernel, err := (&iptables.Tracer{State: state, LocalAddrs: v.LocalAddrs}).Trace(pkt)
	if err != nil {
		return nil, fmt.Errorf("explain: trace the kernel's rules: %w", err)
	}

	m := match(v.Snapshot, cfg, q)
	var sit situation
	if m != nil {
		e.Service = m.service()
		sit = m.situation(v.Snapshot, cfg, q)
		e.Policies = sit.policies
	}
	e.Candidates = candidates(kernel, m, v.Snapshot)
	e.Outcome = outcome(kernel, e.Candidates, q)
	e.Masquerade = masquerade(kernel, e.Candidates, sit, q, e.Outcome)

	if len(e.Drift) > 0 {
		names := make([]string, len(e.Drift))
		for i, d := range e.Drift {
			names[i] = d.String()
		}
		e.Warnings = append(e.Warnings, "the kernel's rules differ from what miniproxy would write for its current view (another program changed them, or a sync failed or is pending): "+strings.Join(names, ", "))
	}
	if w := x.compareWithModel(fam, pkt, kernel); w != "" {
		e.Warnings = append(e.Warnings, w)
	}
	for _, f := range families(v) {
		if _, ok := x.kernel[f]; !ok {
			e.Warnings = append(e.Warnings, fmt.Sprintf("no %s rules were read from the kernel: %s is neither explained nor compared", f, f))
		}
	}
	if sit.masqWarning != "" && e.Outcome.Verdict == VerdictDNAT && sit.masqExpected != e.Masquerade.Masqueraded && !e.Masquerade.Partly {
		e.Warnings = append(e.Warnings, sit.masqWarning)
	}
	return e, nil
}

// compareWithModel traces the packet through the rules miniproxy would
// write for the view and says how the kernel's answer differs, or "".
func (x *Explainer) compareWithModel(fam iptables.Family, pkt iptables.Packet, kernel []iptables.Outcome) string {
	if err := x.modelErr[fam]; err != nil {
		return fmt.Sprintf("miniproxy's own rules for this view do not load (%v): the kernel's answer cannot be checked against them", err)
	}
	model, err := x.model[fam].Trace(pkt)
	if err != nil {
		return fmt.Sprintf("miniproxy's own rules for this view cannot be traced (%v)", err)
	}
	if summary(model) == summary(kernel) {
		return ""
	}
	return fmt.Sprintf("the kernel's rules give %s; miniproxy's rules for its current view would give %s", summary(kernel), summary(model))
}

// summary spells a trace's outcomes for comparison and warnings.
func summary(outs []iptables.Outcome) string {
	parts := make([]string, len(outs))
	for i, o := range outs {
		parts[i] = o.String()
	}
	return strings.Join(parts, ", ")
}

// matched is the service port a query reaches, and how.
type matched struct {
	svc  *endpoints.ServicePort
	via  string
	addr netip.AddrPort
}

func (m *matched) service() *Service {
	return &Service{Namespace: m.svc.Name.Namespace, Name: m.svc.Name.Name, Port: m.svc.Name.Port,
		Protocol: string(m.svc.Protocol), Via: m.via, Address: m.addr.String()}
}

// match finds the service port q's destination belongs to, in the order
// the rules dispatch: the Service's addresses (in the order of service
// names), then the NodePorts of the node's addresses. A Service exists in
// a family only through its ClusterIP of that family, as in the rules.
func match(snap *endpoints.Snapshot, cfg rules.Config, q Query) *matched {
	dst, port := q.Dst.Addr(), int32(q.Dst.Port())
	var nodePort *matched
	for _, name := range snap.SortedNames() {
		svc := snap.Services[name]
		if svc.Protocol != q.Protocol || !hasFamily(svc.ClusterIPs, cfg.Family) {
			continue
		}
		if svc.Port == port {
			for _, c := range []struct {
				via   string
				addrs []netip.Addr
			}{{ViaClusterIP, svc.ClusterIPs}, {ViaLoadBalancer, svc.LoadBalancerIPs}, {ViaExternalIP, svc.ExternalIPs}} {
				if slices.Contains(c.addrs, dst) {
					return &matched{svc: svc, via: c.via, addr: q.Dst}
				}
			}
		}
		if nodePort == nil && svc.NodePort == port && servesNodePorts(cfg, dst, q.FromNode) {
			nodePort = &matched{svc: svc, via: ViaNodePort, addr: q.Dst}
		}
	}
	return nodePort
}

func hasFamily(addrs []netip.Addr, fam iptables.Family) bool {
	return slices.ContainsFunc(addrs, func(a netip.Addr) bool { return iptables.FamilyOf(a) == fam })
}

// servesNodePorts says whether the rules translate NodePorts on dst: one of
// cfg's NodePort addresses, a loopback one only for the node's own traffic.
func servesNodePorts(cfg rules.Config, dst netip.Addr, fromNode bool) bool {
	if dst.IsLoopback() && !fromNode {
		return false
	}
	return slices.Contains(cfg.NodePortAddrs(), dst)
}
