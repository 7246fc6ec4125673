package integration

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	v1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
	"github.com/miniproxy/miniproxy/test/netns"
)

// localTopology is a node whose pods sit behind a bridge (cni0) and behind
// point-to-point veths named vethp*, as the CNI plugins that the four
// --detect-local-mode values serve; the only endpoint runs "on another
// node" (routed through this one).
//
//	podbr   10.244.1.5    on the bridge cni0 (10.244.1.1/25)   this node's pod range 10.244.1.0/24
//	vethp1  10.244.1.130  on the veth vethp1 (10.244.1.129/25)
//	node2p  10.244.3.7    a pod of another node, routed here on its own link
//	client  198.51.100.79 outside the cluster
//	ep      10.244.2.6    the endpoint, "on node2", listening on 8080
type localTopology struct {
	node, podBr, podVeth, node2Pod, client, ep *netns.Namespace
}

var (
	podBrIP     = addr("10.244.1.5")
	podVethIP   = addr("10.244.1.130")
	node2PodIP  = addr("10.244.3.7")
	epIP        = pod2IP // on node2, as apiSlice places it
	epGW        = addr("10.244.2.1")
	nodePodCIDR = pfx("10.244.1.0/24")
)

func setUpLocalTopology(t *testing.T) *localTopology {
	t.Helper()
	lab, must := rootLab(t)
	add := func(short string) *netns.Namespace {
		ns, err := lab.AddNamespace(short)
		must(err)
		return ns
	}
	top := &localTopology{node: add("node"), podBr: add("podbr"), podVeth: add("vethp1"), node2Pod: add("node2p"), client: add("client"), ep: add("ep")}
	must(top.node.AddBridge("cni0", pfx("10.244.1.1/25")))
	must(lab.LinkBridge(top.podBr, top.node, "cni0", pfx("10.244.1.5/25")))
	must(lab.Link(top.podVeth, top.node, pfx("10.244.1.130/25"), pfx("10.244.1.129/25")))
	must(lab.Link(top.node2Pod, top.node, pfx("10.244.3.7/24"), pfx("10.244.3.1/24")))
	must(lab.Link(top.client, top.node, pfx("198.51.100.79/24"), pfx("198.51.100.1/24")))
	must(lab.Link(top.ep, top.node, pfx("10.244.2.6/24"), pfx("10.244.2.1/24")))
	for ns, gw := range map[*netns.Namespace]netip.Addr{
		top.podBr: addr("10.244.1.1"), top.podVeth: addr("10.244.1.129"), top.node2Pod: addr("10.244.3.1"),
		top.client: nodeIP, top.ep: epGW,
	} {
		must(ns.AddRoute(pfx("0.0.0.0/0"), gw))
	}
	must(top.node.EnableForwarding())
	// A default route through an uplink of its own (kernel_test.go's
	// setUp says why).
	uplink := add("uplink")
	must(lab.Link(top.node, uplink, pfx("192.0.2.2/30"), pfx("192.0.2.1/30")))
	must(top.node.AddRoute(pfx("0.0.0.0/0"), addr("192.0.2.1")))

	echo := netns.BuildBinary(t, "github.com/miniproxy/miniproxy/cmd/echoserver")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p, err := top.ep.Start(echo, "-listen", ":8080", "-name", "ep")
	must(err)
	must(p.WaitForOutput(ctx, "listening on http"))
	return top
}

// nodeAddrs lists the namespace's IPv4 addresses, as the daemon's lister
// does on a node (127.0.0.1 included).
func nodeAddrs(ns *netns.Namespace) proxy.AddrLister {
	return func(fam iptables.Family) ([]netip.Addr, error) {
		if fam != iptables.IPv4 {
			return nil, nil
		}
		var out []netip.Addr
		err := ns.WithNetlink(func(h *netlink.Handle) error {
			list, err := h.AddrList(nil, netlink.FAMILY_V4)
			for _, a := range list {
				if ip, ok := netip.AddrFromSlice(a.IP); ok {
					out = append(out, ip.Unmap())
				}
			}
			return err
		})
		return out, err
	}
}

