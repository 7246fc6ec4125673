package integration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/rules/rulestest"
	"github.com/miniproxy/miniproxy/test/netns"
)

// shapeAddrs places one Service of every shape in the test topology: pod1
// is the endpoint on this node, pod2 the one "on another node", and the
// client's network is the one loadBalancerSourceRanges admits.
var shapeAddrs = rulestest.Addrs{
	ServiceBase:      addr("10.96.10.1"),
	LoadBalancerBase: addr("203.0.113.10"),
	ExternalBase:     addr("203.0.113.100"),
	NodePortBase:     30100,
	LocalPod:         pod1IP,
	RemotePod:        pod2IP,
	TCPPort:          8080,
	UDPPort:          8081,
	Admitted:         pfx("198.51.100.0/24"),
	Zone:             "zone-a",
}

// Where an answer came from: "pod1<-10.244.1.1" is pod1 answering a client
// it saw as 10.244.1.1. "refused" and "dropped" are the other outcomes.
const (
	refused = "refused"
	dropped = "dropped"
)

func answer(server string, source netip.Addr) string { return server + "<-" + source.String() }

var (
	udpServerRE = regexp.MustCompile(`server=(\S+)`)
	httpHostRE  = regexp.MustCompile(`hostname=(\S+)`)
	clientRE    = regexp.MustCompile(`client_address=(\S+)`)
)

// outcome sends one request from ns to address over proto ("tcp": an HTTP
// GET, "udp": a datagram) and says what happened.
func outcome(t *testing.T, ns *netns.Namespace, proto, address string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	var body string
	var err error
	switch proto {
	case "udp":
		body, err = ns.UDPRequest(ctx, address, "hello", 1500*time.Millisecond)
	case "tcp":
		var conn net.Conn
		conn, err = ns.DialContext(ctx, "tcp", address)
		if err == nil {
			conn.SetDeadline(time.Now().Add(1500 * time.Millisecond))
			fmt.Fprintf(conn, "GET / HTTP/1.0\r\nHost: shapes\r\n\r\n")
			var b []byte
			b, err = io.ReadAll(conn)
			body = string(b)
			conn.Close()
		}
	}
	switch {
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.EHOSTUNREACH):
		return refused
	case errors.Is(err, context.DeadlineExceeded), err != nil && strings.Contains(err.Error(), "timeout"):
		return dropped
	case err != nil:
		t.Fatalf("%s %s from %s: %v", proto, address, ns.Short(), err)
	}
	server, client := udpServerRE.FindStringSubmatch(body), clientRE.FindStringSubmatch(body)
	if proto == "tcp" {
		server = httpHostRE.FindStringSubmatch(body)
	}
	if server == nil || client == nil {
		t.Fatalf("%s %s from %s: not an echo server's answer: %q", proto, address, ns.Short(), body)
	}
	return server[1] + "<-" + client[1]
}

