// Package integration applies miniproxy's rules with the real
// iptables-restore inside network namespaces it creates, and checks with
// real TCP and UDP traffic what the pods see. No API server is needed: the
// rules are fed from snapshots.
package integration

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
	"github.com/miniproxy/miniproxy/test/netns"
)

var (
	pfx  = netip.MustParsePrefix
	addr = netip.MustParseAddr

	clientIP   = addr("198.51.100.79")
	nodeIP     = addr("198.51.100.1") // the node's address facing the client
	pod1IP     = addr("10.244.1.5")   // on this node
	pod1GW     = addr("10.244.1.1")   // the node, seen from pod1
	pod2IP     = addr("10.244.2.6")   // "on node2": routed through this node, but not local
	pod2GW     = addr("10.244.2.1")
	clusterNet = pfx("10.244.0.0/16")
)

// topology is a client, a node and two pods, each pod behind the node on a
// point-to-point link; the client's default route leads to the node.
type topology struct {
	client, node, pod1, pod2 *netns.Namespace
	plane, plane6            *dataplane.Dataplane
}

// The same topology in IPv6, for the dual-stack checks.
var (
	clientIP6   = addr("fd00:198::79")
	nodeIP6     = addr("fd00:198::1")
	pod1IP6     = addr("fd00:244:1::5")
	pod1GW6     = addr("fd00:244:1::1")
	pod2IP6     = addr("fd00:244:2::6")
	pod2GW6     = addr("fd00:244:2::1")
	clusterNet6 = pfx("fd00:244::/32")
)

// rootLab skips the test unless it runs as root, and gives a lab of
// namespaces torn down with the test, and a helper that fails the test on
// an error.
func rootLab(t testing.TB) (*netns.Lab, func(error)) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	return netns.NewLab(t), func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
}

func setUp(t *testing.T) *topology {
	t.Helper()
	lab, must := rootLab(t)
	var top topology
	var err error
	for _, p := range []struct {
		ns   **netns.Namespace
		name string
	}{{&top.client, "client"}, {&top.node, "node"}, {&top.pod1, "pod1"}, {&top.pod2, "pod2"}} {
		*p.ns, err = lab.AddNamespace(p.name)
		must(err)
	}
	must(lab.Link(top.client, top.node, pfx("198.51.100.79/24"), pfx("198.51.100.1/24")))
	must(lab.Link(top.pod1, top.node, pfx("10.244.1.5/24"), pfx("10.244.1.1/24")))
	must(lab.Link(top.pod2, top.node, pfx("10.244.2.6/24"), pfx("10.244.2.1/24")))
	must(top.client.AddRoute(pfx("0.0.0.0/0"), nodeIP))
	must(top.pod1.AddRoute(pfx("0.0.0.0/0"), pod1GW))
	must(top.pod2.AddRoute(pfx("0.0.0.0/0"), pod2GW))
	must(top.node.EnableForwarding())
	// A real node has a default route through an uplink of its own (here a
	// namespace that forwards nothing). Without one the kernel answers
	// "network unreachable" for Service IPs before any rule is consulted;
	// with one back through the client's link it sends ICMP redirects that
	// use up the ICMP rate limit for the client.
	uplink, err := lab.AddNamespace("uplink")
	must(err)
	must(lab.Link(top.node, uplink, pfx("192.0.2.2/30"), pfx("192.0.2.1/30")))
	must(top.node.AddRoute(pfx("0.0.0.0/0"), addr("192.0.2.1")))

	// Dual stack: the same links carry IPv6 (interfaces are named after the
	// namespace at the other end).
	for _, a := range []struct {
		ns   *netns.Namespace
		dev  string
		addr netip.Prefix
	}{
		{top.client, "node", netip.PrefixFrom(clientIP6, 64)}, {top.node, "client", netip.PrefixFrom(nodeIP6, 64)},
		{top.pod1, "node", netip.PrefixFrom(pod1IP6, 64)}, {top.node, "pod1", netip.PrefixFrom(pod1GW6, 64)},
		{top.pod2, "node", netip.PrefixFrom(pod2IP6, 64)}, {top.node, "pod2", netip.PrefixFrom(pod2GW6, 64)},
		{top.node, "uplink", pfx("fd00:192::2/64")}, {uplink, "node", pfx("fd00:192::1/64")},
	} {
		must(a.ns.AddAddr(a.dev, a.addr))
	}
	must(top.client.AddRoute(pfx("::/0"), nodeIP6))
	must(top.pod1.AddRoute(pfx("::/0"), pod1GW6))
	must(top.pod2.AddRoute(pfx("::/0"), pod2GW6))
	must(top.node.AddRoute(pfx("::/0"), addr("fd00:192::1")))

	echo := netns.BuildBinary(t, "github.com/miniproxy/miniproxy/cmd/echoserver")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for name, ns := range map[string]*netns.Namespace{"pod1": top.pod1, "pod2": top.pod2} {
		p, err := ns.Start(echo, "-listen", ":8080", "-udp-listen", ":8081", "-name", name)
		must(err)
		must(p.WaitForOutput(ctx, "listening on http"))
	}
	top.plane, err = dataplane.New(dataplane.NewRunner(), iptables.IPv4, rules.Prefix)
	must(err)
	top.plane6, err = dataplane.New(dataplane.NewRunner(), iptables.IPv6, rules.Prefix)
	must(err)
	return &top
}

