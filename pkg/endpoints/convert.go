package endpoints

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// Labels, annotations and taints whose meaning this package implements.
const (
	// LabelServiceProxyName marks a Service (and, copied by the EndpointSlice
	// controller, its slices) as handled by another proxy; such objects are
	// ignored, whatever the label's value.
	LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"
	// LabelHeadless marks the EndpointSlices of a headless Service.
	LabelHeadless = v1.IsHeadlessService
	// LabelServiceName names the Service an EndpointSlice belongs to.
	LabelServiceName = discoveryv1.LabelServiceName
	// LabelZone is the Node label whose value becomes Node.Zone.
	LabelZone = v1.LabelTopologyZone
	// TaintToBeDeletedByClusterAutoscaler is put on a Node the cluster
	// autoscaler is about to remove; such a Node is no longer Eligible.
	TaintToBeDeletedByClusterAutoscaler = "ToBeDeletedByClusterAutoscaler"

	// defaultAffinityTimeoutSeconds is the API's default ClientIP session
	// affinity timeout (3 hours).
	defaultAffinityTimeoutSeconds = 10800
	// maxAffinityTimeoutSeconds is the largest timeout the API accepts (1 day).
	maxAffinityTimeoutSeconds = 86400
)

// ignoredByLabels says whether an object carries one of the labels that make
// this proxy ignore it. The informers of Watch filter on the same labels on
// the server side; checking again here keeps the Tracker's behaviour the
// same when it is fed by something else (tests, a resync, a future caller).
func ignoredByLabels(labels map[string]string) (bool, string) {
	if _, ok := labels[LabelServiceProxyName]; ok {
		return true, "label " + LabelServiceProxyName + " is set"
	}
	if _, ok := labels[LabelHeadless]; ok {
		return true, "label " + LabelHeadless + " is set"
	}
	return false, ""
}

// convertedService is a Service as the Tracker keeps it: its valid ports and
// whatever was wrong with it.
type convertedService struct {
	// ports holds the valid ports in spec order; nil when the Service is
	// skipped or invalid.
	ports []*ServicePort
	// skipped is why the Service is not proxied at all for reasons that are
	// not errors (headless, ExternalName, another proxy's label); "" otherwise.
	skipped string
	// problems lists what was wrong with the Service (whole or in part), one
	// human-readable reason each.
	problems []string
}

// convertService turns a Service into its service ports, following upstream
// kube-proxy. It runs the steps below in order; each decides one thing and
// says what it dropped, so the problems come in the order of the spec:
//   - notProxiedBecause: Services labelled service.kubernetes.io/service-proxy-name
//     (or the headless label), headless ones (clusterIP None), ones without a
//     cluster IP and type ExternalName are skipped without being invalid.
//   - clusterIPsOf: a cluster IP that does not parse makes the whole Service
//     invalid.
//   - externalIPsOf, loadBalancerIPsOf, sourceRangesOf: an address or range
//     that does not parse is dropped alone.
//   - externalPolicyLocal, internalPolicyLocal, healthCheckNodePortOf,
//     affinityTimeoutOf: what every port of the Service shares.
//   - servicePortsOf: a port with an unknown protocol or a port number out of
//     range is dropped alone; the other ports still work.
func convertService(svc *v1.Service) convertedService {
	if why := notProxiedBecause(svc); why != "" {
		return convertedService{skipped: why}
	}
	clusterIPs, problems, err := clusterIPsOf(rawClusterIPs(&svc.Spec))
	if err != nil {
		return convertedService{problems: append(problems, "Service ignored: "+err.Error())}
	}
	externalIPs, dropped := externalIPsOf(svc.Spec.ExternalIPs)
	problems = append(problems, dropped...)
	lbIPs, dropped := loadBalancerIPsOf(svc.Status.LoadBalancer.Ingress)
	problems = append(problems, dropped...)
	sourceRanges, dropped := sourceRangesOf(svc.Spec.LoadBalancerSourceRanges)
	problems = append(problems, dropped...)
	healthCheckNodePort, dropped := healthCheckNodePortOf(&svc.Spec)
	problems = append(problems, dropped...)
	affinity, dropped := affinityTimeoutOf(&svc.Spec)
	problems = append(problems, dropped...)

	shared := ServicePort{
		ClusterIPs:               clusterIPs,
		ExternalIPs:              externalIPs,
		LoadBalancerIPs:          lbIPs,
		LoadBalancerSourceRanges: sourceRanges,
		ExternalPolicyLocal:      externalPolicyLocal(&svc.Spec),
		InternalPolicyLocal:      internalPolicyLocal(&svc.Spec),
		HealthCheckNodePort:      healthCheckNodePort,
		AffinityTimeoutSeconds:   affinity,
	}
	ports, dropped := servicePortsOf(svc.Namespace, svc.Name, svc.Spec.Ports, shared)
	return convertedService{ports: ports, problems: append(problems, dropped...)}
}

