// Package endpoints turns the cluster's Services and EndpointSlices into an
// immutable snapshot of service ports and their endpoints, and remembers which
// service ports changed since the last sync. It knows nothing about iptables.
package endpoints

import (
	"fmt"
	"net/netip"
	"sort"
)

// Protocol is a service port's transport protocol as Kubernetes spells it.
type Protocol string

// The protocols a Service port may use.
const (
	TCP  Protocol = "TCP"
	UDP  Protocol = "UDP"
	SCTP Protocol = "SCTP"
)

// ServicePortName identifies one port of one Service; rules, health checks and
// logs all refer to service ports by it.
type ServicePortName struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Port is the port's name in the Service spec ("" for a single unnamed port).
	Port string `json:"port,omitempty"`
}

// String gives the kube-proxy spelling "ns/name:port" (":port" omitted when unnamed),
// which is what operators grep for in rule comments and logs.
func (n ServicePortName) String() string {
	if n.Port == "" {
		return n.Namespace + "/" + n.Name
	}
	return fmt.Sprintf("%s/%s:%s", n.Namespace, n.Name, n.Port)
}

// ServiceName drops the port, for the things that exist once per Service
// (health check ports, events).
func (n ServicePortName) ServiceName() ServicePortName {
	return ServicePortName{Namespace: n.Namespace, Name: n.Name}
}

// ServicePort is everything the rules need to know about one port of one
// Service, already validated: every address parses and every port is in range.
type ServicePort struct {
	Name     ServicePortName `json:"name"`
	Protocol Protocol        `json:"protocol"`
	Port     int32           `json:"port"`
	NodePort int32           `json:"nodePort,omitempty"` // 0 when the Service has none

	// ClusterIPs holds at most one address per family.
	ClusterIPs []netip.Addr `json:"clusterIPs"`
	// ExternalIPs are spec.externalIPs.
	ExternalIPs []netip.Addr `json:"externalIPs,omitempty"`
	// LoadBalancerIPs are the IPs of status.loadBalancer.ingress (hostnames are
	// skipped, as upstream does; ingress with ipMode Proxy is skipped too).
	LoadBalancerIPs []netip.Addr `json:"loadBalancerIPs,omitempty"`
	// LoadBalancerSourceRanges restricts who may reach LoadBalancerIPs; empty means everyone.
	LoadBalancerSourceRanges []netip.Prefix `json:"loadBalancerSourceRanges,omitempty"`

	// ExternalPolicyLocal is externalTrafficPolicy: Local on an externally reachable Service.
	ExternalPolicyLocal bool `json:"externalPolicyLocal,omitempty"`
	// InternalPolicyLocal is internalTrafficPolicy: Local.
	InternalPolicyLocal bool `json:"internalPolicyLocal,omitempty"`
	// HealthCheckNodePort is spec.healthCheckNodePort (0 when unset).
	HealthCheckNodePort int32 `json:"healthCheckNodePort,omitempty"`
	// AffinityTimeoutSeconds is the ClientIP session affinity timeout; 0 means no affinity.
	AffinityTimeoutSeconds int32 `json:"affinityTimeoutSeconds,omitempty"`
}

// ExternallyAccessible says whether traffic from outside the cluster can reach
// this port through a NodePort, an external IP or a load balancer IP; only
// then does externalTrafficPolicy mean anything.
func (s *ServicePort) ExternallyAccessible() bool {
	return s.NodePort != 0 || len(s.ExternalIPs) > 0 || len(s.LoadBalancerIPs) > 0
}

// UsesClusterEndpoints says whether some traffic to this port may go to
// endpoints on any node (upstream's definition): ClusterIP traffic under
// the Cluster policy, and any externally reachable port, even with the
// Local policy, because pods and the node itself reach its external
// addresses through every endpoint (found by the parity test: with both
// policies Local, pods were limited to this node's endpoints).
func (s *ServicePort) UsesClusterEndpoints() bool {
	return !s.InternalPolicyLocal || s.ExternallyAccessible()
}

