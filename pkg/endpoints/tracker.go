package endpoints

import (
	"cmp"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// objectKey names a namespaced object (a Service or an EndpointSlice).
type objectKey struct {
	namespace, name string
}

func (k objectKey) String() string { return k.namespace + "/" + k.name }

// InvalidFunc is told about every part of a Service or EndpointSlice that
// was ignored because it is invalid: kind is "Service" or "EndpointSlice",
// reason says what was wrong and what was dropped. The daemon can turn these
// into Events or a metric. It is called again for an object only when that
// object's set of problems changes, so informer resyncs do not repeat it.
type InvalidFunc func(kind, namespace, name, reason string)

// Tracker turns informer events for Services, EndpointSlices and our own
// Node into immutable Snapshots, and remembers which service ports changed
// between two snapshots so that the rules can be rewritten only where needed.
//
// All methods are safe for concurrent use: informer handlers may call the
// On* methods from their own goroutines while the sync loop calls Snapshot.
type Tracker struct {
	nodeName  string
	log       *slog.Logger
	onInvalid InvalidFunc

	serviceEvents  atomic.Int64
	endpointEvents atomic.Int64

	mu       sync.Mutex
	onChange func()
	// services holds the valid ports of each proxied Service, in spec order.
	services map[objectKey][]*ServicePort
	// slices holds every EndpointSlice we use, by the slice's own name.
	slices map[objectKey]*convertedSlice
	// slicesOf indexes slices by Service: service -> slice names, sorted
	// (a Service has one or a few slices; a list costs less than a set).
	slicesOf map[objectKey][]string
	// reported holds the problems last reported per "kind/ns/name".
	reported map[string][]string
	node     Node

	// dirtyServices and dirtyEndpoints name the Services whose spec or
	// endpoints changed since the last Snapshot.
	dirtyServices  map[objectKey]bool
	dirtyEndpoints map[objectKey]bool
	// oldest is when the oldest change not yet taken by Snapshot arrived.
	oldest time.Time

	// prev is the last snapshot handed out; applied holds, per Service, the
	// port names it has in prev.
	prev    *Snapshot
	applied map[objectKey][]ServicePortName
	// dropExternalIPs is DropExternalIPs.
	dropExternalIPs bool
}

// NewTracker makes a Tracker for the node named nodeName (the name
// EndpointSlices use in nodeName, i.e. --hostname-override). logger may be
// nil to discard logs; onInvalid may be nil. Until our Node object is seen,
// the snapshot's Node is {Name: nodeName, Eligible: true}.
func NewTracker(nodeName string, logger *slog.Logger, onInvalid InvalidFunc) *Tracker {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	node := Node{Name: nodeName, Eligible: true}
	return &Tracker{
		nodeName:       nodeName,
		log:            logger,
		onInvalid:      onInvalid,
		services:       map[objectKey][]*ServicePort{},
		slices:         map[objectKey]*convertedSlice{},
		slicesOf:       map[objectKey][]string{},
		reported:       map[string][]string{},
		node:           node,
		dirtyServices:  map[objectKey]bool{},
		dirtyEndpoints: map[objectKey]bool{},
		prev: &Snapshot{
			Node:      node,
			Services:  map[ServicePortName]*ServicePort{},
			Endpoints: map[ServicePortName][]Endpoint{},
			Changed:   map[ServicePortName]bool{},
		},
		applied: map[objectKey][]ServicePortName{},
	}
}

// DropExternalIPs makes the Tracker ignore spec.externalIPs, as kube-proxy
// with the feature gate AllowServiceExternalIPs=false: no rules for those
// addresses, while the Service still counts as externally accessible (as
// upstream, which decides that from the spec). Call it before any event.
func (t *Tracker) DropExternalIPs() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.dropExternalIPs = true
}

// withoutExternalIPs copies the ports that have external IPs without them.
func withoutExternalIPs(ports []*ServicePort) []*ServicePort {
	out := make([]*ServicePort, len(ports))
	for i, p := range ports {
		out[i] = p
		if len(p.ExternalIPs) > 0 {
			c := *p
			c.ExternalIPs = nil
			out[i] = &c
		}
	}
	return out
}

// SetOnChange registers f to be called after every event that changed the
// tracked state (not for no-op updates such as informer resyncs), so the
// daemon knows a sync is due. f is called outside the Tracker's lock, from
// the informer's goroutine: it must not block for long (a non-blocking send
// on a buffered channel is the intended use). It may call Snapshot.
func (t *Tracker) SetOnChange(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.onChange = f
}

// OnServiceAdd records a new Service.
func (t *Tracker) OnServiceAdd(svc *v1.Service) { t.setService(keyOf(svc), convertService(svc)) }