// notProxiedBecause says why a Service gets no rules at all although
// nothing is wrong with it, or "" when it is proxied: another proxy's or the
// headless label, type ExternalName, no cluster IP, or clusterIP None.
func notProxiedBecause(svc *v1.Service) string {
	if ignored, why := ignoredByLabels(svc.Labels); ignored {
		return why
	}
	if svc.Spec.Type == v1.ServiceTypeExternalName {
		return "type ExternalName"
	}
	raw := rawClusterIPs(&svc.Spec)
	if len(raw) == 0 || raw[0] == "" {
		return "no cluster IP"
	}
	if raw[0] == v1.ClusterIPNone || svc.Spec.ClusterIP == v1.ClusterIPNone {
		return "headless (clusterIP None)"
	}
	return ""
}

// rawClusterIPs is spec.clusterIPs, or spec.clusterIP for an object that
// has only the older single-address field.
func rawClusterIPs(spec *v1.ServiceSpec) []string {
	if len(spec.ClusterIPs) == 0 && spec.ClusterIP != "" {
		return []string{spec.ClusterIP}
	}
	return spec.ClusterIPs
}

// clusterIPsOf keeps the first cluster IP of each family; a later one of the
// same family is dropped with a problem. A cluster IP that does not parse is
// an error: the Service cannot be proxied without knowing its addresses.
func clusterIPsOf(raw []string) (ips []netip.Addr, problems []string, err error) {
	for _, r := range raw {
		ip, err := parseAddr(r)
		if err != nil {
			return nil, problems, fmt.Errorf("cluster IP %q: %w", r, err)
		}
		if slices.ContainsFunc(ips, func(a netip.Addr) bool { return a.Is4() == ip.Is4() }) {
			problems = append(problems, fmt.Sprintf("second cluster IP %s of the same family ignored", ip))
			continue
		}
		ips = append(ips, ip)
	}
	return ips, problems, nil
}

// externalIPsOf parses spec.externalIPs. One that does not parse is dropped
// alone (upstream does the same: the API server may not have validated
// them, and dropping one address fails closed for it); empty strings are
// skipped silently, as upstream does; duplicates are kept once.
func externalIPsOf(raw []string) (ips []netip.Addr, problems []string) {
	for _, r := range raw {
		if strings.TrimSpace(r) == "" {
			continue
		}
		ip, err := parseAddr(r)
		if err != nil {
			problems = append(problems, fmt.Sprintf("external IP %q ignored: %v", r, err))
			continue
		}
		ips = appendUnique(ips, ip)
	}
	return ips, problems
}

// loadBalancerIPsOf picks the load balancer addresses the node captures:
// hostname-only ingress has nothing to program, and with ipMode Proxy the
// load balancer delivers to the node itself, so its VIP must not be captured
// on the node (upstream skips it). An IP that does not parse is dropped
// alone; duplicates are kept once.
func loadBalancerIPsOf(ingress []v1.LoadBalancerIngress) (ips []netip.Addr, problems []string) {
	for _, ing := range ingress {
		if ing.IP == "" {
			continue
		}
		if ing.IPMode != nil && *ing.IPMode != v1.LoadBalancerIPModeVIP {
			continue
		}
		ip, err := parseAddr(ing.IP)
		if err != nil {
			problems = append(problems, fmt.Sprintf("load balancer ingress IP %q ignored: %v", ing.IP, err))
			continue
		}
		ips = appendUnique(ips, ip)
	}
	return ips, problems
}