// UsesLocalEndpoints says whether some traffic to this port may only go to
// endpoints on this node (upstream's definition).
func (s *ServicePort) UsesLocalEndpoints() bool {
	return s.InternalPolicyLocal || (s.ExternallyAccessible() && s.ExternalPolicyLocal)
}

// Endpoint is one backend address of a service port, merged from whichever
// EndpointSlice carried it.
type Endpoint struct {
	IP   netip.Addr `json:"ip"`
	Port int32      `json:"port"`
	// Ready, Serving and Terminating are the EndpointSlice conditions, with
	// the API's and upstream's defaults applied (nil ready means true, nil
	// serving means true, nil terminating means false).
	Ready       bool `json:"ready"`
	Serving     bool `json:"serving"`
	Terminating bool `json:"terminating"`
	// NodeName is the endpoint's node ("" when unknown).
	NodeName string `json:"nodeName,omitempty"`
	// Zone is the endpoint's zone in its EndpointSlice ("" when unset);
	// the rules do not use it, explanations show it.
	Zone string `json:"zone,omitempty"`
	// Local says the endpoint runs on this node.
	Local bool `json:"local"`
	// ZoneHints are hints.forZones; empty when the slice carries no hints.
	ZoneHints []string `json:"zoneHints,omitempty"`
	// NodeHints are hints.forNodes (trafficDistribution: PreferSameNode);
	// empty when the slice carries none.
	NodeHints []string `json:"nodeHints,omitempty"`
}

// Fallback says whether the endpoint is terminating but still serving: by
// upstream's rule such endpoints get traffic only when the Service has no
// ready endpoint for it (rules.categorize).
func (e Endpoint) Fallback() bool { return e.Serving && e.Terminating }

// Usable says whether traffic may be sent to the endpoint at all: it is
// ready, or a Fallback.
func (e Endpoint) Usable() bool { return e.Ready || e.Fallback() }

// String gives "ip:port" (with brackets for IPv6), the DNAT target spelling.
func (e Endpoint) String() string {
	return netip.AddrPortFrom(e.IP, uint16(e.Port)).String()
}

// Node is what the rules need to know about the node miniproxy runs on.
type Node struct {
	Name string `json:"name"`
	// Zone is the topology.kubernetes.io/zone label ("" when unset).
	Zone string `json:"zone,omitempty"`
	// Eligible is false once the Node is being deleted or is tainted
	// ToBeDeletedByClusterAutoscaler.
	Eligible bool `json:"eligible"`
}

// Snapshot is the cluster state at one moment. It is never modified after it
// was made, so the rules can be computed from it without locks.
type Snapshot struct {
	Node Node
	// Services holds every valid service port this proxy is responsible for.
	Services map[ServicePortName]*ServicePort
	// Endpoints holds, per service port, its endpoints sorted by IP then port.
	Endpoints map[ServicePortName][]Endpoint
	// Changed names the service ports whose service or endpoints changed since
	// the previous snapshot (including ones that disappeared).
	Changed map[ServicePortName]bool
}

// SortedNames returns the snapshot's service port names in a stable order,
// so that everything computed from a snapshot is deterministic.
func (s *Snapshot) SortedNames() []ServicePortName {
	names := make([]ServicePortName, 0, len(s.Services))
	for n := range s.Services {
		names = append(names, n)
	}
	sort.Slice(names, func(i, j int) bool { return LessName(names[i], names[j]) })
	return names
}

// LessName orders service port names by namespace, name, then port name.
func LessName(a, b ServicePortName) bool {
	if a.Namespace != b.Namespace {
		return a.Namespace < b.Namespace
	}
	if a.Name != b.Name {
		return a.Name < b.Name
	}
	return a.Port < b.Port
}

// WithoutChanges is s without its Changed set, for keeping a snapshot
// around (the base of the next one, what the kernel holds): the first
// snapshot's set names every service port.
func (s *Snapshot) WithoutChanges() *Snapshot {
	return &Snapshot{Node: s.Node, Services: s.Services, Endpoints: s.Endpoints}
}