// OnServiceUpdate records a changed Service; only the new version matters.
func (t *Tracker) OnServiceUpdate(_, svc *v1.Service) { t.setService(keyOf(svc), convertService(svc)) }

// OnServiceDelete forgets a Service; its ports appear in the next snapshot's
// Changed and disappear from its Services.
func (t *Tracker) OnServiceDelete(svc *v1.Service) { t.deleteService(keyOf(svc)) }

// keyOf names an object by namespace and name.
func keyOf(o metav1.Object) objectKey { return objectKey{o.GetNamespace(), o.GetName()} }

func (t *Tracker) deleteService(key objectKey) {
	t.serviceEvents.Add(1)
	t.record("Service", key, "", nil, func() bool {
		if _, found := t.services[key]; !found {
			return false
		}
		delete(t.services, key)
		t.markDirtyLocked(t.dirtyServices, key)
		return true
	})
}

// setService records what convertService made of the Service named key.
func (t *Tracker) setService(key objectKey, conv convertedService) {
	t.serviceEvents.Add(1)
	t.record("Service", key, conv.skipped, conv.problems, func() bool {
		ports := conv.ports
		if t.dropExternalIPs {
			ports = withoutExternalIPs(ports)
		}
		if servicePortsEqual(t.services[key], ports) {
			return false
		}
		if len(ports) == 0 {
			delete(t.services, key)
		} else {
			t.services[key] = ports
		}
		t.markDirtyLocked(t.dirtyServices, key)
		return true
	})
}

// record is the one way an event changes what the Tracker holds about an
// object of kind ("Service" or "EndpointSlice"): skipped, when not "", is
// why the object is not used at all (logged at debug level); apply makes the
// change under the lock and says whether anything changed; the object's
// problems replace those recorded for it (none for a deleted object). Then,
// outside the lock (onChange may call Snapshot, and onInvalid may take its
// time), the new problems are reported and onChange is called if something
// changed.
func (t *Tracker) record(kind string, key objectKey, skipped string, problems []string, apply func() bool) {
	if skipped != "" {
		t.log.Debug("not using "+kind, "object", key.String(), "reason", skipped)
	}
	t.mu.Lock()
	changed := apply()
	fresh := t.reportLocked(kind, key, problems)
	cb := t.onChange
	t.mu.Unlock()
	t.emit(kind, key, fresh)
	if changed && cb != nil {
		cb()
	}
}

// OnEndpointSliceAdd records a new EndpointSlice.
func (t *Tracker) OnEndpointSliceAdd(s *discoveryv1.EndpointSlice) {
	t.setSlice(keyOf(s), convertSlice(s))
}

// OnEndpointSliceUpdate records a changed EndpointSlice; only the new
// version matters (a slice may even move to another Service).
func (t *Tracker) OnEndpointSliceUpdate(_, s *discoveryv1.EndpointSlice) {
	t.setSlice(keyOf(s), convertSlice(s))
}

// OnEndpointSliceDelete forgets an EndpointSlice.
func (t *Tracker) OnEndpointSliceDelete(s *discoveryv1.EndpointSlice) { t.deleteSlice(keyOf(s)) }

func (t *Tracker) deleteSlice(key objectKey) {
	t.endpointEvents.Add(1)
	t.record("EndpointSlice", key, "", nil, func() bool {
		old := t.slices[key]
		if old == nil {
			return false
		}
		t.removeSliceLocked(key, old)
		return true
	})
}

// setSlice records what convertSlice made of the EndpointSlice named key.
func (t *Tracker) setSlice(key objectKey, s sliceConversion) {
	t.endpointEvents.Add(1)
	t.record("EndpointSlice", key, s.skipped, s.problems, func() bool {
		old, conv := t.slices[key], s.slice
		if conv != nil && old != nil && old.equal(conv) {
			return false
		}
		if old != nil {
			t.removeSliceLocked(key, old)
		}
		if conv != nil {
			t.addSliceLocked(key, conv)
		}
		return old != nil || conv != nil
	})
}

func (t *Tracker) addSliceLocked(key objectKey, s *convertedSlice) {
	svc := objectKey{s.service.Namespace, s.service.Name}
	t.slices[key] = s
	names := t.slicesOf[svc]
	if i, found := slices.BinarySearch(names, key.name); !found {
		t.slicesOf[svc] = slices.Insert(names, i, key.name)
	}
	t.markDirtyLocked(t.dirtyEndpoints, svc)
}

func (t *Tracker) removeSliceLocked(key objectKey, s *convertedSlice) {
	svc := objectKey{s.service.Namespace, s.service.Name}
	delete(t.slices, key)
	names := t.slicesOf[svc]
	if i, found := slices.BinarySearch(names, key.name); found {
		names = slices.Delete(names, i, i+1)
	}
	if len(names) == 0 {
		delete(t.slicesOf, svc)
	} else {
		t.slicesOf[svc] = names
	}
	t.markDirtyLocked(t.dirtyEndpoints, svc)
}

