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

// situation is what the view says about a query to a service port: the
// policies that apply, in order, and whether miniproxy's rules masquerade
// it, with the reason.
type situation struct {
	policies     []Policy
	masqExpected bool
	masqReason   string
	// masqWarning is the warning to give when the kernel's verdict is
	// not masqExpected.
	masqWarning string
}

func (s *situation) add(field, value, effect string) {
	s.policies = append(s.policies, Policy{Field: field, Value: value, Effect: effect})
}

func (s *situation) masq(expected bool, reason string) {
	s.masqExpected, s.masqReason = expected, reason
	verb := "does not masquerade"
	if expected {
		verb = "masquerades"
	}
	s.masqWarning = fmt.Sprintf("the kernel's masquerade verdict differs from miniproxy's rules, which %s this packet: %s", verb, reason)
}

// situation works out the policies from the endpoint sets pkg/rules
// decides (rules.Categorize), following the rules' structure: cluster IP
// traffic uses the internal set; traffic to an external address is first
// filtered by loadBalancerSourceRanges, then uses the external set, except
// that under externalTrafficPolicy: Local traffic from pods and from the
// node itself may use every endpoint.
func (m *matched) situation(snap *endpoints.Snapshot, cfg rules.Config, q Query) situation {
	svc := m.svc
	fam := cfg.Family
	sets := rules.Categorize(svc, rules.OfFamily(snap.Endpoints[svc.Name], fam), snap.Node)
	iface := q.InIface
	if q.FromNode {
		iface = ""
	}
	fromPods, detected := cfg.DetectLocal.IsLocal(fam, q.Src, iface)
	local := cfg.DetectLocal.Describe(fam)
	var s situation

	if m.via == ViaClusterIP {
		set := sets.Internal(svc)
		if svc.InternalPolicyLocal {
			s.add("spec.internalTrafficPolicy", "Local", fmt.Sprintf("only endpoints on this node (%s): %d usable", snap.Node.Name, len(set)))
		} else {
			s.add("spec.internalTrafficPolicy", "Cluster", "endpoints on any node")
		}
		s.choice(svc, sets, set, "spec.internalTrafficPolicy: Local")
		switch {
		case cfg.MasqueradeAll:
			s.masq(true, "--masquerade-all masquerades all traffic to cluster IPs")
		case detected && !fromPods:
			s.masq(true, "the source is not local traffic, "+local+": the endpoint's reply must come back through this node")
		case detected:
			s.masq(false, "the source is local traffic, "+local+": it keeps its address")
		default:
			s.masq(false, fmt.Sprintf("nothing tells local traffic in %s (--detect-local-mode %s), so cluster IP traffic keeps its source", fam, modeName(cfg)))
		}
		return s
	}

	if m.via == ViaLoadBalancer && len(svc.LoadBalancerSourceRanges) > 0 {
		ok, why := admitted(svc, cfg, q.Src)
		var ranges []string
		for _, r := range svc.LoadBalancerSourceRanges {
			ranges = append(ranges, r.String())
		}
		if !ok {
			s.add("spec.loadBalancerSourceRanges", strings.Join(ranges, ","), "the source is not admitted: DROP")
			return s
		}
		s.add("spec.loadBalancerSourceRanges", strings.Join(ranges, ","), "admits the source: "+why)
	}

	set := sets.External(svc)
	fromNode := slices.Contains(cfg.NodeIPs, q.Src) || q.Src.IsLoopback()
	if !svc.ExternalPolicyLocal {
		s.add("spec.externalTrafficPolicy", "Cluster", "endpoints on any node")
		s.masq(true, "externalTrafficPolicy: Cluster: the endpoint may be on another node, so the reply must come back through this node")
	} else {
		podSet := sets.Cluster
		if len(podSet) == 0 {
			podSet = sets.Local
		}
		switch {
		case detected && fromPods && len(podSet) > 0:
			set = podSet
			s.add("spec.externalTrafficPolicy", "Local", "applies to outside traffic only: traffic from pods ("+local+") may use every endpoint, as if a load balancer had sent it back")
			s.masq(false, "traffic from pods to an externalTrafficPolicy: Local Service keeps its source")
		case fromNode && len(podSet) > 0:
			set = podSet
			s.add("spec.externalTrafficPolicy", "Local", "applies to outside traffic only: the node's own traffic may use every endpoint")
			s.masq(true, "the node's own traffic (its source is a local address) is masqueraded")
		default:
			s.add("spec.externalTrafficPolicy", "Local", fmt.Sprintf("outside traffic goes only to endpoints on this node (%s): %d usable", snap.Node.Name, len(set)))
			s.masq(false, "externalTrafficPolicy: Local keeps the client's IP")
		}
	}
	s.choice(svc, sets, set, "spec.externalTrafficPolicy: Local")
	return s
}