func (top *topology) apply6(t *testing.T, snap *endpoints.Snapshot) dataplane.Result {
	t.Helper()
	cfg := rules.Config{
		Family:      iptables.IPv6,
		DetectLocal: rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{clusterNet6}},
		NodeIPs:     []netip.Addr{nodeIP6, pod1GW6, pod2GW6},
	}
	var res dataplane.Result
	err := top.node.Do(func() error {
		var err error
		res, err = top.plane6.Apply(rules.Build(snap, cfg), false)
		return err
	})
	if err != nil {
		t.Fatalf("apply IPv6 rules in %s: %v", top.node.Name(), err)
	}
	return res
}

func (top *topology) apply(t *testing.T, snap *endpoints.Snapshot) dataplane.Result {
	t.Helper()
	cfg := rules.Config{
		Family:      iptables.IPv4,
		DetectLocal: rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{clusterNet}},
		NodeIPs:     []netip.Addr{nodeIP, pod1GW, pod2GW},
	}
	var res dataplane.Result
	err := top.node.Do(func() error {
		var err error
		res, err = top.plane.Apply(rules.Build(snap, cfg), false)
		return err
	})
	if err != nil {
		t.Fatalf("apply rules in %s: %v", top.node.Name(), err)
	}
	return res
}

// iptablesSave returns the node's tables without counters and comments, to
// compare before and after.
func (top *topology) iptablesSave(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var keep []string
	for _, tool := range []string{"iptables-save", "ip6tables-save"} {
		out, _, err := top.node.Run(ctx, tool)
		if err != nil {
			t.Fatal(err)
		}
		keep = append(keep, "# "+tool)
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "#") || l == "" {
				continue
			}
			keep = append(keep, regexp.MustCompile(`\[\d+:\d+\]`).ReplaceAllString(l, "[0:0]"))
		}
	}
	return strings.Join(keep, "\n")
}

type svcOpt func(*endpoints.ServicePort)