// sourceRangesOf reads spec.loadBalancerSourceRanges, each reduced to its
// network. Only the field counts, as for upstream kube-proxy: the
// service.beta.kubernetes.io/load-balancer-source-ranges annotation is for
// cloud load balancers, not for the node's rules. A range that does not
// parse is dropped alone, as upstream does. Note that if every range is
// dropped the list is empty, which means "open to everyone", exactly as
// upstream behaves; the API server rejects such ranges, so this only
// concerns objects that predate validation.
func sourceRangesOf(raw []string) (ranges []netip.Prefix, problems []string) {
	for _, r := range raw {
		r = strings.TrimSpace(r)
		if r == "" {
			continue
		}
		p, err := parsePrefix(r)
		if err != nil {
			problems = append(problems, fmt.Sprintf("load balancer source range %q ignored: %v", r, err))
			continue
		}
		if !slices.Contains(ranges, p) {
			ranges = append(ranges, p)
		}
	}
	return ranges, problems
}

// externallyAccessible is upstream's per-Service reading of "reachable from
// outside the cluster", the only case where externalTrafficPolicy means
// anything: type NodePort or LoadBalancer, or external IPs. ServicePort's
// own ExternallyAccessible (per port, from what is actually reachable) is
// ANDed in wherever the policy is used, so the two agree in effect.
func externallyAccessible(spec *v1.ServiceSpec) bool {
	return spec.Type == v1.ServiceTypeNodePort || spec.Type == v1.ServiceTypeLoadBalancer || len(spec.ExternalIPs) > 0
}

// externalPolicyLocal says whether traffic from outside must stay on the
// node it arrived at, keeping the client's source IP:
// externalTrafficPolicy Local on an externally accessible Service.
func externalPolicyLocal(spec *v1.ServiceSpec) bool {
	return externallyAccessible(spec) && spec.ExternalTrafficPolicy == v1.ServiceExternalTrafficPolicyLocal
}

// internalPolicyLocal says whether traffic from inside the cluster may only
// go to endpoints on its own node: internalTrafficPolicy Local.
func internalPolicyLocal(spec *v1.ServiceSpec) bool {
	return spec.InternalTrafficPolicy != nil && *spec.InternalTrafficPolicy == v1.ServiceInternalTrafficPolicyLocal
}

// healthCheckNodePortOf is the port where the load balancer asks each node
// whether it has local endpoints; only a LoadBalancer Service with
// externalTrafficPolicy Local has one (0 otherwise). A missing or
// out-of-range port is a problem and gives 0.
func healthCheckNodePortOf(spec *v1.ServiceSpec) (port int32, problems []string) {
	if spec.Type != v1.ServiceTypeLoadBalancer || !externalPolicyLocal(spec) {
		return 0, nil
	}
	switch p := spec.HealthCheckNodePort; {
	case p == 0:
		return 0, []string{"Service has no healthCheckNodePort"}
	case p < 1 || p > 65535:
		return 0, []string{fmt.Sprintf("healthCheckNodePort %d out of range, ignored", p)}
	default:
		return p, nil
	}
}

// affinityTimeoutOf is how long ClientIP session affinity keeps sending a
// client to the same endpoint, in seconds; 0 means no affinity. Without a
// configured timeout it is the API's default, 3 hours; a timeout outside
// what the API accepts (1 s to 1 day) is a problem and gives the default.
func affinityTimeoutOf(spec *v1.ServiceSpec) (seconds int32, problems []string) {
	if spec.SessionAffinity != v1.ServiceAffinityClientIP {
		return 0, nil
	}
	c := spec.SessionAffinityConfig
	if c == nil || c.ClientIP == nil || c.ClientIP.TimeoutSeconds == nil {
		return defaultAffinityTimeoutSeconds, nil
	}
	if t := *c.ClientIP.TimeoutSeconds; t < 1 || t > maxAffinityTimeoutSeconds {
		return defaultAffinityTimeoutSeconds, []string{fmt.Sprintf("session affinity timeout %d out of range, using %d", t, defaultAffinityTimeoutSeconds)}
	}
	return *c.ClientIP.TimeoutSeconds, nil
}