// OnNodeAdd records our Node; Nodes with another name are ignored.
func (t *Tracker) OnNodeAdd(n *v1.Node) { t.updateNode(n, false) }

// OnNodeUpdate records a change of our Node; Nodes with another name are ignored.
func (t *Tracker) OnNodeUpdate(_, n *v1.Node) { t.updateNode(n, false) }

// OnNodeDelete records that our Node is gone: the snapshot's Node keeps its
// name but loses its zone and is no longer Eligible.
func (t *Tracker) OnNodeDelete(n *v1.Node) { t.updateNode(n, true) }

func (t *Tracker) updateNode(n *v1.Node, deleted bool) {
	if n.Name != t.nodeName {
		return
	}
	node := Node{Name: t.nodeName}
	if !deleted {
		node = convertNode(n)
	}
	t.mu.Lock()
	changed := node != t.node
	if changed {
		t.node = node
		if t.oldest.IsZero() {
			t.oldest = time.Now()
		}
	}
	cb := t.onChange
	t.mu.Unlock()
	if changed {
		t.log.Info("node changed", "node", node.Name, "zone", node.Zone, "eligible", node.Eligible)
		if cb != nil {
			cb()
		}
	}
}

func (t *Tracker) markDirtyLocked(set map[objectKey]bool, key objectKey) {
	set[key] = true
	if t.oldest.IsZero() {
		t.oldest = time.Now()
	}
}

// reportLocked records an object's current problems and returns those not
// reported for it before.
func (t *Tracker) reportLocked(kind string, key objectKey, problems []string) []string {
	k := kind + "/" + key.String()
	old := t.reported[k]
	if slices.Equal(old, problems) {
		return nil
	}
	if len(problems) == 0 {
		delete(t.reported, k)
		return nil
	}
	t.reported[k] = problems
	var fresh []string
	for _, p := range problems {
		if !slices.Contains(old, p) {
			fresh = append(fresh, p)
		}
	}
	return fresh
}

// emit logs and hands to onInvalid each new problem of one object.
func (t *Tracker) emit(kind string, key objectKey, problems []string) {
	for _, p := range problems {
		t.log.Warn("ignoring invalid input", "kind", kind, "object", key.String(), "reason", p)
		if t.onInvalid != nil {
			t.onInvalid(kind, key.namespace, key.name, p)
		}
	}
}

// Pending says whether a change arrived since the last Snapshot. (The
// change may still turn out to change no service port, e.g. endpoints of a
// Service we do not proxy.)
func (t *Tracker) Pending() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.dirtyServices) > 0 || len(t.dirtyEndpoints) > 0 || t.node != t.prev.Node
}

// OldestPending is when the oldest change not yet taken by Snapshot
// arrived, or the zero time when there is none. The health server uses it
// to say "no change has waited longer than X". A caller that wants to keep
// that time until its sync succeeds should read it before calling Snapshot,
// which resets it.
func (t *Tracker) OldestPending() time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.oldest
}

// PendingChanges counts the Services whose spec changed and the Services
// whose endpoints changed since the last Snapshot, for the
// kubeproxy_sync_proxy_rules_{service,endpoint}_changes_pending metrics.
func (t *Tracker) PendingChanges() (services, endpoints int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.dirtyServices), len(t.dirtyEndpoints)
}

// ServiceChangesTotal counts every Service event received (no-op updates
// included, as upstream counts them), for the
// kubeproxy_sync_proxy_rules_service_changes_total metric.
func (t *Tracker) ServiceChangesTotal() int64 { return t.serviceEvents.Load() }

// EndpointChangesTotal counts every EndpointSlice event received, for the
// kubeproxy_sync_proxy_rules_endpoint_changes_total metric.
func (t *Tracker) EndpointChangesTotal() int64 { return t.endpointEvents.Load() }