func svc(name, clusterIP string, port int32, opts ...svcOpt) *endpoints.ServicePort {
	s := &endpoints.ServicePort{
		Name:       endpoints.ServicePortName{Namespace: "default", Name: name},
		Protocol:   endpoints.TCP,
		Port:       port,
		ClusterIPs: []netip.Addr{addr(clusterIP)},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func nodePort(p int32) svcOpt              { return func(s *endpoints.ServicePort) { s.NodePort = p } }
func localPolicy(s *endpoints.ServicePort) { s.ExternalPolicyLocal = true }
func udp(s *endpoints.ServicePort)         { s.Protocol = endpoints.UDP }

func ep(ip netip.Addr, port int32, local bool) endpoints.Endpoint {
	node := "node2"
	if local {
		node = "node1"
	}
	return endpoints.Endpoint{IP: ip, Port: port, Ready: true, Serving: true, NodeName: node, Local: local}
}

type cluster map[*endpoints.ServicePort][]endpoints.Endpoint

func (c cluster) snapshot() *endpoints.Snapshot {
	s := &endpoints.Snapshot{
		Node:      endpoints.Node{Name: "node1", Eligible: true},
		Services:  map[endpoints.ServicePortName]*endpoints.ServicePort{},
		Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{},
	}
	for sp, eps := range c {
		s.Services[sp.Name] = sp
		s.Endpoints[sp.Name] = eps
	}
	return s
}

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

var clientAddress = regexp.MustCompile(`client_address=(\S+)`)
var hostname = regexp.MustCompile(`hostname=(\S+)`)

// get fetches url from ns and returns what the echo server saw.
func get(t *testing.T, ns *netns.Namespace, url string) (client, server string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	body, err := ns.Curl(ctx, url, 3*time.Second)
	if err != nil {
		t.Fatalf("curl %s from %s: %v", url, ns.Short(), err)
	}
	c, h := clientAddress.FindStringSubmatch(body), hostname.FindStringSubmatch(body)
	if c == nil || h == nil {
		t.Fatalf("curl %s from %s: not an echo server answer:\n%s", url, ns.Short(), body)
	}
	return c[1], h[1]
}

// connectError tries a TCP connection and returns how it failed: "refused",
// "timeout", or "" when it succeeded.
func connectError(t *testing.T, ns *netns.Namespace, address string, timeout time.Duration) (string, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start := time.Now()
	conn, err := ns.DialContext(ctx, "tcp", address)
	took := time.Since(start)
	switch {
	case err == nil:
		conn.Close()
		return "", took
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.EHOSTUNREACH):
		return "refused", took
	case errors.Is(err, context.DeadlineExceeded), strings.Contains(err.Error(), "timeout"):
		return "timeout", took
	}
	t.Fatalf("connect to %s from %s: unexpected error %v", address, ns.Short(), err)
	return "", took
}

func TestRealRulesRealTraffic(t *testing.T) {
	top := setUp(t)

	// Someone else's rules, which miniproxy must leave exactly as they are.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, args := range [][]string{
		{"-t", "filter", "-N", "FOREIGN"},
		{"-t", "filter", "-A", "FOREIGN", "-s", "192.0.2.0/24", "-j", "RETURN"},
		{"-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"},
		{"-t", "nat", "-A", "POSTROUTING", "-s", "10.9.0.0/16", "-j", "MASQUERADE"},
		{"-t", "nat", "-N", "FOREIGN-NAT"},
		{"-t", "nat", "-A", "PREROUTING", "-d", "192.0.2.1", "-j", "FOREIGN-NAT"},
	} {
		if _, _, err := top.node.Run(ctx, "iptables", append([]string{"-w"}, args...)...); err != nil {
			t.Fatal(err)
		}
	}
	for _, args := range [][]string{
		{"-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"},
		{"-t", "nat", "-A", "POSTROUTING", "-s", "fd00:9::/64", "-j", "MASQUERADE"},
	} {
		if _, _, err := top.node.Run(ctx, "ip6tables", append([]string{"-w"}, args...)...); err != nil {
			t.Fatal(err)
		}
	}
	before := top.iptablesSave(t)

	web := svc("web", "10.96.0.10", 80)
	webUDP := svc("web-udp", "10.96.0.11", 53, udp)
	npCluster := svc("np-cluster", "10.96.0.20", 80, nodePort(30080))
	npLocal := svc("np-local", "10.96.0.21", 80, nodePort(30081), localPolicy)
	npLocalElsewhere := svc("np-local-elsewhere", "10.96.0.22", 80, nodePort(30082), localPolicy)
	empty := svc("empty", "10.96.0.12", 80, nodePort(30083))
	state := cluster{
		web:              {ep(pod1IP, 8080, true)},
		webUDP:           {ep(pod1IP, 8081, true)},
		npCluster:        {ep(pod2IP, 8080, false)},
		npLocal:          {ep(pod1IP, 8080, true)},
		npLocalElsewhere: {ep(pod2IP, 8080, false)},
		empty:            nil,
	}
	if res := top.apply(t, state.snapshot()); !res.Full {
		t.Errorf("the first apply should be full: %+v", res)
	}

	t.Run("pod to ClusterIP: the pod's own address", func(t *testing.T) {
		if c, s := get(t, top.pod2, "http://10.96.0.10/"); c != pod2IP.String() || s != "pod1" {
			t.Errorf("got client_address=%s at %s, want %s at pod1", c, s, pod2IP)
		}
	})
	t.Run("client outside the cluster CIDR to ClusterIP: masqueraded to the node", func(t *testing.T) {
		if c, _ := get(t, top.client, "http://10.96.0.10/"); c != pod1GW.String() {
			t.Errorf("got client_address=%s, want the node's %s", c, pod1GW)
		}
	})
	t.Run("pod to its own Service, landing on itself (hairpin): works, masqueraded", func(t *testing.T) {
		if c, s := get(t, top.pod1, "http://10.96.0.10/"); c != pod1GW.String() || s != "pod1" {
			t.Errorf("got client_address=%s at %s, want %s at pod1", c, s, pod1GW)
		}
	})
	t.Run("pod to a UDP ClusterIP: the pod's own address", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		got, err := top.pod2.UDPRequest(ctx, "10.96.0.11:53", "hello", 3*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(got, "client_address="+pod2IP.String()) || !strings.Contains(got, "server=pod1") {
			t.Errorf("UDP answer %q, want client_address=%s from pod1", got, pod2IP)
		}
	})
	t.Run("client outside, Cluster policy, NodePort: masqueraded", func(t *testing.T) {
		if c, s := get(t, top.client, "http://198.51.100.1:30080/"); c != pod2GW.String() || s != "pod2" {
			t.Errorf("got client_address=%s at %s, want the node's %s at pod2", c, s, pod2GW)
		}
	})
	t.Run("client outside, Local policy, node with endpoint: the client's own address", func(t *testing.T) {
		if c, _ := get(t, top.client, "http://198.51.100.1:30081/"); c != clientIP.String() {
			t.Errorf("got client_address=%s, want %s", c, clientIP)
		}
	})
	t.Run("client outside, Local policy, node without endpoint: dropped", func(t *testing.T) {
		if how, _ := connectError(t, top.client, "198.51.100.1:30082", 1500*time.Millisecond); how != "timeout" {
			t.Errorf("connection %q, want it dropped (timeout)", how)
		}
	})
	t.Run("pod, Local policy, node without endpoint: still reaches the remote pod unmasqueraded", func(t *testing.T) {
		if c, s := get(t, top.pod1, "http://10.244.1.1:30082/"); c != pod1IP.String() || s != "pod2" {
			t.Errorf("got client_address=%s at %s, want %s at pod2", c, s, pod1IP)
		}
	})
	t.Run("Service without endpoints: refused at once, ClusterIP and NodePort", func(t *testing.T) {
		for _, a := range []string{"10.96.0.12:80", "198.51.100.1:30083"} {
			how, took := connectError(t, top.client, a, 5*time.Second)
			if how != "refused" || took > time.Second {
				t.Errorf("%s: connection %q after %s, want refused within 1s", a, how, took)
			}
		}
	})

	// A partial change: web's endpoint moves from pod1 to pod2.
	state[web] = []endpoints.Endpoint{ep(pod2IP, 8080, false)}
	res := top.apply(t, state.snapshot())
	if res.Full || res.ChainsWritten > 3 || res.RulesWritten > 10 {
		t.Errorf("moving one endpoint should rewrite a leaf or two, got %+v", res)
	}
	t.Run("after a partial change, the ClusterIP leads to the new endpoint", func(t *testing.T) {
		if c, s := get(t, top.pod1, "http://10.96.0.10/"); c != pod1IP.String() || s != "pod2" {
			t.Errorf("got client_address=%s at %s, want %s at pod2", c, s, pod1IP)
		}
	})
	t.Run("after a partial change, the other Services still work", func(t *testing.T) {
		if c, _ := get(t, top.client, "http://198.51.100.1:30081/"); c != clientIP.String() {
			t.Errorf("got client_address=%s, want %s", c, clientIP)
		}
	})

	t.Run("a UDP flow follows its endpoint once the stale conntrack entry is deleted", func(t *testing.T) {
		// The same client 5-tuple each time, as a long-lived UDP client has.
		ask := func() string {
			t.Helper()
			var answer string
			err := top.client.Do(func() error {
				conn, err := net.DialUDP("udp", &net.UDPAddr{Port: 40053}, &net.UDPAddr{IP: net.ParseIP("10.96.0.11"), Port: 53})
				if err != nil {
					return err
				}
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(3 * time.Second))
				if _, err := conn.Write([]byte("hello")); err != nil {
					return err
				}
				buf := make([]byte, 1024)
				n, err := conn.Read(buf)
				answer = string(buf[:n])
				return err
			})
			if err != nil {
				t.Fatalf("UDP request to 10.96.0.11:53: %v", err)
			}
			return answer
		}
		if got := ask(); !strings.Contains(got, "server=pod1") {
			t.Fatalf("before the change: %q, want pod1", got)
		}
		state[webUDP] = []endpoints.Endpoint{ep(pod2IP, 8081, false)}
		cur := state.snapshot()
		top.apply(t, cur)
		if got := ask(); !strings.Contains(got, "server=pod1") {
			t.Fatalf("without cleanup the flow should still reach the removed endpoint (that is why cleanup exists), got %q", got)
		}
		var table *conntrack.Kernel
		if err := top.node.Do(func() error {
			var err error
			table, err = conntrack.OpenKernel()
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer table.Close()
		r := conntrack.Reconcile(table, iptables.IPv4, conntrack.NewFrontends(cur, nil), quietLog)
		if r.Err != nil {
			t.Fatal(r.Err)
		}
		if r.Deleted == 0 {
			t.Errorf("expected at least one stale entry to be deleted: %+v", r)
		}
		if got := ask(); !strings.Contains(got, "server=pod2") {
			t.Errorf("after cleanup: %q, want pod2", got)
		}
	})

	t.Run("IPv6 through ip6tables: pods keep their address, outside clients are masqueraded, Local keeps the client", func(t *testing.T) {
		web6 := svc("web6", "fd00:96::10", 80)
		np6 := svc("np6-local", "fd00:96::21", 80, nodePort(30090), localPolicy)
		v6 := cluster{web6: {ep(pod1IP6, 8080, true)}, np6: {ep(pod1IP6, 8080, true)}}
		top.apply6(t, v6.snapshot())
		if c, s := get(t, top.pod2, "http://[fd00:96::10]/"); c != pod2IP6.String() || s != "pod1" {
			t.Errorf("pod to IPv6 ClusterIP: got client_address=%s at %s, want %s at pod1", c, s, pod2IP6)
		}
		if c, _ := get(t, top.client, "http://[fd00:96::10]/"); c != pod1GW6.String() {
			t.Errorf("outside client to IPv6 ClusterIP: got client_address=%s, want the node's %s", c, pod1GW6)
		}
		if c, _ := get(t, top.client, "http://[fd00:198::1]:30090/"); c != clientIP6.String() {
			t.Errorf("outside client, Local policy, IPv6 NodePort: got client_address=%s, want %s", c, clientIP6)
		}
	})

	t.Run("miniproxy --cleanup leaves the foreign rules of both families exactly as they were", func(t *testing.T) {
		bin := netns.BuildBinary(t, "github.com/miniproxy/miniproxy/cmd/miniproxy")
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if !strings.Contains(top.iptablesSave(t), ":MP-SERVICES") {
			t.Fatal("miniproxy's chains should be there before the cleanup")
		}
		if out, errOut, err := top.node.Run(ctx, bin, "--cleanup"); err != nil {
			t.Fatalf("miniproxy --cleanup: %v\n%s%s", err, out, errOut)
		}
		if after := top.iptablesSave(t); after != before {
			t.Errorf("tables differ after cleanup:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})
}
