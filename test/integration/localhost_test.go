package integration

import (
	"context"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	v1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
	"github.com/miniproxy/miniproxy/test/netns"
)

const routeLocalnet = "net.ipv4.conf.all.route_localnet"

// Localhost NodePorts (--iptables-localhost-nodeports) with real traffic:
// off, 127.0.0.1:<nodePort> on the node is nobody's; on, the daemon sets
// route_localnet=1 in its own namespace (and nowhere else) and the node's
// own localhost traffic reaches the endpoint, masqueraded, for Cluster and
// Local policy as upstream. A neighbour that routes 127.0.0.1 to the node
// (CVE-2020-8558) reaches neither a NodePort nor what the node binds to
// 127.0.0.1; without the DROP rule it reaches the latter, which shows the
// test can tell.
func TestLocalhostNodePortsWithRealTraffic(t *testing.T) {
	top := setUpLocalTopology(t)
	rootBefore, err := os.ReadFile("/proc/sys/net/ipv4/conf/all/route_localnet")
	if err != nil {
		t.Fatal(err)
	}
	svcs := map[*v1.Service]string{
		apiService("np-cluster", "10.96.0.21", 30021):                  epIP.String(),
		localPolicyLB("np-local", "10.96.0.22", 30022, "203.0.113.22"): epIP.String(),
	}
	detect := rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{clusterNet}}

	// What the node binds to 127.0.0.1 only.
	echo := netns.BuildBinary(t, "github.com/miniproxy/miniproxy/cmd/echoserver")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p, err := top.node.Start(echo, "-listen", "127.0.0.1:9099", "-name", "nodelocal")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitForOutput(ctx, "listening on http"); err != nil {
		t.Fatal(err)
	}

	// The neighbour: the client on the node's link, with 127.0.0.1 routed
	// to the node and willing to take answers from 127.0.0.1. Its own
	// 127.0.0.1 is removed: the kernel would take the node's answers, from
	// one of its own addresses, for martians.
	nbr := top.client
	if err := nbr.WithNetlink(func(h *netlink.Handle) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		addrs, err := h.AddrList(lo, netlink.FAMILY_V4)
		for _, a := range addrs {
			if err == nil {
				err = h.AddrDel(lo, &a)
			}
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for _, kv := range [][2]string{{routeLocalnet, "1"}, {"net.ipv4.conf.all.rp_filter", "0"}, {"net.ipv4.conf.node.rp_filter", "0"}} {
		if err := nbr.SetSysctl(kv[0], kv[1]); err != nil {
			t.Fatal(err)
		}
	}
	if err := nbr.AddRoute(pfx("127.0.0.1/32"), nodeIP); err != nil {
		t.Fatal(err)
	}

	type row struct {
		name string
		from *netns.Namespace
		to   string
		want string
	}
	run := func(stage string, rows []row) {
		t.Helper()
		for _, r := range rows {
			t.Run(stage+", "+r.name, func(t *testing.T) {
				if got := outcome(t, r.from, "tcp", r.to); got != r.want {
					t.Errorf("got %s, want %s", got, r.want)
				}
			})
		}
	}
	sysctl := func(want string) {
		t.Helper()
		if v, err := top.node.Sysctl(routeLocalnet); err != nil || v != want {
			t.Errorf("node's %s = %q (%v), want %s", routeLocalnet, v, err, want)
		}
	}

	syncProxier(t, top.node, proxy.Options{DetectLocal: detect, Sysctl: proxy.ProcSysctl{}}, svcs)
	sysctl("0")
	run("off", []row{
		{"localhost to a NodePort: not served", top.node, "127.0.0.1:30021", refused},
		{"the node's address to the same NodePort: served", top.node, "198.51.100.1:30021", answer("ep", epGW)},
	})

	syncProxier(t, top.node, proxy.Options{DetectLocal: detect, LocalhostNodePorts: true, Sysctl: proxy.ProcSysctl{}}, svcs)
	sysctl("1")
	run("on", []row{
		{"localhost to a NodePort, Cluster policy: the endpoint, masqueraded", top.node, "127.0.0.1:30021", answer("ep", epGW)},
		{"localhost to a NodePort, Local policy without a local endpoint: the remote endpoint, masqueraded", top.node, "127.0.0.1:30022", answer("ep", epGW)},
		{"the node reaches what it binds to 127.0.0.1", top.node, "127.0.0.1:9099", answer("nodelocal", addr("127.0.0.1"))},
		{"a neighbour routing 127.0.0.1 to the node, to a NodePort: dropped, no endpoint reached", nbr, "127.0.0.1:30021", dropped},
		{"a neighbour to what the node binds to 127.0.0.1 (CVE-2020-8558): dropped", nbr, "127.0.0.1:9099", dropped},
	})

	// Without upstream's DROP rule the neighbour gets through to 127.0.0.1.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	if _, stderr, err := top.node.Run(ctx2, "iptables", "-t", "filter", "-D", rules.ChainLocalnet, "1"); err != nil {
		t.Fatalf("delete the DROP rule: %v: %s", err, stderr)
	}
	run("on, the DROP rule deleted by hand", []row{
		{"a neighbour to what the node binds to 127.0.0.1: reached", nbr, "127.0.0.1:9099", answer("nodelocal", clientIP)},
		{"a neighbour to a NodePort on 127.0.0.1: untranslated, so refused by the node, still no endpoint", nbr, "127.0.0.1:30021", refused},
	})

	rootAfter, err := os.ReadFile("/proc/sys/net/ipv4/conf/all/route_localnet")
	if err != nil || strings.TrimSpace(string(rootAfter)) != strings.TrimSpace(string(rootBefore)) {
		t.Errorf("the root namespace's route_localnet changed: %q -> %q (%v)", rootBefore, rootAfter, err)
	}
}
