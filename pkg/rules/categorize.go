package rules

import (
	"slices"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
)

// endpointSets is the answer to "where may traffic to this service port go"
// from this node, split the way the traffic policies need it.
type endpointSets struct {
	// cluster is the set for traffic that may go to any node: ready endpoints
	// (narrowed to this zone when topology hints say so), or, when none is
	// ready anywhere, serving-and-terminating ones.
	cluster []endpoints.Endpoint
	// local is the set for traffic that must stay on this node: local ready
	// endpoints, or local serving-and-terminating ones when none is ready.
	local []endpoints.Endpoint
	// any says whether the service port has a usable endpoint anywhere;
	// without one its traffic is rejected rather than dropped.
	any bool
}

// categorize follows upstream kube-proxy: cluster endpoints are computed only
// when some traffic uses them, local ones only when some traffic needs them.
func categorize(svc *endpoints.ServicePort, eps []endpoints.Endpoint, node endpoints.Node) endpointSets {
	var out endpointSets
	if svc.UsesClusterEndpoints() {
		near := topologyFilter(eps, node)
		out.cluster = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Ready && near(ep) })
		if len(out.cluster) == 0 {
			out.cluster = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Fallback() && near(ep) })
		}
		out.any = len(out.cluster) > 0
	}
	if !svc.UsesLocalEndpoints() {
		return out
	}
	localReady, localTerminating := false, false
	for _, ep := range eps {
		out.any = out.any || ep.Usable()
		localReady = localReady || (ep.Local && ep.Ready)
		localTerminating = localTerminating || (ep.Local && ep.Fallback())
	}
	switch {
	case localReady:
		out.local = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Local && ep.Ready })
	case localTerminating:
		out.local = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Local && ep.Fallback() })
	}
	return out
}

// topologyFilter says which endpoints the hints leave to this node's
// cluster traffic, as upstream decides it: node hints when every ready
// endpoint carries one and one names this node (trafficDistribution:
// PreferSameNode); otherwise zone hints when every ready endpoint carries
// one and one names this node's zone; otherwise every endpoint, so that
// hints never lose traffic.
func topologyFilter(eps []endpoints.Endpoint, node endpoints.Node) func(endpoints.Endpoint) bool {
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
		return everyone
	case allNode && forNode:
		return func(ep endpoints.Endpoint) bool { return slices.Contains(ep.NodeHints, node.Name) }
	case allZone && forZone:
		return func(ep endpoints.Endpoint) bool { return slices.Contains(ep.ZoneHints, node.Zone) }
	}
	return everyone
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