// servicePortsOf makes one ServicePort per spec port of the Service ns/name,
// each a copy of shared with the port's own name, protocol and numbers. A
// port is dropped alone, with a problem, when its name repeats an earlier
// port's, its protocol is unknown or a number is out of range; the other
// ports still work.
func servicePortsOf(ns, name string, specPorts []v1.ServicePort, shared ServicePort) (ports []*ServicePort, problems []string) {
	seen := map[string]bool{}
	for i := range specPorts {
		p := &specPorts[i]
		proto, ok := convertProtocol(p.Protocol)
		switch {
		case seen[p.Name]:
			problems = append(problems, fmt.Sprintf("port %q ignored: duplicate port name", p.Name))
			continue
		case !ok:
			problems = append(problems, fmt.Sprintf("port %q ignored: unsupported protocol %q", p.Name, p.Protocol))
			continue
		case p.Port < 1 || p.Port > 65535:
			problems = append(problems, fmt.Sprintf("port %q ignored: port %d out of range", p.Name, p.Port))
			continue
		case p.NodePort < 0 || p.NodePort > 65535:
			problems = append(problems, fmt.Sprintf("port %q ignored: nodePort %d out of range", p.Name, p.NodePort))
			continue
		}
		seen[p.Name] = true
		sp := shared
		sp.Name = ServicePortName{Namespace: ns, Name: name, Port: p.Name}
		sp.Protocol, sp.Port, sp.NodePort = proto, p.Port, p.NodePort
		ports = append(ports, &sp)
	}
	return ports, problems
}

// convertProtocol maps an API protocol to ours; "" is TCP, the API default
// (objects that did not go through the API server, e.g. in tests, may lack it).
func convertProtocol(p v1.Protocol) (Protocol, bool) {
	switch p {
	case v1.ProtocolTCP, "":
		return TCP, true
	case v1.ProtocolUDP:
		return UDP, true
	case v1.ProtocolSCTP:
		return SCTP, true
	}
	return "", false
}

// slicePort is one port of an EndpointSlice, already validated.
type slicePort struct {
	name     string
	protocol Protocol
	port     int32
}

// sliceEndpoint is one endpoint of an EndpointSlice, already validated, with
// the condition defaults applied.
type sliceEndpoint struct {
	ip          netip.Addr
	ready       bool
	serving     bool
	terminating bool
	nodeName    string
	zone        string
	zoneHints   []string
	nodeHints   []string
}

// convertedSlice is an EndpointSlice as the Tracker keeps it.
type convertedSlice struct {
	service   ServicePortName // Port is always ""
	ports     []slicePort
	endpoints []sliceEndpoint
}

// equal compares two converted slices; used to ignore no-op updates
// (informer resyncs, status-only changes of fields we do not use).
func (c *convertedSlice) equal(o *convertedSlice) bool {
	return c.service == o.service &&
		slices.Equal(c.ports, o.ports) &&
		slices.EqualFunc(c.endpoints, o.endpoints, func(a, b sliceEndpoint) bool {
			return a.ip == b.ip && a.ready == b.ready && a.serving == b.serving &&
				a.terminating == b.terminating && a.nodeName == b.nodeName && a.zone == b.zone &&
				slices.Equal(a.zoneHints, b.zoneHints) && slices.Equal(a.nodeHints, b.nodeHints)
		})
}

// sliceConversion is what convertSlice makes of an EndpointSlice.
type sliceConversion struct {
	// slice is the usable part; nil when the slice is not ours.
	slice *convertedSlice
	// skipped is why slice is nil, for the debug log.
	skipped string
	// problems lists the parts that were dropped as invalid.
	problems []string
}

// convertSlice validates an EndpointSlice. Its slice is nil (with the reason
// in skipped) when the slice is not ours: no kubernetes.io/service-name
// label, addressType FQDN, or a label that makes us ignore it. Bad parts are
// dropped with a problem each: an endpoint whose first address does not
// parse, a port out of range. A port without a number is dropped silently
// (it would mean "all ports", which kube-proxy does not implement either).
func convertSlice(s *discoveryv1.EndpointSlice) sliceConversion {
	c, skipped, problems := convertSliceParts(s)
	return sliceConversion{slice: c, skipped: skipped, problems: problems}
}