// choice adds the policies that shaped set, the endpoints this traffic may
// use: topology hints, the terminating fallback, affinity, or why there is
// none (REJECT without any usable endpoint, DROP when only this traffic has
// none).
func (s *situation) choice(svc *endpoints.ServicePort, sets rules.EndpointSets, set []endpoints.Endpoint, localPolicy string) {
	if len(set) == 0 {
		if sets.Any {
			s.add("endpoints", "none on this node", "the Service has endpoints, but "+localPolicy+" allows only this node's: DROP (a client or load balancer tries another node)")
		} else {
			s.add("endpoints", "none usable", "no endpoint is ready, nor serving while terminating: REJECT")
		}
		return
	}
	isCluster := sameSet(set, sets.Cluster)
	switch {
	case isCluster && sets.Topology == rules.TopologyNode:
		s.add("hints.forNodes (trafficDistribution: PreferSameNode)", "this node", "only endpoints hinted for this node")
	case isCluster && sets.Topology == rules.TopologyZone:
		s.add("hints.forZones (topology-aware routing, trafficDistribution: PreferSameZone)", "this node's zone", "only endpoints hinted for this node's zone")
	}
	if (isCluster && sets.ClusterFallback) || (!isCluster && sets.LocalFallback) {
		s.add("conditions.terminating", "fallback", "no endpoint is ready: serving endpoints that are terminating get the traffic")
	}
	if t := svc.AffinityTimeoutSeconds; t > 0 {
		s.add("spec.sessionAffinity", fmt.Sprintf("ClientIP (%d s)", t), fmt.Sprintf("a client seen within %d s goes back to the endpoint it used; the candidates are for a client not seen yet", t))
	}
}

func sameSet(a, b []endpoints.Endpoint) bool {
	return slices.EqualFunc(a, b, func(x, y endpoints.Endpoint) bool { return x.IP == y.IP && x.Port == y.Port })
}

// admitted says whether loadBalancerSourceRanges let src reach the load
// balancer IP, as the rules decide: a range of its family holds it, or (the
// node's own traffic, upstream's rule) a range holds one of the node's
// addresses and src is the load balancer IP.
func admitted(svc *endpoints.ServicePort, cfg rules.Config, src netip.Addr) (bool, string) {
	nodeInRange := ""
	for _, r := range svc.LoadBalancerSourceRanges {
		if iptables.FamilyOf(r.Addr()) != cfg.Family {
			continue
		}
		if r.Contains(src) {
			return true, "the source is in " + r.String()
		}
		for _, n := range cfg.NodeIPs {
			if r.Contains(n) {
				nodeInRange = r.String()
			}
		}
	}
	if nodeInRange != "" && slices.Contains(svc.LoadBalancerIPs, src) {
		return true, "the node's own traffic (" + nodeInRange + " holds a node address)"
	}
	return false, ""
}

func modeName(cfg rules.Config) string {
	if cfg.DetectLocal.Mode == "" {
		return "none"
	}
	return cfg.DetectLocal.Mode
}