// syncProxier runs the daemon's sync loop once, in node, with the real
// iptables-restore: a Proxier for opts over these Services and their
// EndpointSlices (one ready endpoint each, at ip).
func syncProxier(t *testing.T, node *netns.Namespace, opts proxy.Options, svcs map[*v1.Service]string) *proxy.Proxier {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	dp, err := dataplane.New(dataplane.NewRunner(), iptables.IPv4, rules.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	tracker := endpoints.NewTracker("node1", log, nil)
	opts.SyncPeriod = time.Minute
	p := proxy.New(opts, tracker, map[iptables.Family]proxy.Applier{iptables.IPv4: dp}, nodeAddrs(node), log)
	for svc, ip := range svcs {
		tracker.OnServiceAdd(svc)
		tracker.OnEndpointSliceAdd(apiSlice(svc.Name, ip))
	}
	var res proxy.SyncResult
	if err := node.Do(func() error { res = p.Sync(false); return res.Err }); err != nil {
		t.Fatalf("sync in %s: %v", node.Name(), err)
	}
	return p
}

// localPolicyLB is a LoadBalancer Service with externalTrafficPolicy:
// Local.
func localPolicyLB(name, clusterIP string, nodePort int32, lbIP string) *v1.Service {
	svc := apiService(name, clusterIP, nodePort)
	svc.Spec.Type = v1.ServiceTypeLoadBalancer
	svc.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
	svc.Spec.HealthCheckNodePort = nodePort + 2000
	svc.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: lbIP}}
	return svc
}

// Each --detect-local-mode with real traffic: a pod the mode counts as this
// node's reaches a ClusterIP with its own address and an external address
// of an externalTrafficPolicy: Local Service without a local endpoint on the
// remote endpoint; a client the mode does not count (for each mode one that
// the previous mode would have counted) is masqueraded, and dropped at that
// external address; the node itself is masqueraded in every mode.
func TestEachDetectLocalModeWithRealTraffic(t *testing.T) {
	top := setUpLocalTopology(t)
	svcs := map[*v1.Service]string{
		apiService("web", "10.96.0.10", 0):                             epIP.String(),
		localPolicyLB("lb-local", "10.96.0.11", 30011, "203.0.113.11"): epIP.String(),
	}
	type client struct {
		what string
		ns   *netns.Namespace
		ip   netip.Addr
		gw   netip.Addr // the node, as this client reaches it
	}
	var (
		onBridge   = client{"pod on the bridge", top.podBr, podBrIP, addr("10.244.1.1")}
		onVeth     = client{"pod on a vethp interface", top.podVeth, podVethIP, addr("10.244.1.129")}
		otherNode  = client{"pod of another node", top.node2Pod, node2PodIP, addr("10.244.3.1")}
		outsider   = client{"client outside the cluster", top.client, clientIP, nodeIP}
		masquerade = answer("ep", epGW)
	)
	modes := []struct {
		mode         string
		detect       rules.DetectLocal
		local, other client
	}{
		{"ClusterCIDR", rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{clusterNet}}, onBridge, outsider},
		{"NodeCIDR", rules.DetectLocal{Mode: rules.DetectNodeCIDR, CIDRs: []netip.Prefix{nodePodCIDR}}, onBridge, otherNode},
		{"BridgeInterface", rules.DetectLocal{Mode: rules.DetectBridgeInterface, BridgeInterface: "cni0"}, onBridge, onVeth},
		{"InterfaceNamePrefix", rules.DetectLocal{Mode: rules.DetectInterfaceNamePrefix, InterfaceNamePrefix: "vethp"}, onVeth, onBridge},
	}
	for _, m := range modes {
		syncProxier(t, top.node, proxy.Options{DetectLocal: m.detect}, svcs)
		tests := []struct {
			name string
			from client
			to   func(c client) string
			want string
		}{
			{m.local.what + " to a ClusterIP: not masqueraded", m.local,
				func(client) string { return "10.96.0.10:80" }, answer("ep", m.local.ip)},
			{m.other.what + " to a ClusterIP: masqueraded", m.other,
				func(client) string { return "10.96.0.10:80" }, masquerade},
			{"the node itself to a ClusterIP: masqueraded", client{"node", top.node, netip.Addr{}, netip.Addr{}},
				func(client) string { return "10.96.0.10:80" }, masquerade},
			{m.local.what + " to the LB IP of a Local Service without a local endpoint: the remote endpoint", m.local,
				func(client) string { return "203.0.113.11:80" }, answer("ep", m.local.ip)},
			{m.local.what + " to that Service's NodePort: the remote endpoint", m.local,
				func(c client) string { return netip.AddrPortFrom(c.gw, 30011).String() }, answer("ep", m.local.ip)},
			{m.other.what + " to that LB IP: dropped", m.other,
				func(client) string { return "203.0.113.11:80" }, dropped},
		}
		for _, tc := range tests {
			t.Run(m.mode+", "+tc.name, func(t *testing.T) {
				if got := outcome(t, tc.from.ns, "tcp", tc.to(tc.from)); got != tc.want {
					t.Errorf("got %s, want %s", got, tc.want)
				}
			})
		}
	}
}
