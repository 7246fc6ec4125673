package endpoints

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	v1 "k8s.io/api/core/v1"
)

func TestConvertService(t *testing.T) {
	name := func(port string) ServicePortName { return ServicePortName{Namespace: "ns", Name: "svc", Port: port} }
	// base is what makeService converts to; cases adjust a copy.
	base := func(f func(*ServicePort)) *ServicePort {
		p := &ServicePort{Name: name(""), Protocol: TCP, Port: 80, ClusterIPs: ips("10.0.0.1")}
		if f != nil {
			f(p)
		}
		return p
	}
	local := v1.ServiceInternalTrafficPolicyLocal

	tests := []struct {
		name string
		svc  *v1.Service
		want []*ServicePort
		// wantSkipped says the Service is not proxied without being invalid.
		wantSkipped bool
		// wantProblems are substrings, one per expected problem, in order.
		wantProblems []string
	}{
		{
			name: "a ClusterIP service with one unnamed port gives one service port",
			svc:  makeService("ns", "svc"),
			want: []*ServicePort{base(nil)},
		},
		{
			name: "every spec port gives a service port named after it",
			svc: makeService("ns", "svc", withPorts(
				v1.ServicePort{Name: "dns", Protocol: v1.ProtocolUDP, Port: 53},
				v1.ServicePort{Name: "dns-tcp", Protocol: v1.ProtocolTCP, Port: 53},
				v1.ServicePort{Name: "sctp", Protocol: v1.ProtocolSCTP, Port: 9999},
			)),
			want: []*ServicePort{
				base(func(p *ServicePort) { p.Name, p.Protocol, p.Port = name("dns"), UDP, 53 }),
				base(func(p *ServicePort) { p.Name, p.Protocol, p.Port = name("dns-tcp"), TCP, 53 }),
				base(func(p *ServicePort) { p.Name, p.Protocol, p.Port = name("sctp"), SCTP, 9999 }),
			},
		},
		{
			name: "a port without protocol is TCP, the API default",
			svc:  makeService("ns", "svc", withPorts(v1.ServicePort{Port: 80})),
			want: []*ServicePort{base(nil)},
		},
		{
			name: "a dual-stack service keeps one cluster IP per family",
			svc:  makeService("ns", "svc", withClusterIPs("10.0.0.1", "fd00::1")),
			want: []*ServicePort{base(func(p *ServicePort) { p.ClusterIPs = ips("10.0.0.1", "fd00::1") })},
		},
		{
			name:         "a second cluster IP of the same family is ignored",
			svc:          makeService("ns", "svc", withClusterIPs("10.0.0.1", "10.0.0.2")),
			want:         []*ServicePort{base(nil)},
			wantProblems: []string{"second cluster IP 10.0.0.2"},
		},
		{
			name: "spec.clusterIP is used when spec.clusterIPs is empty",
			svc:  makeService("ns", "svc", func(s *v1.Service) { s.Spec.ClusterIPs = nil; s.Spec.ClusterIP = "10.0.0.9" }),
			want: []*ServicePort{base(func(p *ServicePort) { p.ClusterIPs = ips("10.0.0.9") })},
		},
		{
			name: "an IPv4 address with leading zeros is read as decimal, as the API server used to accept it",
			svc:  makeService("ns", "svc", withClusterIPs("010.000.000.001")),
			want: []*ServicePort{base(func(p *ServicePort) { p.ClusterIPs = ips("10.0.0.1") })},
		},
		{
			name: "an IPv4-mapped IPv6 cluster IP counts as IPv4",
			svc:  makeService("ns", "svc", withClusterIPs("::ffff:10.0.0.1")),
			want: []*ServicePort{base(nil)},
		},
		{
			name:        "a headless service is skipped",
			svc:         makeService("ns", "svc", withClusterIPs("None")),
			wantSkipped: true,
		},
		{
			name:        "a service without cluster IP is skipped",
			svc:         makeService("ns", "svc", func(s *v1.Service) { s.Spec.ClusterIP = ""; s.Spec.ClusterIPs = nil }),
			wantSkipped: true,
		},
		{
			name:        "an ExternalName service is skipped even with a cluster IP",
			svc:         makeService("ns", "svc", func(s *v1.Service) { s.Spec.Type = v1.ServiceTypeExternalName }),
			wantSkipped: true,
		},
		{
			name:        "a service labelled service-proxy-name belongs to another proxy, whatever the value",
			svc:         makeService("ns", "svc", withLabel(LabelServiceProxyName, "")),
			wantSkipped: true,
		},
		{
			name:        "a service labelled headless is skipped",
			svc:         makeService("ns", "svc", withLabel(LabelHeadless, "")),
			wantSkipped: true,
		},
		{
			name:         "a cluster IP that does not parse makes the whole service invalid",
			svc:          makeService("ns", "svc", withClusterIPs("10.0.0.1", "not-an-ip")),
			wantProblems: []string{`Service ignored: cluster IP "not-an-ip"`},
		},
		{
			name:         "a cluster IP with a zone is invalid",
			svc:          makeService("ns", "svc", withClusterIPs("fe80::1%eth0")),
			wantProblems: []string{"zones are not allowed"},
		},
		{
			name: "an unknown protocol drops only that port",
			svc: makeService("ns", "svc", withPorts(
				v1.ServicePort{Name: "a", Protocol: "ICMP", Port: 1},
				v1.ServicePort{Name: "b", Protocol: v1.ProtocolTCP, Port: 80},
			)),
			want:         []*ServicePort{base(func(p *ServicePort) { p.Name = name("b") })},
			wantProblems: []string{`port "a" ignored: unsupported protocol "ICMP"`},
		},
		{
			name: "ports and node ports out of range drop only their port",
			svc: makeService("ns", "svc", withPorts(
				v1.ServicePort{Name: "zero", Port: 0},
				v1.ServicePort{Name: "big", Port: 65536},
				v1.ServicePort{Name: "badnode", Port: 80, NodePort: 70000},
				v1.ServicePort{Name: "ok", Port: 80, NodePort: 30080},
			)),
			want: []*ServicePort{base(func(p *ServicePort) { p.Name, p.NodePort = name("ok"), 30080 })},
			wantProblems: []string{
				`port "zero" ignored: port 0 out of range`,
				`port "big" ignored: port 65536 out of range`,
				`port "badnode" ignored: nodePort 70000 out of range`,
			},
		},
		{
			name: "a duplicate port name drops the later port",
			svc: makeService("ns", "svc", withPorts(
				v1.ServicePort{Name: "a", Port: 80},
				v1.ServicePort{Name: "a", Port: 81},
			)),
			want:         []*ServicePort{base(func(p *ServicePort) { p.Name = name("a") })},
			wantProblems: []string{`port "a" ignored: duplicate port name`},
		},
		{
			name: "an external IP that does not parse is dropped alone, empty ones silently",
			svc: makeService("ns", "svc", func(s *v1.Service) {
				s.Spec.ExternalIPs = []string{"192.0.2.1", "bogus", " ", "2001:db8::1", "192.0.2.1"}
			}),
			want:         []*ServicePort{base(func(p *ServicePort) { p.ExternalIPs = ips("192.0.2.1", "2001:db8::1") })},
			wantProblems: []string{`external IP "bogus" ignored`},
		},
		{
			name: "load balancer ingress hostnames and ipMode Proxy are skipped, VIP mode is kept",
			svc: makeService("ns", "svc", func(s *v1.Service) {
				s.Spec.Type = v1.ServiceTypeLoadBalancer
				s.Spec.Ports[0].NodePort = 30080
				s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{
					{IP: "203.0.113.1"},
					{Hostname: "lb.example.com"},
					{IP: "203.0.113.2", IPMode: ptr(v1.LoadBalancerIPModeProxy)},
					{IP: "203.0.113.3", IPMode: ptr(v1.LoadBalancerIPModeVIP)},
					{IP: "nonsense"},
				}
			}),
			want: []*ServicePort{base(func(p *ServicePort) {
				p.NodePort = 30080
				p.LoadBalancerIPs = ips("203.0.113.1", "203.0.113.3")
			})},
			wantProblems: []string{`load balancer ingress IP "nonsense" ignored`},
		},
		{
			name: "load balancer source ranges are trimmed and reduced to their network",
			svc: makeService("ns", "svc", func(s *v1.Service) {
				s.Spec.LoadBalancerSourceRanges = []string{" 198.51.100.0/24 ", "10.1.2.3/8", "2001:db8::/32", ""}
			}),
			want: []*ServicePort{base(func(p *ServicePort) {
				p.LoadBalancerSourceRanges = prefixes("198.51.100.0/24", "10.0.0.0/8", "2001:db8::/32")
			})},
		},
		{
			name: "the source-ranges annotation is the cloud's business and is ignored, as upstream does",
			svc: makeService("ns", "svc", func(s *v1.Service) {
				s.Annotations = map[string]string{v1.AnnotationLoadBalancerSourceRangesKey: "192.0.2.0/25"}
			}),
			want: []*ServicePort{base(nil)},
		},
		{
			name: "a source range that does not parse is dropped alone, as upstream does",
			svc: makeService("ns", "svc", func(s *v1.Service) {
				s.Spec.LoadBalancerSourceRanges = []string{"198.51.100.0/24", "198.51.100.0", "1.2.3.4/33"}
			}),
			want: []*ServicePort{base(func(p *ServicePort) { p.LoadBalancerSourceRanges = prefixes("198.51.100.0/24") })},
			wantProblems: []string{
				`load balancer source range "198.51.100.0" ignored`,
				`load balancer source range "1.2.3.4/33" ignored`,
			},
		},
		{
			name: "externalTrafficPolicy Local on a NodePort service is kept",
			svc: makeService("ns", "svc", func(s *v1.Service) {
				s.Spec.Type = v1.ServiceTypeNodePort
				s.Spec.Ports[0].NodePort = 30080
				s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
				s.Spec.HealthCheckNodePort = 32000 // not a LoadBalancer: not used
			}),
			want: []*ServicePort{base(func(p *ServicePort) { p.NodePort, p.ExternalPolicyLocal = 30080, true })},
		},
		{
			name: "externalTrafficPolicy Local means nothing on a service nobody outside can reach",
			svc: makeService("ns", "svc", func(s *v1.Service) {
				s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
			}),
			want: []*ServicePort{base(nil)},
		},
		{
			name: "a LoadBalancer service with policy Local gets its health check node port",
			svc: makeService("ns", "svc", func(s *v1.Service) {
				s.Spec.Type = v1.ServiceTypeLoadBalancer
				s.Spec.Ports[0].NodePort = 30080
				s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
				s.Spec.HealthCheckNodePort = 32000
			}),
			want: []*ServicePort{base(func(p *ServicePort) {
				p.NodePort, p.ExternalPolicyLocal, p.HealthCheckNodePort = 30080, true, 32000
			})},
		},
		{
			name: "a LoadBalancer service with policy Cluster has no health check node port",
			svc: makeService("ns", "svc", func(s *v1.Service) {
				s.Spec.Type = v1.ServiceTypeLoadBalancer
				s.Spec.Ports[0].NodePort = 30080
				s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyCluster
				s.Spec.HealthCheckNodePort = 32000
			}),
			want: []*ServicePort{base(func(p *ServicePort) { p.NodePort = 30080 })},
		},
		{
			name: "internalTrafficPolicy Local is kept",
			svc:  makeService("ns", "svc", func(s *v1.Service) { s.Spec.InternalTrafficPolicy = &local }),
			want: []*ServicePort{base(func(p *ServicePort) { p.InternalPolicyLocal = true })},
		},
		{
			name: "ClientIP session affinity defaults to 10800 seconds",
			svc:  makeService("ns", "svc", func(s *v1.Service) { s.Spec.SessionAffinity = v1.ServiceAffinityClientIP }),
			want: []*ServicePort{base(func(p *ServicePort) { p.AffinityTimeoutSeconds = 10800 })},
		},
		{
			name: "ClientIP session affinity takes its configured timeout",
			svc: makeService("ns", "svc", func(s *v1.Service) {
				s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
				s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: ptr(int32(60))}}
			}),
			want: []*ServicePort{base(func(p *ServicePort) { p.AffinityTimeoutSeconds = 60 })},
		},
		{
			name: "no session affinity means a zero timeout whatever the config says",
			svc: makeService("ns", "svc", func(s *v1.Service) {
				s.Spec.SessionAffinity = v1.ServiceAffinityNone
				s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: ptr(int32(60))}}
			}),
			want: []*ServicePort{base(nil)},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := convertService(tc.svc)
			if diff := cmp.Diff(tc.want, got.ports, cmpOpts); diff != "" {
				t.Errorf("ports (-want +got):\n%s", diff)
			}
			if (got.skipped != "") != tc.wantSkipped {
				t.Errorf("skipped = %q, want skipped %v", got.skipped, tc.wantSkipped)
			}
			wantProblems(t, got.problems, tc.wantProblems)
		})
	}
}