func convertSliceParts(s *discoveryv1.EndpointSlice) (c *convertedSlice, skipped string, problems []string) {
	if ignored, why := ignoredByLabels(s.Labels); ignored {
		return nil, why, nil
	}
	svcName := s.Labels[LabelServiceName]
	if svcName == "" {
		return nil, "no label " + LabelServiceName, nil
	}
	if s.AddressType == discoveryv1.AddressTypeFQDN {
		return nil, "addressType FQDN", nil
	}
	c = &convertedSlice{service: ServicePortName{Namespace: s.Namespace, Name: svcName}}
	for _, p := range s.Ports {
		name := ""
		if p.Name != nil {
			name = *p.Name // nil is defaulted to "" by the API server
		}
		if p.Port == nil {
			continue
		}
		var proto v1.Protocol
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		ourProto, ok := convertProtocol(proto)
		if !ok {
			problems = append(problems, fmt.Sprintf("port %q ignored: unsupported protocol %q", name, proto))
			continue
		}
		if *p.Port < 1 || *p.Port > 65535 {
			problems = append(problems, fmt.Sprintf("port %q ignored: port %d out of range", name, *p.Port))
			continue
		}
		c.ports = append(c.ports, slicePort{name: name, protocol: ourProto, port: *p.Port})
	}
	for i := range s.Endpoints {
		e := &s.Endpoints[i]
		if len(e.Addresses) == 0 {
			problems = append(problems, fmt.Sprintf("endpoint %d ignored: no address", i))
			continue
		}
		// Only the first address is used, as upstream does: the API says
		// consumers may assume all addresses are fungible.
		ip, err := parseAddr(e.Addresses[0])
		if err != nil {
			problems = append(problems, fmt.Sprintf("endpoint address %q ignored: %v", e.Addresses[0], err))
			continue
		}
		ep := sliceEndpoint{
			ip: ip,
			// The API's defaults: nil ready and nil serving mean true,
			// nil terminating means false (as upstream reads them).
			ready:       e.Conditions.Ready == nil || *e.Conditions.Ready,
			serving:     e.Conditions.Serving == nil || *e.Conditions.Serving,
			terminating: e.Conditions.Terminating != nil && *e.Conditions.Terminating,
		}
		if e.NodeName != nil {
			ep.nodeName = *e.NodeName
		}
		if e.Zone != nil {
			ep.zone = *e.Zone
		}
		if e.Hints != nil {
			for _, z := range e.Hints.ForZones {
				if !slices.Contains(ep.zoneHints, z.Name) {
					ep.zoneHints = append(ep.zoneHints, z.Name)
				}
			}
			slices.Sort(ep.zoneHints)
			for _, n := range e.Hints.ForNodes {
				if !slices.Contains(ep.nodeHints, n.Name) {
					ep.nodeHints = append(ep.nodeHints, n.Name)
				}
			}
			slices.Sort(ep.nodeHints)
		}
		c.endpoints = append(c.endpoints, ep)
	}
	return c, "", problems
}

// convertNode extracts what the rules need from our Node object.
func convertNode(n *v1.Node) Node {
	eligible := n.DeletionTimestamp == nil
	for _, t := range n.Spec.Taints {
		if t.Key == TaintToBeDeletedByClusterAutoscaler {
			eligible = false
		}
	}
	return Node{Name: n.Name, Zone: n.Labels[LabelZone], Eligible: eligible}
}

// parseAddr parses an IP address the way the API server has accepted them
// over the years: IPv4 octets with leading zeros are read as decimal (as
// Go's net.ParseIP did before 1.17 and Kubernetes' ParseIPSloppy still does),
// IPv4-mapped IPv6 addresses count as IPv4, and zones are rejected.
func parseAddr(s string) (netip.Addr, error) {
	ip, err := parseAddrKeepMapped(s)
	if err != nil {
		return netip.Addr{}, err
	}
	return ip.Unmap(), nil
}

