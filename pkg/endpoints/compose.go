package endpoints

import "sort"

// SameList says whether a and b are the same endpoint list, not merely
// equal ones. Snapshots share the lists (and ServicePorts) of whatever did
// not change, so identity is how later stages tell what changed.
func SameList(a, b []Endpoint) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}

// PortsOf lists the ports snap holds for the Service svc (a name without
// port), sorted.
func (s *Snapshot) PortsOf(svc ServicePortName) []ServicePortName {
	var out []ServicePortName
	for n := range s.Services {
		if n.ServiceName() == svc {
			out = append(out, n)
		}
	}
	sort.Slice(out, func(i, j int) bool { return LessName(out[i], out[j]) })
	return out
}

// SameService says whether the Service svc (a name without port) has the
// same ports and endpoint lists in a and b, by identity.
func SameService(a, b *Snapshot, svc ServicePortName) bool {
	pa, pb := a.PortsOf(svc), b.PortsOf(svc)
	if len(pa) != len(pb) {
		return false
	}
	for i, n := range pa {
		if pb[i] != n || a.Services[n] != b.Services[n] || !SameList(a.Endpoints[n], b.Endpoints[n]) {
			return false
		}
	}
	return true
}

// ChangedServices names, sorted and without ports, the Services whose
// ports or endpoints differ between from and to, including Services only
// one of them has.
func ChangedServices(from, to *Snapshot) []ServicePortName {
	changed := map[ServicePortName]bool{}
	for n, sp := range to.Services {
		old, ok := from.Services[n]
		if !ok || old != sp || !SameList(from.Endpoints[n], to.Endpoints[n]) {
			changed[n.ServiceName()] = true
		}
	}
	for n := range from.Services {
		if _, ok := to.Services[n]; !ok {
			changed[n.ServiceName()] = true
		}
	}
	out := make([]ServicePortName, 0, len(changed))
	for n := range changed {
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return LessName(out[i], out[j]) })
	return out
}

// Compose is next, except that the Services named in keep (names without
// port) are as base has them: with base's ports and endpoints, or absent
// when base lacks them. It lets the proxy program every Service but those
// whose new rules the kernel refused, which keep their last accepted ones.
// The result shares base's and next's ports and lists and has no Changed set.
func Compose(base, next *Snapshot, keep map[ServicePortName]bool) *Snapshot {
	out := &Snapshot{
		Node:      next.Node,
		Services:  make(map[ServicePortName]*ServicePort, len(next.Services)),
		Endpoints: make(map[ServicePortName][]Endpoint, len(next.Endpoints)),
	}
	for n, sp := range next.Services {
		if !keep[n.ServiceName()] {
			out.Services[n] = sp
			out.Endpoints[n] = next.Endpoints[n]
		}
	}
	for n, sp := range base.Services {
		if keep[n.ServiceName()] {
			out.Services[n] = sp
			out.Endpoints[n] = base.Endpoints[n]
		}
	}
	return out
}

// OnlyService is a snapshot holding nothing but the ports and endpoints of
// the Service svc (a name without port), sharing them with s: small enough
// to keep as the record of one Service's version.
func (s *Snapshot) OnlyService(svc ServicePortName) *Snapshot {
	out := &Snapshot{Node: s.Node, Services: map[ServicePortName]*ServicePort{}, Endpoints: map[ServicePortName][]Endpoint{}}
	for _, n := range s.PortsOf(svc) {
		out.Services[n] = s.Services[n]
		out.Endpoints[n] = s.Endpoints[n]
	}
	return out
}