// wantProblems checks that problems match want, one substring each, in order.
func wantProblems(t *testing.T, problems, want []string) {
	t.Helper()
	if len(problems) != len(want) {
		t.Fatalf("problems = %q, want %d matching %q", problems, len(want), want)
	}
	for i, w := range want {
		if !strings.Contains(problems[i], w) {
			t.Errorf("problem %d = %q, want it to contain %q", i, problems[i], w)
		}
	}
}

func TestExternalPolicyLocal(t *testing.T) {
	spec := func(typ v1.ServiceType, policy v1.ServiceExternalTrafficPolicy, externalIPs ...string) *v1.ServiceSpec {
		return &v1.ServiceSpec{Type: typ, ExternalTrafficPolicy: policy, ExternalIPs: externalIPs}
	}
	local, cluster := v1.ServiceExternalTrafficPolicyLocal, v1.ServiceExternalTrafficPolicyCluster
	tests := []struct {
		name string
		spec *v1.ServiceSpec
		want bool
	}{
		{"a NodePort service with policy Local keeps the client's source IP", spec(v1.ServiceTypeNodePort, local), true},
		{"a LoadBalancer service with policy Local keeps the client's source IP", spec(v1.ServiceTypeLoadBalancer, local), true},
		{"a ClusterIP service with external IPs is reachable from outside, so policy Local counts", spec(v1.ServiceTypeClusterIP, local, "192.0.2.1"), true},
		{"a ClusterIP service nobody outside can reach ignores policy Local", spec(v1.ServiceTypeClusterIP, local), false},
		{"policy Cluster sends outside traffic to any node's endpoints", spec(v1.ServiceTypeLoadBalancer, cluster), false},
		{"no policy is Cluster, the API default", spec(v1.ServiceTypeNodePort, ""), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := externalPolicyLocal(tc.spec); got != tc.want {
				t.Errorf("externalPolicyLocal = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestHealthCheckNodePortOf(t *testing.T) {
	lbLocal := func(port int32) *v1.ServiceSpec {
		return &v1.ServiceSpec{
			Type:                  v1.ServiceTypeLoadBalancer,
			ExternalTrafficPolicy: v1.ServiceExternalTrafficPolicyLocal,
			HealthCheckNodePort:   port,
		}
	}
	tests := []struct {
		name         string
		spec         *v1.ServiceSpec
		want         int32
		wantProblems []string
	}{
		{
			name: "a LoadBalancer service with policy Local is asked on its healthCheckNodePort which nodes have local endpoints",
			spec: lbLocal(32000),
			want: 32000,
		},
		{
			name:         "a LoadBalancer service with policy Local but no healthCheckNodePort has a problem",
			spec:         lbLocal(0),
			wantProblems: []string{"no healthCheckNodePort"},
		},
		{
			name:         "a healthCheckNodePort out of range is ignored",
			spec:         lbLocal(70000),
			wantProblems: []string{"healthCheckNodePort 70000 out of range"},
		},
		{
			name: "a NodePort service has no load balancer to ask, so no healthCheckNodePort",
			spec: func() *v1.ServiceSpec { s := lbLocal(32000); s.Type = v1.ServiceTypeNodePort; return s }(),
		},
		{
			name: "with policy Cluster every node may take the traffic, so nobody asks",
			spec: func() *v1.ServiceSpec {
				s := lbLocal(32000)
				s.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyCluster
				return s
			}(),
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, problems := healthCheckNodePortOf(tc.spec)
			if got != tc.want {
				t.Errorf("healthCheckNodePortOf = %d, want %d", got, tc.want)
			}
			wantProblems(t, problems, tc.wantProblems)
		})
	}
}

func TestAffinityTimeoutOf(t *testing.T) {
	clientIP := func(timeout *int32) *v1.ServiceSpec {
		s := &v1.ServiceSpec{SessionAffinity: v1.ServiceAffinityClientIP}
		if timeout != nil {
			s.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: timeout}}
		}
		return s
	}
	tests := []struct {
		name         string
		spec         *v1.ServiceSpec
		want         int32
		wantProblems []string
	}{
		{name: "without session affinity each connection may go to another endpoint", spec: &v1.ServiceSpec{}, want: 0},
		{name: "ClientIP affinity keeps a client on one endpoint for 3 hours by default", spec: clientIP(nil), want: 10800},
		{name: "a configured timeout is used", spec: clientIP(ptr(int32(60))), want: 60},
		{name: "one day is the longest timeout the API accepts", spec: clientIP(ptr(int32(86400))), want: 86400},
		{
			name:         "a timeout longer than a day gives the default",
			spec:         clientIP(ptr(int32(86401))),
			want:         10800,
			wantProblems: []string{"session affinity timeout 86401 out of range, using 10800"},
		},
		{
			name:         "a zero timeout gives the default",
			spec:         clientIP(ptr(int32(0))),
			want:         10800,
			wantProblems: []string{"session affinity timeout 0 out of range"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, problems := affinityTimeoutOf(tc.spec)
			if got != tc.want {
				t.Errorf("affinityTimeoutOf = %d, want %d", got, tc.want)
			}
			wantProblems(t, problems, tc.wantProblems)
		})
	}
}

func TestParseAddr(t *testing.T) {
	tests := []struct {
		in   string
		want string // "" means an error
	}{
		{"10.0.0.1", "10.0.0.1"},
		{"010.001.000.009", "10.1.0.9"},
		{"::ffff:10.0.0.1", "10.0.0.1"},
		{"fd00::1", "fd00::1"},
		{"fe80::1%eth0", ""},
		{"1.2.3", ""},
		{"1.2.3.256", ""},
		{"0x1.2.3.4", ""},
		{"", ""},
		{" 10.0.0.1", ""},
	}
	for _, tc := range tests {
		got, err := parseAddr(tc.in)
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("parseAddr(%q) = %v, want an error", tc.in, got)
		case tc.want != "" && err != nil:
			t.Errorf("parseAddr(%q) failed: %v", tc.in, err)
		case tc.want != "" && got != ip(tc.want):
			t.Errorf("parseAddr(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestParsePrefix(t *testing.T) {
	tests := []struct {
		in   string
		want string // "" means an error
	}{
		{"10.0.0.0/8", "10.0.0.0/8"},
		{"10.9.8.7/8", "10.0.0.0/8"},
		{"010.0.0.0/8", "10.0.0.0/8"},
		{"0.0.0.0/0", "0.0.0.0/0"},
		{"2001:db8::1/32", "2001:db8::/32"},
		{"::ffff:10.0.0.0/104", "10.0.0.0/8"},
		{"10.0.0.0", ""},
		{"10.0.0.0/33", ""},
		{"10.0.0.0/-1", ""},
		{"10.0.0.0/08", "10.0.0.0/8"},
		{"10.0.0.0/+8", ""},
		{"10.0.0.0/", ""},
		{"bogus/8", ""},
	}
	for _, tc := range tests {
		got, err := parsePrefix(tc.in)
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("parsePrefix(%q) = %v, want an error", tc.in, got)
		case tc.want != "" && err != nil:
			t.Errorf("parsePrefix(%q) failed: %v", tc.in, err)
		case tc.want != "" && got.String() != tc.want:
			t.Errorf("parsePrefix(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestConvertNode(t *testing.T) {
	tests := []struct {
		name string
		node *v1.Node
		want Node
	}{
		{
			name: "a plain node is eligible and has its zone label",
			node: &v1.Node{ObjectMeta: metaWithLabels("n", map[string]string{LabelZone: "zone-a"})},
			want: Node{Name: "n", Zone: "zone-a", Eligible: true},
		},
		{
			name: "a node being deleted is not eligible",
			node: func() *v1.Node {
				n := &v1.Node{ObjectMeta: metaWithLabels("n", nil)}
				n.DeletionTimestamp = nowPtr()
				return n
			}(),
			want: Node{Name: "n"},
		},
		{
			name: "a node tainted ToBeDeletedByClusterAutoscaler is not eligible",
			node: &v1.Node{
				ObjectMeta: metaWithLabels("n", nil),
				Spec:       v1.NodeSpec{Taints: []v1.Taint{{Key: "other"}, {Key: TaintToBeDeletedByClusterAutoscaler, Effect: v1.TaintEffectNoSchedule}}},
			},
			want: Node{Name: "n"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := convertNode(tc.node); got != tc.want {
				t.Errorf("convertNode = %+v, want %+v", got, tc.want)
			}
		})
	}
}
