package rules

import (
	"slices"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// EndpointSets is the answer to "where may traffic to this service port go"
// from this node, split the way the traffic policies need it. The rules are
// written from it, and explanations (pkg/explain) quote it, so that both
// tell the same story.
type EndpointSets struct {
	// Cluster is the set for traffic that may go to any node: ready endpoints
	// (narrowed to this node or zone when topology hints say so), or, when none is
	// ready anywhere, serving-and-terminating ones.
	Cluster []endpoints.Endpoint
	// Local is the set for traffic that must stay on this node: local ready
	// endpoints, or local serving-and-terminating ones when none is ready.
	Local []endpoints.Endpoint
	// Any says whether the service port has a usable endpoint anywhere;
	// without one its traffic is rejected rather than dropped.
	Any bool
	// Topology says which hints narrowed Cluster: TopologyNode,
	// TopologyZone, or "" when none did.
	Topology string
	// ClusterFallback and LocalFallback say the set holds
	// serving-and-terminating endpoints because none was ready.
	ClusterFallback, LocalFallback bool
}

// The hints that can narrow the cluster set (EndpointSets.Topology).
const (
	TopologyNode = "node" // hints.forNodes (trafficDistribution: PreferSameNode)
	TopologyZone = "zone" // hints.forZones (topology-aware routing, PreferSameZone)
)

// Internal is where traffic to the ClusterIP goes: the local set under
// internalTrafficPolicy: Local, the cluster set otherwise.
func (s EndpointSets) Internal(svc *endpoints.ServicePort) []endpoints.Endpoint {
	if svc.InternalPolicyLocal {
		return s.Local
	}
	return s.Cluster
}

// External is where traffic from outside to an external address goes: the
// local set under externalTrafficPolicy: Local, the cluster set otherwise.
func (s EndpointSets) External(svc *endpoints.ServicePort) []endpoints.Endpoint {
	if svc.ExternalPolicyLocal {
		return s.Local
	}
	return s.Cluster
}

// Categorize decides, following upstream kube-proxy, which of eps (one
// family's endpoints of svc, see OfFamily) each kind of traffic may use:
// cluster endpoints are computed only when some traffic uses them, local
// ones only when some traffic needs them.
func Categorize(svc *endpoints.ServicePort, eps []endpoints.Endpoint, node endpoints.Node) EndpointSets {
	var out EndpointSets
	if svc.UsesClusterEndpoints() {
		near, topology := topologyFilter(eps, node)
		out.Cluster = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Ready && near(ep) })
		if len(out.Cluster) == 0 {
			out.Cluster = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Fallback() && near(ep) })
			out.ClusterFallback = len(out.Cluster) > 0
		}
		out.Any = len(out.Cluster) > 0
		if len(out.Cluster) > 0 {
			out.Topology = topology
		}
	}
	if !svc.UsesLocalEndpoints() {
		return out
	}
	localReady, localTerminating := false, false
	for _, ep := range eps {
		out.Any = out.Any || ep.Usable()
		localReady = localReady || (ep.Local && ep.Ready)
		localTerminating = localTerminating || (ep.Local && ep.Fallback())
	}
	switch {
	case localReady:
		out.Local = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Local && ep.Ready })
	case localTerminating:
		out.Local = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Local && ep.Fallback() })
		out.LocalFallback = true
	}
	return out
}

// topologyFilter says which endpoints the hints leave to this node's
// cluster traffic, as upstream decides it: node hints when every ready
// endpoint carries one and one names this node (trafficDistribution:
// PreferSameNode); otherwise zone hints when every ready endpoint carries
// one and one names this node's zone; otherwise every endpoint, so that
// hints never lose traffic. It also names the hints it used.
func topologyFilter(eps []endpoints.Endpoint, node endpoints.Node) (func(endpoints.Endpoint) bool, string) {
	everyone := func(endpoints.Endpoint) bool { return true }
	ready, allNode, forNode, allZone, forZone := false, true, false, true, false
	for _, ep := range eps {
		if !ep.Ready {
			continue
		}
		ready = true
		allNode = allNode && len(ep.NodeHints) > 0
		forNode = forNode || (node.Name != "" && slices.Contains(ep.NodeHints, node.Name))
		allZone = allZone && len(ep.ZoneHints) > 0
		forZone = forZone || (node.Zone != "" && slices.Contains(ep.ZoneHints, node.Zone))
	}
	switch {
	case !ready:
		return everyone, ""
	case allNode && forNode:
		return func(ep endpoints.Endpoint) bool { return slices.Contains(ep.NodeHints, node.Name) }, TopologyNode
	case allZone && forZone:
		return func(ep endpoints.Endpoint) bool { return slices.Contains(ep.ZoneHints, node.Zone) }, TopologyZone
	}
	return everyone, ""
}

// OfFamily keeps the endpoints of one family: each family's rules send
// traffic only to endpoints of that family.
func OfFamily(eps []endpoints.Endpoint, fam iptables.Family) []endpoints.Endpoint {
	return filter(eps, func(ep endpoints.Endpoint) bool { return familyOf(ep.IP) == fam })
}

func filter(eps []endpoints.Endpoint, keep func(endpoints.Endpoint) bool) []endpoints.Endpoint {
	var out []endpoints.Endpoint
	for _, ep := range eps {
		if keep(ep) {
			out = append(out, ep)
		}
	}
	return out
}