// parsePrefix parses a CIDR as Kubernetes' ParseCIDRSloppy does and returns
// the network it names (host bits cleared: "10.1.2.3/8" is 10.0.0.0/8).
func parsePrefix(s string) (netip.Prefix, error) {
	addrPart, bitsPart, ok := strings.Cut(s, "/")
	if !ok {
		return netip.Prefix{}, fmt.Errorf("parsing CIDR %q: no prefix length", s)
	}
	ip, err := parseAddrKeepMapped(addrPart)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("parsing CIDR %q: %w", s, err)
	}
	// Digits only (leading zeros allowed, as the sloppy parser allows them).
	bits, err := strconv.Atoi(bitsPart)
	if err != nil || len(bitsPart) > 3 || strings.Trim(bitsPart, "0123456789") != "" || bits > ip.BitLen() {
		return netip.Prefix{}, fmt.Errorf("parsing CIDR %q: bad prefix length %q", s, bitsPart)
	}
	if ip.Is4In6() && bits >= 96 {
		ip, bits = ip.Unmap(), bits-96
	}
	return netip.PrefixFrom(ip, bits).Masked(), nil
}

// parseAddrKeepMapped is parseAddr without unmapping, for parsePrefix, whose
// prefix length must be adjusted together with the address.
func parseAddrKeepMapped(s string) (netip.Addr, error) {
	ip, err := netip.ParseAddr(s)
	if err != nil {
		stripped, ok := stripLeadingZeros(s)
		if !ok {
			return netip.Addr{}, fmt.Errorf("parsing IP address: %w", err)
		}
		if ip, err = netip.ParseAddr(stripped); err != nil {
			return netip.Addr{}, fmt.Errorf("parsing IP address: %w", err)
		}
	}
	if ip.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("parsing IP address %q: zones are not allowed", s)
	}
	return ip, nil
}

// stripLeadingZeros rewrites a dotted-quad IPv4 address with leading zeros
// ("010.001.002.003") to its canonical decimal form; ok is false when s is
// not four dot-separated decimal numbers.
func stripLeadingZeros(s string) (string, bool) {
	parts := strings.Split(s, ".")
	if len(parts) != 4 {
		return "", false
	}
	for i, p := range parts {
		if p == "" || len(p) > 3 || strings.Trim(p, "0123456789") != "" {
			return "", false
		}
		n, _ := strconv.Atoi(p)
		parts[i] = strconv.Itoa(n)
	}
	return strings.Join(parts, "."), true
}

// appendUnique appends ip unless it is already present.
func appendUnique(list []netip.Addr, ip netip.Addr) []netip.Addr {
	if slices.Contains(list, ip) {
		return list
	}
	return append(list, ip)
}

// servicePortEqual compares two service ports field by field.
func servicePortEqual(a, b *ServicePort) bool {
	return a.Name == b.Name && a.Protocol == b.Protocol && a.Port == b.Port && a.NodePort == b.NodePort &&
		slices.Equal(a.ClusterIPs, b.ClusterIPs) &&
		slices.Equal(a.ExternalIPs, b.ExternalIPs) &&
		slices.Equal(a.LoadBalancerIPs, b.LoadBalancerIPs) &&
		slices.Equal(a.LoadBalancerSourceRanges, b.LoadBalancerSourceRanges) &&
		a.ExternalPolicyLocal == b.ExternalPolicyLocal &&
		a.InternalPolicyLocal == b.InternalPolicyLocal &&
		a.HealthCheckNodePort == b.HealthCheckNodePort &&
		a.AffinityTimeoutSeconds == b.AffinityTimeoutSeconds
}

// servicePortsEqual compares two lists of service ports in order.
func servicePortsEqual(a, b []*ServicePort) bool {
	return slices.EqualFunc(a, b, servicePortEqual)
}

// endpointsEqual compares two sorted endpoint lists.
func endpointsEqual(a, b []Endpoint) bool {
	return slices.EqualFunc(a, b, func(x, y Endpoint) bool {
		return x.IP == y.IP && x.Port == y.Port && x.Ready == y.Ready && x.Serving == y.Serving &&
			x.Terminating == y.Terminating && x.NodeName == y.NodeName && x.Zone == y.Zone && x.Local == y.Local &&
			slices.Equal(x.ZoneHints, y.ZoneHints) && slices.Equal(x.NodeHints, y.NodeHints)
	})
}