// Snapshot returns the current state. Its Changed names every service port
// whose ServicePort or endpoint list differs from the previous Snapshot's
// (including ports that disappeared), or every service port of both when
// the Node changed, since topology and eligibility concern all of them; the
// first call therefore lists everything. It resets Pending and
// OldestPending.
//
// The snapshot shares unchanged ServicePorts and endpoint lists with earlier
// ones; nobody may modify anything reachable from it.
func (t *Tracker) Snapshot() *Snapshot {
	t.mu.Lock()
	defer t.mu.Unlock()

	prev := t.prev
	nodeChanged := t.node != prev.Node
	snap := &Snapshot{
		Node:      t.node,
		Services:  prev.Services,
		Endpoints: prev.Endpoints,
		Changed:   map[ServicePortName]bool{},
	}
	if len(t.dirtyServices) > 0 || len(t.dirtyEndpoints) > 0 {
		snap.Services = maps.Clone(prev.Services)
		snap.Endpoints = maps.Clone(prev.Endpoints)
		dirty := maps.Clone(t.dirtyServices)
		maps.Copy(dirty, t.dirtyEndpoints)
		for key := range dirty {
			t.rebuildLocked(key, prev, snap)
		}
	}
	if nodeChanged {
		for n := range prev.Services {
			snap.Changed[n] = true
		}
		for n := range snap.Services {
			snap.Changed[n] = true
		}
	}
	// Fresh sets rather than clear(): a map keeps its largest size, and
	// the first snapshot had every Service in them.
	t.dirtyServices = map[objectKey]bool{}
	t.dirtyEndpoints = map[objectKey]bool{}
	t.oldest = time.Time{}
	t.prev = snap.WithoutChanges()
	return snap
}

// rebuildLocked recomputes one Service's ports and endpoints in snap (a
// copy of prev's maps) and records in snap.Changed what differs from prev.
func (t *Tracker) rebuildLocked(key objectKey, prev, snap *Snapshot) {
	oldNames := t.applied[key]
	for _, n := range oldNames {
		delete(snap.Services, n)
		delete(snap.Endpoints, n)
	}
	ports := t.services[key]
	eps := t.endpointsLocked(key, ports)
	names := make([]ServicePortName, 0, len(ports))
	for _, p := range ports {
		snap.Services[p.Name] = p
		snap.Endpoints[p.Name] = eps[p.Name]
		names = append(names, p.Name)
		old, ok := prev.Services[p.Name]
		if !ok || !servicePortEqual(old, p) || !endpointsEqual(prev.Endpoints[p.Name], eps[p.Name]) {
			snap.Changed[p.Name] = true
		}
	}
	for _, n := range oldNames {
		if _, ok := snap.Services[n]; !ok {
			snap.Changed[n] = true
		}
	}
	if len(names) > 0 {
		t.applied[key] = names
	} else {
		delete(t.applied, key)
	}
}

// endpointsLocked merges all slices of one Service into per-port endpoint
// lists. A slice port belongs to the service port with the same name and
// protocol (as upstream matches them). The same IP:port in several slices
// (an endpoint moving between slices) is kept once, preferring a ready copy,
// then a serving one, then a local one, then the slice whose name sorts
// first. Lists are sorted by IP, then port.
func (t *Tracker) endpointsLocked(key objectKey, ports []*ServicePort) map[ServicePortName][]Endpoint {
	if len(ports) == 0 {
		return nil
	}
	byName := make(map[string]*ServicePort, len(ports))
	for _, p := range ports {
		byName[p.Name.Port] = p
	}
	sliceNames := t.slicesOf[key]
	sets := map[ServicePortName]map[netip.AddrPort]Endpoint{}
	for _, sn := range sliceNames {
		s := t.slices[objectKey{key.namespace, sn}]
		for _, sp := range s.ports {
			p := byName[sp.name]
			if p == nil || p.Protocol != sp.protocol {
				continue
			}
			set := sets[p.Name]
			if set == nil {
				set = make(map[netip.AddrPort]Endpoint, len(s.endpoints))
				sets[p.Name] = set
			}
			for i := range s.endpoints {
				e := &s.endpoints[i]
				ep := Endpoint{
					IP:          e.ip,
					Port:        sp.port,
					Ready:       e.ready,
					Serving:     e.serving,
					Terminating: e.terminating,
					NodeName:    e.nodeName,
					Zone:        e.zone,
					Local:       e.nodeName != "" && e.nodeName == t.nodeName,
					ZoneHints:   e.zoneHints,
					NodeHints:   e.nodeHints,
				}
				k := netip.AddrPortFrom(ep.IP, uint16(ep.Port))
				if old, ok := set[k]; !ok || preference(ep) > preference(old) {
					set[k] = ep
				}
			}
		}
	}
	out := make(map[ServicePortName][]Endpoint, len(sets))
	for name, set := range sets {
		list := slices.Collect(maps.Values(set))
		slices.SortFunc(list, func(a, b Endpoint) int {
			if c := a.IP.Compare(b.IP); c != 0 {
				return c
			}
			return cmp.Compare(a.Port, b.Port)
		})
		out[name] = list
	}
	return out
}

// preference ranks duplicate copies of one endpoint: ready, then serving,
// then local wins.
func preference(e Endpoint) int {
	r := 0
	if e.Ready {
		r += 4
	}
	if e.Serving {
		r += 2
	}
	if e.Local {
		r++
	}
	return r
}
