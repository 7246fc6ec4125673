package rules

import "github.com/miniproxy/miniproxy/pkg/endpoints"

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
func categorize(svc *endpoints.ServicePort, eps []endpoints.Endpoint, zone string) endpointSets {
	var out endpointSets
	if svc.UsesClusterEndpoints() {
		useZone := zoneHintsApply(eps, zone)
		inZone := func(ep endpoints.Endpoint) bool { return !useZone || hasZone(ep, zone) }
		out.cluster = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Ready && inZone(ep) })
		if len(out.cluster) == 0 {
			out.cluster = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Serving && ep.Terminating && inZone(ep) })
		}
		out.any = len(out.cluster) > 0
	}
	if !svc.UsesLocalEndpoints() {
		return out
	}
	localReady, localTerminating := false, false
	for _, ep := range eps {
		switch {
		case ep.Ready:
			out.any = true
			localReady = localReady || ep.Local
		case ep.Serving && ep.Terminating:
			out.any = true
			localTerminating = localTerminating || ep.Local
		}
	}
	switch {
	case localReady:
		out.local = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Local && ep.Ready })
	case localTerminating:
		out.local = filter(eps, func(ep endpoints.Endpoint) bool { return ep.Local && ep.Serving && ep.Terminating })
	}
	return out
}

// zoneHintsApply says whether topology hints narrow the cluster set: every
// ready endpoint carries zone hints and at least one names this node's zone.
// Otherwise hints are ignored, as upstream does, so that no traffic is lost.
func zoneHintsApply(eps []endpoints.Endpoint, zone string) bool {
	if zone == "" {
		return false
	}
	forZone := false
	for _, ep := range eps {
		if !ep.Ready {
			continue
		}
		if len(ep.ZoneHints) == 0 {
			return false
		}
		forZone = forZone || hasZone(ep, zone)
	}
	return forZone
}

func hasZone(ep endpoints.Endpoint, zone string) bool {
	for _, z := range ep.ZoneHints {
		if z == zone {
			return true
		}
	}
	return false
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
