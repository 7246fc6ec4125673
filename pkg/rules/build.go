// Package rules computes, as a pure function of the cluster state and the
// node's configuration, every iptables chain miniproxy wants, and traces
// packets through them. It never touches the kernel.
//
// The layout (docs/rule-layout.md explains it with an example) avoids the
// two costs of upstream's: a chain per Service and per endpoint (chain count
// is what makes iptables-nft-restore slow) and one linear list of every
// Service (what makes partial syncs and first packets O(N)). Destinations
// are dispatched on the last byte of the address (16 + 256 small chains at
// most) and NodePorts on 64-port blocks; the endpoint choice is written
// inline in those leaf chains.
package rules

import (
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// Prefix starts the name of every chain miniproxy owns, so that it can share
// the tables with anyone else and `--cleanup` finds exactly its own chains;
// it differs from kube-proxy's "KUBE-" so that both can be on a node (and
// compared) at once. The rules name the chains, so this is its one home: the
// dataplane owns whatever prefix its caller gives it, and miniproxy gives it
// this one.
const Prefix = "MP-"

// The fixed chains. The same name may exist in nat and in filter.
const (
	ChainServices    = Prefix + "SERVICES"     // nat and filter: entry for service traffic
	ChainNodePorts   = Prefix + "NODEPORTS"    // nat and filter: traffic to a local address
	ChainMarkMasq    = Prefix + "MARK-MASQ"    // nat: marks a packet for masquerade
	ChainPostrouting = Prefix + "POSTROUTING"  // nat: masquerades marked packets
	ChainHairpin     = Prefix + "HAIRPIN"      // nat: masquerades pods reaching themselves
	ChainForward     = Prefix + "FORWARD"      // filter: accepts what we forward
	ChainHealthCheck = Prefix + "HEALTHCHECKS" // filter: accepts healthCheckNodePorts (from INPUT)
	ChainLocalnet    = Prefix + "LOCALNET"     // filter: drops others' traffic to 127.0.0.0/8 (localhost NodePorts)
)

// DefaultMasqueradeBit is kube-proxy's default --iptables-masquerade-bit.
const DefaultMasqueradeBit = 14

// Config is what the rules depend on besides the cluster state.
type Config struct {
	Family iptables.Family `json:"family"`
	// DetectLocal tells this node's pods' traffic from other traffic:
	// traffic to a ClusterIP that is not local is masqueraded, and local
	// traffic to an external address of an externalTrafficPolicy: Local
	// Service may use any endpoint.
	DetectLocal DetectLocal `json:"detectLocal"`
	// MasqueradeAll masquerades all traffic to service IPs.
	MasqueradeAll bool `json:"masqueradeAll"`
	// MasqueradeBit is the packet mark bit used to request masquerade.
	MasqueradeBit int `json:"masqueradeBit"`
	// NodePortAddresses restricts NodePorts to these local addresses; nil
	// means every local address (loopback only with LocalhostNodePorts).
	NodePortAddresses []netip.Addr `json:"nodePortAddresses"`
	// LocalhostNodePorts serves NodePorts on 127.0.0.0/8 to the node's own
	// traffic (IPv4 only; ignored in IPv6), masqueraded, and adds
	// upstream's guard against CVE-2020-8558: a packet to 127.0.0.0/8 from
	// a source outside it that is not part of a connection or translated is
	// dropped (filter INPUT and OUTPUT, MP-LOCALNET). It needs the sysctl
	// net.ipv4.conf.all.route_localnet=1, which pkg/proxy sets.
	LocalhostNodePorts bool `json:"localhostNodePorts"`
	// NodeIPs are the node's own addresses of this family; a load balancer
	// source range containing one also admits the node's own traffic to the
	// load balancer IP, as upstream does.
	NodeIPs []netip.Addr `json:"nodeIPs"`
	// RandomFully adds --random-fully to MASQUERADE where iptables supports it.
	RandomFully bool `json:"randomFully"`
}

// NodePortAddrs are the node's addresses on which the rules translate
// NodePorts: --nodeport-addresses' choice, or every local address, loopback
// only with localhost NodePorts (as nodePortJumps writes them). The
// conntrack reconciler and explanations ask it.
func (c Config) NodePortAddrs() []netip.Addr {
	if c.NodePortAddresses != nil {
		return c.NodePortAddresses
	}
	var out []netip.Addr
	for _, a := range c.NodeIPs {
		if !a.IsLoopback() || c.localhostNodePorts() {
			out = append(out, a)
		}
	}
	return out
}

// localhostNodePorts says whether loopback addresses serve NodePorts.
func (c Config) localhostNodePorts() bool {
	return c.LocalhostNodePorts && c.Family == iptables.IPv4
}

func (c Config) markHex() string {
	bit := c.MasqueradeBit
	if bit <= 0 || bit > 31 {
		bit = DefaultMasqueradeBit
	}
	return fmt.Sprintf("0x%x", uint32(1)<<bit)
}

// Jumps returns the rules that lead from the built-in chains into ours.
func Jumps(cfg Config) []iptables.Jump {
	newConn := []string{"-m", "conntrack", "--ctstate", "NEW"}
	portals := []string{"-m", "comment", "--comment", "miniproxy service portals"}
	svcJump := append(append(append([]string{}, newConn...), portals...), "-j", ChainServices)
	var out []iptables.Jump
	if cfg.localhostNodePorts() {
		// First, for every packet, as upstream's KUBE-FIREWALL jumps:
		// nothing after them may accept what they drop.
		out = append(out,
			iptables.Jump{Table: iptables.Filter, Chain: "INPUT", Rule: iptables.Rule{"-j", ChainLocalnet}},
			iptables.Jump{Table: iptables.Filter, Chain: "OUTPUT", Rule: iptables.Rule{"-j", ChainLocalnet}})
	}
	return append(out, []iptables.Jump{
		{Table: iptables.NAT, Chain: "PREROUTING", Rule: iptables.Rule(append(append([]string{}, portals...), "-j", ChainServices))},
		{Table: iptables.NAT, Chain: "OUTPUT", Rule: iptables.Rule(append(append([]string{}, portals...), "-j", ChainServices))},
		{Table: iptables.NAT, Chain: "POSTROUTING", Rule: iptables.Rule{"-m", "comment", "--comment", "miniproxy postrouting rules", "-j", ChainPostrouting}},
		{Table: iptables.Filter, Chain: "INPUT", Rule: iptables.Rule(svcJump)},
		// Every packet, not only the first: a node whose INPUT policy
		// drops must still answer its load balancers' health checks, as
		// with kube-proxy's KUBE-NODEPORTS jump.
		{Table: iptables.Filter, Chain: "INPUT", Rule: iptables.Rule{"-m", "comment", "--comment", "miniproxy health check service ports", "-j", ChainHealthCheck}},
		{Table: iptables.Filter, Chain: "FORWARD", Rule: iptables.Rule(svcJump)},
		{Table: iptables.Filter, Chain: "FORWARD", Rule: iptables.Rule{"-m", "comment", "--comment", "miniproxy forwarding rules", "-j", ChainForward}},
		{Table: iptables.Filter, Chain: "OUTPUT", Rule: iptables.Rule(svcJump)},
	}...)
}

// Build computes the ruleset of one family for a snapshot. It is pure: the
// same snapshot and config always give the same rules, in the same order.
func Build(snap *endpoints.Snapshot, cfg Config) *iptables.Ruleset {
	return new(Builder).Build(snap, cfg)
}

// Builder computes rulesets exactly as Build does, but remembers each
// service port's rules and computes them again only for service ports whose
// ServicePort or endpoint list changed since its previous call. Snapshots
// share unchanged ServicePorts and endpoint lists (pkg/endpoints never
// modifies them), so "changed" is a pointer comparison. At 10,000 Services
// this turns a sync's 300,000 allocations (27 MB of garbage, 45 ms) into
// about 4,000 (4 MB, 12 ms). The rulesets it returns share rules with it and
// with each other: nobody may modify them. A Builder is not safe for
// concurrent use.
type Builder struct {
	key   string // the config and zone the fragments were computed for
	frags map[endpoints.ServicePortName]cachedFragment
}

type cachedFragment struct {
	svc  *endpoints.ServicePort
	eps  []endpoints.Endpoint
	frag *fragment
}

// Build computes the ruleset of one family for a snapshot.
func (c *Builder) Build(snap *endpoints.Snapshot, cfg Config) *iptables.Ruleset {
	b := &builder{
		cfg:       cfg,
		natVIP:    newVIPDispatch(Prefix+"VIP-", cfg.Family),
		filterVIP: newVIPDispatch(Prefix+"VIPF-", cfg.Family),
		natNP:     newPortDispatch(Prefix + "NP-"),
		filterNP:  newPortDispatch(Prefix + "NPF-"),
		hairpin:   map[netip.Addr]bool{},
	}
	key := fmt.Sprintf("%+v|%s|%s", cfg, snap.Node.Name, snap.Node.Zone)
	if key != c.key {
		c.key, c.frags = key, nil
	}
	next := make(map[endpoints.ServicePortName]cachedFragment, len(snap.Services))
	for _, name := range snap.SortedNames() {
		svc, eps := snap.Services[name], snap.Endpoints[name]
		cf, ok := c.frags[name]
		if !ok || cf.svc != svc || !endpoints.SameList(cf.eps, eps) {
			cf = cachedFragment{svc: svc, eps: eps, frag: b.servicePort(svc, OfFamily(eps, cfg.Family), snap.Node)}
		}
		next[name] = cf
		b.assemble(cf.frag)
	}
	c.frags = next
	return b.finish()
}

// fragment is one service port's share of the ruleset: rules for the leaf
// chains of the dispatches, chains of its own, and hairpin addresses.
type fragment struct {
	natVIP, filterVIP []addrRules
	natNP, filterNP   []portRules
	natExtra          []iptables.Chain
	hairpin           []netip.Addr
	healthChecks      []iptables.Rule
}

type addrRules struct {
	ip    netip.Addr
	rules []iptables.Rule
}

type portRules struct {
	key   portKey
	rules []iptables.Rule
}

// assemble adds a service port's fragment to the ruleset being built.
func (b *builder) assemble(f *fragment) {
	for _, r := range f.natVIP {
		b.natVIP.add(r.ip, r.rules...)
	}
	for _, r := range f.filterVIP {
		b.filterVIP.add(r.ip, r.rules...)
	}
	for _, r := range f.natNP {
		b.natNP.add(r.key, r.rules...)
	}
	for _, r := range f.filterNP {
		b.filterNP.add(r.key, r.rules...)
	}
	b.natExtra = append(b.natExtra, f.natExtra...)
	b.healthChecks = append(b.healthChecks, f.healthChecks...)
	for _, ip := range f.hairpin {
		b.hairpin[ip] = true
	}
}

type builder struct {
	cfg               Config
	natVIP, filterVIP *vipDispatch
	natNP, filterNP   *portDispatch
	natExtra          []iptables.Chain
	hairpin           map[netip.Addr]bool
	healthChecks      []iptables.Rule
}

func familyOf(a netip.Addr) iptables.Family { return iptables.FamilyOf(a) }

func (b *builder) addrsOfFamily(addrs []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		if familyOf(a) == b.cfg.Family {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// hostPrefix spells a single address the way iptables-save prints it.
func (b *builder) hostPrefix(a netip.Addr) string {
	return netip.PrefixFrom(a, a.BitLen()).String()
}

// servicePortRules is everything needed to write one service port's rules.
type servicePortRules struct {
	svc      *endpoints.ServicePort
	sets     EndpointSets
	internal []endpoints.Endpoint // where ClusterIP traffic goes
	external []endpoints.Endpoint // where outside traffic goes
	proto    string
	comment  string
	key      string // stable identity for hashed names
	frag     *fragment
}

func (s *servicePortRules) portMatch(port int32) []string {
	return []string{"-p", s.proto, "-m", s.proto, "--dport", strconv.Itoa(int(port))}
}

// servicePort computes one service port's fragment; it reads only cfg.
func (b *builder) servicePort(svc *endpoints.ServicePort, eps []endpoints.Endpoint, node endpoints.Node) *fragment {
	f := &fragment{}
	// A Service exists in a family only through its ClusterIP of that
	// family, as upstream: an external IP of the other family is ignored.
	if len(b.addrsOfFamily(svc.ClusterIPs)) == 0 {
		return f
	}
	sets := Categorize(svc, eps, node)
	s := &servicePortRules{
		frag:     f,
		svc:      svc,
		sets:     sets,
		internal: sets.Internal(svc),
		external: sets.External(svc),
		proto:    strings.ToLower(string(svc.Protocol)),
		comment:  svc.Name.String(),
		key:      svc.Name.String() + "/" + string(svc.Protocol),
	}
	for _, set := range [][]endpoints.Endpoint{sets.Cluster, sets.Local} {
		for _, ep := range set {
			if ep.Local {
				f.hairpin = append(f.hairpin, ep.IP.Unmap())
			}
		}
	}

	for _, ip := range b.addrsOfFamily(svc.ClusterIPs) {
		b.addClusterIP(s, ip)
	}
	for _, ip := range b.addrsOfFamily(svc.ExternalIPs) {
		match := append([]string{"-d", b.hostPrefix(ip)}, s.portMatch(svc.Port)...)
		b.addExternal(s, match, "external IP", func(r []iptables.Rule) { f.natVIP = append(f.natVIP, addrRules{ip, r}) }, func(r iptables.Rule) { f.filterVIP = append(f.filterVIP, addrRules{ip, []iptables.Rule{r}}) })
	}
	b.addLoadBalancerIPs(s)
	if hc := svc.HealthCheckNodePort; hc != 0 {
		// As upstream: a node whose firewall drops what it does not know
		// must still let load balancers ask the health check port.
		f.healthChecks = append(f.healthChecks, rule(s.comment+" health check node port",
			[]string{"-p", "tcp", "-m", "tcp", "--dport", strconv.Itoa(int(hc))}, nil, "-j", "ACCEPT"))
	}
	if svc.NodePort != 0 {
		np := portKey{proto: s.proto, port: int(svc.NodePort)}
		b.addExternal(s, s.portMatch(svc.NodePort), "nodePort", func(r []iptables.Rule) { f.natNP = append(f.natNP, portRules{np, r}) }, func(r iptables.Rule) { f.filterNP = append(f.filterNP, portRules{np, []iptables.Rule{r}}) })
	}
	return f
}

// rejectOrDrop is what happens to traffic that has no endpoint to go to:
// rejected at once when the service port has no usable endpoint at all,
// dropped when endpoints exist but none that this traffic may use (so that a
// client or load balancer tries another node instead of giving up). TCP is
// rejected with a reset rather than upstream's ICMP port unreachable: the
// kernel sends at most one ICMP error per second to a host, so a client
// opening connections to a Service without endpoints would see most of them
// hang for a SYN retransmit (a second or more) instead of being refused.
func rejectOrDrop(s *servicePortRules, what string) (target []string, comment string) {
	if s.sets.Any {
		return []string{"-j", "DROP"}, fmt.Sprintf("%s %s has no local endpoints", s.comment, what)
	}
	comment = fmt.Sprintf("%s %s has no endpoints", s.comment, what)
	if s.proto == "tcp" {
		return []string{"-j", "REJECT", "--reject-with", "tcp-reset"}, comment
	}
	return []string{"-j", "REJECT"}, comment
}

func (b *builder) addClusterIP(s *servicePortRules, ip netip.Addr) {
	match := append([]string{"-d", b.hostPrefix(ip)}, s.portMatch(s.svc.Port)...)
	if len(s.internal) == 0 {
		target, comment := rejectOrDrop(s, "cluster IP")
		s.frag.filterVIP = append(s.frag.filterVIP, addrRules{ip, []iptables.Rule{rule(comment, match, nil, target...)}})
		return
	}
	comment := s.comment + " cluster IP"
	var out []iptables.Rule
	notLocal := b.cfg.DetectLocal.IfNotLocal(b.cfg.Family)
	switch {
	case b.cfg.MasqueradeAll:
		out = append(out, rule(comment, match, nil, "-j", ChainMarkMasq))
	case notLocal != nil:
		out = append(out, rule(comment, match, notLocal, "-j", ChainMarkMasq))
	}
	out = append(out, b.pick(s, comment, match, nil, s.internal)...)
	s.frag.natVIP = append(s.frag.natVIP, addrRules{ip, out})
}

// addExternal writes the rules for one external entry point (an external IP,
// a load balancer IP without source ranges, or the NodePort): the nat rules
// through addNat and, when this traffic has nowhere to go, the filter verdict
// through addFilter.
func (b *builder) addExternal(s *servicePortRules, match []string, what string, addNat func([]iptables.Rule), addFilter func(iptables.Rule)) {
	if s.sets.Any {
		addNat(b.externalRules(s, s.comment+" "+what, match))
	}
	if len(s.external) == 0 {
		target, comment := rejectOrDrop(s, what)
		addFilter(rule(comment, match, nil, target...))
	}
}

// externalRules is the endpoint choice for traffic arriving at an external
// address. Cluster policy: masquerade, any endpoint. Local policy: no
// masquerade and local endpoints only, except for traffic from pods (which
// goes anywhere, unmasqueraded) and from the node itself (which goes
// anywhere, masqueraded because its source is a local address).
func (b *builder) externalRules(s *servicePortRules, comment string, match []string) []iptables.Rule {
	if !s.svc.ExternalPolicyLocal {
		if len(s.external) == 0 {
			return nil
		}
		out := []iptables.Rule{rule(comment, match, nil, "-j", ChainMarkMasq)}
		return append(out, b.pick(s, comment, match, nil, s.external)...)
	}
	podSet := s.sets.Cluster
	if len(podSet) == 0 {
		podSet = s.sets.Local
	}
	var out []iptables.Rule
	if len(podSet) > 0 {
		if local := b.cfg.DetectLocal.IfLocal(b.cfg.Family); local != nil {
			out = append(out, b.pick(s, comment+" from pods", match, local, podSet)...)
		}
		fromNode := []string{"-m", "addrtype", "--src-type", "LOCAL"}
		out = append(out, rule(comment+" from this node", match, fromNode, "-j", ChainMarkMasq))
		out = append(out, b.pick(s, comment+" from this node", match, fromNode, podSet)...)
	}
	return append(out, b.pick(s, comment, match, nil, s.external)...)
}

// addLoadBalancerIPs handles status.loadBalancer.ingress. With source ranges,
// the entry jumps to a firewall chain that sends admitted sources on to the
// external rules; anything else is left untranslated and dropped in filter.
func (b *builder) addLoadBalancerIPs(s *servicePortRules) {
	lbIPs := b.addrsOfFamily(s.svc.LoadBalancerIPs)
	if len(lbIPs) == 0 {
		return
	}
	if len(s.svc.LoadBalancerSourceRanges) == 0 {
		for _, ip := range lbIPs {
			match := append([]string{"-d", b.hostPrefix(ip)}, s.portMatch(s.svc.Port)...)
			b.addExternal(s, match, "loadbalancer IP", func(r []iptables.Rule) { s.frag.natVIP = append(s.frag.natVIP, addrRules{ip, r}) }, func(r iptables.Rule) { s.frag.filterVIP = append(s.frag.filterVIP, addrRules{ip, []iptables.Rule{r}}) })
		}
		return
	}
	// Ranges of the other family admit nobody of this one: a Service that
	// restricts its sources never becomes open in one family.
	var allowed []string
	allowFromNode := false
	for _, r := range s.svc.LoadBalancerSourceRanges {
		if familyOf(r.Addr()) != b.cfg.Family {
			continue
		}
		allowed = append(allowed, r.Masked().String())
		for _, n := range b.cfg.NodeIPs {
			allowFromNode = allowFromNode || r.Contains(n)
		}
	}
	if allowFromNode {
		for _, ip := range lbIPs {
			allowed = append(allowed, b.hostPrefix(ip))
		}
	}
	fw := hashedName("FW-", s.key)
	ext := hashedName("EXT-", s.key)
	if s.sets.Any {
		fwChain := iptables.Chain{Name: fw}
		for _, src := range allowed {
			fwChain.Rules = append(fwChain.Rules, rule(s.comment+" loadbalancer IP", nil, []string{"-s", src}, "-j", ext))
		}
		s.frag.natExtra = append(s.frag.natExtra, fwChain, iptables.Chain{Name: ext, Rules: b.externalRules(s, s.comment+" loadbalancer IP", nil)})
	}
	for _, ip := range lbIPs {
		match := append([]string{"-d", b.hostPrefix(ip)}, s.portMatch(s.svc.Port)...)
		if s.sets.Any {
			s.frag.natVIP = append(s.frag.natVIP, addrRules{ip, []iptables.Rule{rule(s.comment+" loadbalancer IP", match, nil, "-j", fw)}})
			s.frag.filterVIP = append(s.frag.filterVIP, addrRules{ip, []iptables.Rule{rule(s.comment+" traffic not accepted by loadBalancerSourceRanges", match, nil, "-j", "DROP")}})
		}
		if len(s.external) == 0 {
			target, comment := rejectOrDrop(s, "loadbalancer IP")
			s.frag.filterVIP = append(s.frag.filterVIP, addrRules{ip, []iptables.Rule{rule(comment, match, nil, target...)}})
		}
	}
}

// pick writes the DNAT rules that choose one endpoint of set evenly (endpoint
// i of n with probability 1/(n-i)), honouring ClientIP session affinity with
// one recent list per endpoint.
func (b *builder) pick(s *servicePortRules, comment string, match, extra []string, set []endpoints.Endpoint) []iptables.Rule {
	var out []iptables.Rule
	timeout := s.svc.AffinityTimeoutSeconds
	if timeout > 0 {
		for _, ep := range set {
			name := affinityName(s.key, ep)
			aff := append(append([]string{}, extra...),
				"-m", "recent", "--name", name, "--rcheck", "--seconds", strconv.Itoa(int(timeout)), "--reap",
				"-m", "recent", "--name", name, "--set")
			out = append(out, dnat(s, comment, match, aff, ep))
		}
	}
	n := len(set)
	for i, ep := range set {
		more := append([]string{}, extra...)
		if i < n-1 {
			more = append(more, "-m", "statistic", "--mode", "random", "--probability", fmt.Sprintf("%0.10f", 1.0/float64(n-i)))
		}
		if timeout > 0 {
			more = append(more, "-m", "recent", "--name", affinityName(s.key, ep), "--set")
		}
		out = append(out, dnat(s, comment, match, more, ep))
	}
	return out
}

// dnat writes the rule that sends a packet to ep. A DNAT to a port is only
// valid together with the protocol (iptables-restore refuses the whole
// input otherwise), so the protocol is part of every such rule, also where
// the chain is only reached by packets that matched it already.
func dnat(s *servicePortRules, comment string, match, extra []string, ep endpoints.Endpoint) iptables.Rule {
	if !slices.Contains(match, "-p") {
		match = append([]string{"-p", s.proto}, match...)
	}
	return rule(comment, match, extra, "-j", "DNAT", "--to-destination", ep.String())
}

// rule assembles one rule: comment, entry match, extra matches, target.
func rule(comment string, match, extra []string, target ...string) iptables.Rule {
	r := make([]string, 0, 4+len(match)+len(extra)+len(target))
	r = append(r, "-m", "comment", "--comment", comment)
	r = append(r, match...)
	r = append(r, extra...)
	return append(r, target...)
}

// ServiceOfRule names the Service (without port) whose rule a restore
// input line is, from the comment every service port's rule starts with
// ("ns/name:port what"); false for lines of no single Service, such as
// dispatch rules. The proxy uses it to try first the Service the kernel
// named when it refused an input.
func ServiceOfRule(line string) (endpoints.ServicePortName, bool) {
	args, err := iptables.SplitArgs(line)
	if err != nil {
		return endpoints.ServicePortName{}, false
	}
	for i := 0; i+1 < len(args); i++ {
		if args[i] != "--comment" {
			continue
		}
		first, _, _ := strings.Cut(args[i+1], " ")
		ns, name, ok := strings.Cut(first, "/")
		name, _, _ = strings.Cut(name, ":")
		if !ok || ns == "" || name == "" || strings.ContainsAny(name, "/") {
			return endpoints.ServicePortName{}, false
		}
		return endpoints.ServicePortName{Namespace: ns, Name: name}, true
	}
	return endpoints.ServicePortName{}, false
}

// hashedName gives a per-service-port chain a stable name of bounded length
// (chain names are limited to 28 characters).
func hashedName(kind, key string) string {
	sum := sha256.Sum256([]byte(key))
	return Prefix + kind + base32.StdEncoding.EncodeToString(sum[:])[:16]
}

// affinityName names the recent list that remembers which clients were sent
// to one endpoint of one service port.
func affinityName(key string, ep endpoints.Endpoint) string {
	return hashedName("AFF-", key+"/"+ep.String())
}

func (b *builder) finish() *iptables.Ruleset {
	mark := b.cfg.markHex()
	masq := []string{"-j", "MASQUERADE"}
	if b.cfg.RandomFully {
		masq = append(masq, "--random-fully")
	}

	// nat
	natServices := b.natVIP.topRules()
	natServices = append(natServices, b.nodePortJumps()...)
	nat := []iptables.Chain{
		{Name: ChainServices, Rules: natServices},
		{Name: ChainNodePorts, Rules: b.natNP.topRules()},
		{Name: ChainMarkMasq, Rules: []iptables.Rule{{"-j", "MARK", "--or-mark", mark}}},
		{Name: ChainPostrouting, Rules: []iptables.Rule{
			{"-m", "conntrack", "--ctstate", "DNAT", "-j", ChainHairpin},
			{"-m", "mark", "!", "--mark", mark + "/" + mark, "-j", "RETURN"},
			{"-j", "MARK", "--xor-mark", mark},
			append(iptables.Rule{"-m", "comment", "--comment", "miniproxy service traffic requiring SNAT"}, masq...),
		}},
	}
	nat = append(nat, b.hairpinChains(masq)...)
	nat = append(nat, b.natVIP.chains()...)
	nat = append(nat, b.natNP.chains()...)
	sort.Slice(b.natExtra, func(i, j int) bool { return b.natExtra[i].Name < b.natExtra[j].Name })
	nat = append(nat, b.natExtra...)

	// filter
	filterServices := b.filterVIP.topRules()
	filterServices = append(filterServices, b.nodePortJumps()...)
	filt := []iptables.Chain{}
	if b.cfg.localhostNodePorts() {
		// Upstream's rule, to the letter: with route_localnet=1 a neighbour
		// could otherwise reach what listens on the node's 127.0.0.1.
		filt = append(filt, iptables.Chain{Name: ChainLocalnet, Rules: []iptables.Rule{{
			"-m", "comment", "--comment", "block incoming localnet connections",
			"-d", "127.0.0.0/8", "!", "-s", "127.0.0.0/8",
			"-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP",
		}}})
	}
	filt = append(filt, []iptables.Chain{
		{Name: ChainServices, Rules: filterServices},
		{Name: ChainHealthCheck, Rules: b.healthChecks},
		{Name: ChainNodePorts, Rules: b.filterNP.topRules()},
		{Name: ChainForward, Rules: []iptables.Rule{
			{"-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"},
			{"-m", "comment", "--comment", "miniproxy forwarding rules", "-m", "mark", "--mark", mark + "/" + mark, "-j", "ACCEPT"},
			{"-m", "comment", "--comment", "miniproxy forwarding conntrack rule", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"},
		}},
	}...)
	filt = append(filt, b.filterVIP.chains()...)
	filt = append(filt, b.filterNP.chains()...)

	return &iptables.Ruleset{
		Family: b.cfg.Family,
		Tables: []iptables.TableRules{{Table: iptables.Filter, Chains: filt}, {Table: iptables.NAT, Chains: nat}},
		Jumps:  Jumps(b.cfg),
	}
}

// NodePortAddresses picks the node's addresses that serve NodePorts under
// --nodeport-addresses ranges: the local addresses InNodePortRanges; a
// loopback one only when localhost NodePorts are on and it is IPv4 (as
// upstream, docs/decisions.md). Without ranges it returns nil, which Config
// reads as every local address (loopback as above).
func NodePortAddresses(local []netip.Addr, ranges []netip.Prefix, localhostNodePorts bool) []netip.Addr {
	if ranges == nil {
		return nil
	}
	out := []netip.Addr{}
	for _, a := range local {
		if a.IsLoopback() && !(localhostNodePorts && a.Unmap().Is4()) {
			continue
		}
		if InNodePortRanges(a, ranges) {
			out = append(out, a)
		}
	}
	return out
}

// InNodePortRanges says whether --nodeport-addresses ranges admit the
// node's address a, as kube-proxy decides: a is inside a range of its
// family, or the ranges have none of its family (which then serves
// NodePorts, and healthCheckNodePorts, on every address). nil ranges admit
// everything.
func InNodePortRanges(a netip.Addr, ranges []netip.Prefix) bool {
	a = a.Unmap()
	ofFamily := false
	for _, r := range ranges {
		if r.Addr().Is4() != a.Is4() {
			continue
		}
		ofFamily = true
		if r.Contains(a) {
			return true
		}
	}
	return !ofFamily
}

// LocalhostNodePorts says whether a family serves NodePorts on loopback
// under --iptables-localhost-nodeports (on) and --nodeport-addresses
// (ranges, nil when not given), as upstream decides: only IPv4, and only
// when the ranges, if given, cover IPv4 loopback.
func LocalhostNodePorts(on bool, fam iptables.Family, ranges []netip.Prefix) bool {
	if !on || fam != iptables.IPv4 {
		return false
	}
	return InNodePortRanges(ipv4Loopback, ranges) || slices.ContainsFunc(ranges, func(r netip.Prefix) bool {
		return r.Addr().Is4() && r.Addr().IsLoopback()
	})
}

var ipv4Loopback = netip.AddrFrom4([4]byte{127, 0, 0, 1})

// nodePortJumps sends traffic for the node's own addresses to the NodePort
// dispatch: every local address, or only --nodeport-addresses. Loopback
// addresses serve NodePorts only with localhost NodePorts, and then only to
// the node's own traffic (a neighbour that routes 127.0.0.1 to the node is
// left untranslated, and MP-LOCALNET drops it).
func (b *builder) nodePortJumps() []iptables.Rule {
	comment := []string{"-m", "comment", "--comment", "miniproxy service nodeports; NOTE: this must be the last rule in this chain"}
	jump := func(match ...string) iptables.Rule {
		return append(append(append(iptables.Rule{}, comment...), match...), "-j", ChainNodePorts)
	}
	fromNode := []string{"-m", "addrtype", "--src-type", "LOCAL"}
	if b.cfg.NodePortAddresses == nil {
		loopback := "127.0.0.0/8"
		if b.cfg.Family == iptables.IPv6 {
			loopback = "::1/128"
		}
		out := []iptables.Rule{jump("-m", "addrtype", "--dst-type", "LOCAL", "!", "-d", loopback)}
		if b.cfg.localhostNodePorts() {
			out = append(out, jump(append([]string{"-d", loopback}, fromNode...)...))
		}
		return out
	}
	var out []iptables.Rule
	for _, a := range b.addrsOfFamily(b.cfg.NodePortAddresses) {
		switch {
		case !a.IsLoopback():
			out = append(out, jump("-d", b.hostPrefix(a)))
		case b.cfg.localhostNodePorts():
			out = append(out, jump(append([]string{"-d", b.hostPrefix(a)}, fromNode...)...))
		}
	}
	return out
}

// hairpinChains masquerade a local pod that reached itself through a
// Service: after DNAT its packet has the pod's address as source and
// destination, and without SNAT the pod would answer itself directly. One
// rule per local endpoint address, spread by the address's last byte over
// the leaves of a dispatch under ChainHairpin, as the Services' addresses
// are: a node with 20,000 local endpoints walks some 16 + 16 + 80 rules
// instead of 20,000, and a change of one endpoint rewrites its leaf alone.
// Only translated packets get there (POSTROUTING jumps with --ctstate DNAT).
func (b *builder) hairpinChains(masq []string) []iptables.Chain {
	ips := make([]netip.Addr, 0, len(b.hairpin))
	for ip := range b.hairpin {
		ips = append(ips, ip)
	}
	sort.Slice(ips, func(i, j int) bool { return ips[i].Less(ips[j]) })
	d := newVIPDispatch(ChainHairpin+"-", b.cfg.Family)
	for _, ip := range ips {
		p := b.hostPrefix(ip)
		d.add(ip, append(iptables.Rule{"-m", "comment", "--comment", "hairpin", "-s", p, "-d", p}, masq...))
	}
	return append([]iptables.Chain{{Name: ChainHairpin, Rules: d.topRules()}}, d.chains()...)
}