// A Service of every shape the rules package produces goes through the
// real iptables-restore in one sync, and every one then does with real
// traffic what kube-proxy's users rely on (SCTP through raw sockets: see
// sctp_test.go).
func TestEveryShapeOfServiceInTheKernel(t *testing.T) {
	top := setUp(t)
	shapes := rulestest.EveryShape(shapeAddrs)
	top.apply(t, rulestest.Snapshot(shapeAddrs.Zone, shapes...))

	byName := map[string]rulestest.Shape{}
	for _, sh := range shapes {
		byName[sh.Name] = sh
	}
	port := func(sp *endpoints.ServicePort, to netip.Addr, p int32) string {
		return netip.AddrPortFrom(to, uint16(p)).String()
	}
	clusterIP := func(shape, portName string) (proto, address string) {
		sp := byName[shape].Service(portName)
		return strings.ToLower(string(sp.Protocol)), port(sp, sp.ClusterIPs[0], sp.Port)
	}
	nodePort := func(shape, portName string) (string, string) {
		sp := byName[shape].Service(portName)
		return strings.ToLower(string(sp.Protocol)), port(sp, nodeIP, sp.NodePort)
	}
	podNodePort := func(shape string) (string, string) { // pod1 reaching its own node's NodePort
		sp := byName[shape].Service("")
		return "tcp", port(sp, pod1GW, sp.NodePort)
	}
	lbIP := func(shape string) (string, string) {
		sp := byName[shape].Service("")
		return strings.ToLower(string(sp.Protocol)), port(sp, sp.LoadBalancerIPs[0], sp.Port)
	}
	extIP := func(shape string) (string, string) {
		sp := byName[shape].Service("")
		return "tcp", port(sp, sp.ExternalIPs[0], sp.Port)
	}
	var (
		pod1Hairpin = answer("pod1", pod1GW) // pod1 reaching itself: masqueraded
		pod2FromPod = answer("pod2", pod1IP)
		pod1Masq    = answer("pod1", pod1GW)
		pod2Masq    = answer("pod2", pod2GW)
		pod1Client  = answer("pod1", clientIP)
	)
	type from struct {
		name string
		ns   *netns.Namespace
	}
	pod, outside := from{"pod1", top.pod1}, from{"client outside", top.client}
	tests := []struct {
		shape, what string
		from        from
		to          func() (string, string)
		want        []string // any of these
		repeat      int      // ask this often; every answer must come from the same server
	}{
		{"clusterip", "pod to ClusterIP: either endpoint, the pod's own address", pod, func() (string, string) { return clusterIP("clusterip", "") }, []string{pod1Hairpin, pod2FromPod}, 1},
		{"clusterip", "client outside the cluster CIDR to ClusterIP: masqueraded", outside, func() (string, string) { return clusterIP("clusterip", "") }, []string{pod1Masq, pod2Masq}, 1},
		{"clusterip-udp", "pod to UDP ClusterIP", pod, func() (string, string) { return clusterIP("clusterip-udp", "") }, []string{pod1Hairpin, pod2FromPod}, 1},
		{"two-ports", "first port, TCP", pod, func() (string, string) { return clusterIP("two-ports", "tcp") }, []string{pod2FromPod}, 1},
		{"two-ports", "second port, UDP", pod, func() (string, string) { return clusterIP("two-ports", "udp") }, []string{pod2FromPod}, 1},
		{"two-ports", "second port's NodePort, UDP", outside, func() (string, string) { return nodePort("two-ports", "udp") }, []string{pod2Masq}, 1},
		{"nodeport", "client outside, Cluster policy: masqueraded", outside, func() (string, string) { return nodePort("nodeport", "") }, []string{pod2Masq}, 1},
		{"nodeport-local", "client outside, Local policy, node with endpoint: the client's own address", outside, func() (string, string) { return nodePort("nodeport-local", "") }, []string{pod1Client}, 1},
		{"nodeport-local-elsewhere", "client outside, Local policy, node without endpoint: dropped", outside, func() (string, string) { return nodePort("nodeport-local-elsewhere", "") }, []string{dropped}, 1},
		{"nodeport-local-elsewhere", "pod, Local policy, node without endpoint: reaches the remote pod", pod, func() (string, string) { return podNodePort("nodeport-local-elsewhere") }, []string{pod2FromPod}, 1},
		{"loadbalancer", "client to load balancer IP, Cluster policy: masqueraded", outside, func() (string, string) { return lbIP("loadbalancer") }, []string{pod2Masq}, 1},
		{"loadbalancer-local", "client to load balancer IP, Local policy: the client's own address", outside, func() (string, string) { return lbIP("loadbalancer-local") }, []string{pod1Client}, 1},
		{"loadbalancer-local-elsewhere", "client to load balancer IP, Local policy, no endpoint here: dropped", outside, func() (string, string) { return lbIP("loadbalancer-local-elsewhere") }, []string{dropped}, 1},
		{"loadbalancer-sourceranges", "client inside loadBalancerSourceRanges: served", outside, func() (string, string) { return lbIP("loadbalancer-sourceranges") }, []string{pod2Masq}, 1},
		{"loadbalancer-sourceranges", "pod outside loadBalancerSourceRanges: dropped", pod, func() (string, string) { return lbIP("loadbalancer-sourceranges") }, []string{dropped}, 1},
		{"loadbalancer-sourceranges-local", "client inside the ranges, Local policy: the client's own address", outside, func() (string, string) { return lbIP("loadbalancer-sourceranges-local") }, []string{pod1Client}, 1},
		{"loadbalancer-sourceranges-local", "pod outside the ranges, Local policy: dropped", pod, func() (string, string) { return lbIP("loadbalancer-sourceranges-local") }, []string{dropped}, 1},
		{"loadbalancer-sourceranges-udp", "UDP client inside the ranges: served", outside, func() (string, string) { return lbIP("loadbalancer-sourceranges-udp") }, []string{pod2Masq}, 1},
		{"loadbalancer-sourceranges-udp", "UDP pod outside the ranges: dropped", pod, func() (string, string) { return lbIP("loadbalancer-sourceranges-udp") }, []string{dropped}, 1},
		{"loadbalancer-sourceranges-affinity", "client inside the ranges, ClientIP affinity: always the same endpoint", outside, func() (string, string) { return lbIP("loadbalancer-sourceranges-affinity") }, []string{pod1Masq, pod2Masq}, 6},
		{"clusterip-sctp", "client outside to SCTP ClusterIP: masqueraded", outside, func() (string, string) { return clusterIP("clusterip-sctp", "") }, []string{pod1Masq, pod2Masq}, 1},
		{"clusterip-sctp", "pod to SCTP ClusterIP: either endpoint", pod, func() (string, string) { return clusterIP("clusterip-sctp", "") }, []string{pod1Hairpin, pod2FromPod}, 1},
		{"loadbalancer-sctp-local", "SCTP client inside the ranges, Local policy: the client's own address", outside, func() (string, string) { return lbIP("loadbalancer-sctp-local") }, []string{pod1Client}, 1},
		{"loadbalancer-sctp-local", "SCTP pod outside the ranges: dropped", pod, func() (string, string) { return lbIP("loadbalancer-sctp-local") }, []string{dropped}, 1},
		{"externalip", "client to external IP, Cluster policy: masqueraded", outside, func() (string, string) { return extIP("externalip") }, []string{pod2Masq}, 1},
		{"externalip-local", "client to external IP, Local policy: the client's own address", outside, func() (string, string) { return extIP("externalip-local") }, []string{pod1Client}, 1},
		{"affinity", "ClientIP affinity: always the same endpoint", pod, func() (string, string) { return clusterIP("affinity", "") }, []string{pod1Hairpin, pod2FromPod}, 6},
		{"no-endpoints", "no endpoints, ClusterIP: refused", outside, func() (string, string) { return clusterIP("no-endpoints", "") }, []string{refused}, 1},
		{"no-endpoints", "no endpoints, NodePort: refused", outside, func() (string, string) { return nodePort("no-endpoints", "") }, []string{refused}, 1},
		// From the client: pod1's hairpin answers made the node send it
		// ICMP redirects, which use up the ICMP rate limit for pod1.
		{"no-endpoints-udp", "no endpoints, UDP: refused", outside, func() (string, string) { return clusterIP("no-endpoints-udp", "") }, []string{refused}, 1},
		{"terminating-only", "only a serving terminating endpoint: used", pod, func() (string, string) { return clusterIP("terminating-only", "") }, []string{pod2FromPod}, 1},
		{"terminating-not-serving", "only a terminating endpoint that no longer serves: refused", pod, func() (string, string) { return clusterIP("terminating-not-serving", "") }, []string{refused}, 1},
		{"hints", "topology hints for this zone: only the endpoint of this zone", pod, func() (string, string) { return clusterIP("hints", "") }, []string{pod1Hairpin}, 4},
		{"node-hints", "node hints (PreferSameNode) for this node: only the endpoint on this node", pod, func() (string, string) { return clusterIP("node-hints", "") }, []string{pod1Hairpin}, 4},
		{"internal-local", "internalTrafficPolicy Local: only the endpoint on this node", pod, func() (string, string) { return clusterIP("internal-local", "") }, []string{pod1Hairpin}, 4},
		{"internal-local-elsewhere", "internalTrafficPolicy Local, no endpoint here: dropped", pod, func() (string, string) { return clusterIP("internal-local-elsewhere", "") }, []string{dropped}, 1},
	}
	exercised := map[string]bool{}
	for _, tc := range tests {
		exercised[tc.shape] = true
		t.Run(tc.shape+": "+tc.what, func(t *testing.T) {
			proto, address := tc.to()
			var first string
			for i := 0; i < tc.repeat; i++ {
				var got string
				if proto == "sctp" {
					got = sctpOutcome(t, tc.from.ns, netip.MustParseAddrPort(address), map[string]*netns.Namespace{"pod1": top.pod1, "pod2": top.pod2}, uint16(shapeAddrs.TCPPort))
				} else {
					got = outcome(t, tc.from.ns, proto, address)
				}
				if !slices.Contains(tc.want, got) {
					t.Fatalf("%s %s from %s: got %s, want one of %v", proto, address, tc.from.name, got, tc.want)
				}
				if i == 0 {
					first = got
				} else if got != first {
					t.Fatalf("%s %s from %s: answer %d came from %s, the first from %s", proto, address, tc.from.name, i+1, got, first)
				}
			}
		})
	}
	for _, sh := range shapes {
		if !exercised[sh.Name] {
			t.Errorf("shape %s is programmed but no traffic is sent to it", sh.Name)
		}
	}
}
