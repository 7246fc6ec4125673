package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

// The benchmark's addresses. Nodes and the control plane share a LAN behind
// a router, as in test/cluster; every proxy run gets a new node namespace
// (clean tables) with a new address on that LAN.
var (
	routerLAN = cluster.RouterLAN
	controlIP = cluster.ControlIP
	// serviceCIDR is the largest range the API server takes (a /12), so
	// that 100,000 Services fit; the tutorial's /16 holds 65,534.
	serviceCIDR = netip.MustParsePrefix("10.96.0.0/12")
	clusterCIDR = cluster.ClusterCIDR
	podGateway  = netip.MustParseAddr("10.244.1.1")
	clientPodIP = netip.MustParseAddr("10.244.1.10")
)

// Every endpoint of every Service is a real, answering address: each sink
// pod owns a whole /15 through a "local" route (the AnyIP trick), and its
// echo server, listening on the wildcard address, accepts connections to
// any address in it. So the bulk Services have distinct endpoint IPs, as in
// a real cluster, and yet any Service can carry traffic: the start-up check
// and the first-packet measurement may pick whichever Service they need.
// Endpoint 1 of Service i is in sink-a's range and endpoint 2 in sink-b's;
// a one-change test moves a Service's endpoints to sink-c and sink-d.
var sinks = []struct {
	name  string
	block byte // the second byte of the /15: 10.<block>.0.0/15
}{{"sink-a", 248}, {"sink-b", 250}, {"sink-c", 252}, {"sink-d", 254}}

// sinkBits is the prefix length of a sink's range; it holds maxServices
// endpoints.
const sinkBits = 15

// maxServices is the most Services the address plan holds: one endpoint
// per Service in each sink's /15.
const maxServices = 1<<(32-sinkBits) - 2

// endpointIP is the address of Service i's endpoint in the range of the sink
// whose /15 starts 10.block.
func endpointIP(block byte, i int) netip.Addr {
	v := i + 1
	return netip.AddrFrom4([4]byte{10, block + byte(v>>16), byte(v >> 8), byte(v)})
}

const (
	servicePort  = 80
	endpointPort = 8080
	benchNS      = "bench"
	nodeName     = "bench-node"
)

// benchLab is the part of the lab that lives for the whole run: router,
// control plane, the built binaries.
type benchLab struct {
	lab     *netns.Lab
	router  *netns.Namespace
	cpNS    *netns.Namespace
	cp      *netns.ControlPlane
	kube    kubernetes.Interface
	tmp     string
	bins    binaries
	nodeSeq int
}

type binaries struct {
	echo, miniproxy, kubeProxy, apiserver, shim string
	realRestoreDir                              string
}

func startLab(ctx context.Context, logf func(string, ...any), miniproxyBin string) (*benchLab, error) {
	bl := &benchLab{}
	var err error
	if bl.bins, err = buildBinaries(miniproxyBin == ""); err != nil {
		return nil, err
	}
	if miniproxyBin != "" {
		if _, err := os.Stat(miniproxyBin); err != nil {
			return nil, err
		}
		bl.bins.miniproxy = miniproxyBin
	}
	if bl.lab, err = netns.New(); err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			bl.lab.Close()
		}
	}()
	if bl.tmp, err = bl.lab.TempDir("bench"); err != nil {
		return nil, err
	}
	if bl.router, err = bl.lab.AddNamespace("router"); err != nil {
		return nil, err
	}
	if bl.cpNS, err = bl.lab.AddNamespace("cp"); err != nil {
		return nil, err
	}
	steps := []func() error{
		func() error { return bl.router.AddBridge("lan", netip.PrefixFrom(routerLAN, 24)) },
		bl.router.EnableForwarding,
		func() error { return bl.lab.LinkBridge(bl.cpNS, bl.router, "lan", netip.PrefixFrom(controlIP, 24)) },
		func() error { return bl.cpNS.AddRoute(netip.MustParsePrefix("0.0.0.0/0"), routerLAN) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return nil, fmt.Errorf("build lab network: %w", err)
		}
	}
	start := time.Now()
	bl.cp, err = netns.StartControlPlane(ctx, bl.lab, bl.cpNS, netns.ControlPlaneOptions{
		Address:         controlIP,
		ServiceCIDR:     serviceCIDR,
		APIServerBinary: bl.bins.apiserver,
		Timeout:         3 * time.Minute,
	})
	if err != nil {
		return nil, err
	}
	logf("etcd and kube-apiserver ready in %s", time.Since(start).Round(100*time.Millisecond))
	// The benchmark's own client: connections from inside the control-plane
	// namespace, without client-side rate limiting, for bulk loading.
	cfg := bl.cp.AdminConfig(bl.cpNS)
	cfg.QPS, cfg.Burst = 1e6, 1e6
	cfg.Timeout = 2 * time.Minute
	cfg.UserAgent = "miniproxy-bench"
	if bl.kube, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, err
	}
	if err := bl.registerObjects(ctx); err != nil {
		return nil, err
	}
	ok = true
	return bl, nil
}

func buildBinaries(withMiniproxy bool) (binaries, error) {
	var b binaries
	var err error
	k8s, err := netns.K8sBinaries()
	if err != nil {
		return b, err
	}
	b.apiserver, b.kubeProxy = k8s.APIServer, k8s.KubeProxy
	pkgs := []struct {
		dst *string
		pkg string
	}{
		{&b.echo, "github.com/miniproxy/miniproxy/cmd/echoserver"},
		{&b.shim, "github.com/miniproxy/miniproxy/test/bench/restoreshim"},
	}
	if withMiniproxy {
		pkgs = append(pkgs, struct {
			dst *string
			pkg string
		}{&b.miniproxy, "github.com/miniproxy/miniproxy/cmd/miniproxy"})
	}
	for _, p := range pkgs {
		if *p.dst, err = netns.Build(p.pkg); err != nil {
			return b, err
		}
	}
	real, err := exec.LookPath("iptables-restore")
	if err != nil {
		return b, fmt.Errorf("find iptables-restore: %w", err)
	}
	b.realRestoreDir = filepath.Dir(real)
	if _, err := os.Stat(filepath.Join(b.realRestoreDir, "ip6tables-restore")); err != nil {
		return b, fmt.Errorf("ip6tables-restore is not next to %s: %w", real, err)
	}
	return b, nil
}

// registerObjects writes the benchmark's namespace and the Node object the
// proxies run as (its address is updated for every run).
func (bl *benchLab) registerObjects(ctx context.Context) error {
	ns := &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: benchNS}}
	if _, err := bl.kube.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create namespace %s: %w", benchNS, err)
	}
	node := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: nodeName, Labels: map[string]string{"kubernetes.io/hostname": nodeName}},
		Spec:       v1.NodeSpec{PodCIDR: "10.244.1.0/24", PodCIDRs: []string{"10.244.1.0/24"}},
	}
	if _, err := bl.kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("register node: %w", err)
	}
	return nil
}

// setNodeAddress makes the Node object say what a kubelet on the new node
// namespace would: its address and that it is ready.
func (bl *benchLab) setNodeAddress(ctx context.Context, ip netip.Addr) error {
	node, err := bl.kube.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	now := metav1.Now()
	node.Status.Addresses = []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: ip.String()}, {Type: v1.NodeHostName, Address: nodeName}}
	node.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: now, LastTransitionTime: now}}
	_, err = bl.kube.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	return err
}

// node is one fresh node namespace with its pods: a client pod that sends
// all measured traffic, and the four sink pods that answer it.
type node struct {
	bl     *benchLab
	short  string
	ip     netip.Addr
	ns     *netns.Namespace
	client *netns.Namespace
	procs  []*netns.Process
}

// newNode builds node number seq: namespace "nd<seq>" at 10.240.0.<10+seq>
// on the LAN, with a default route through the router (a node needs one:
// without it the kernel refuses Service IPs before any rule is consulted),
// its pods behind point-to-point links, and the Node object updated.
func (bl *benchLab) newNode(ctx context.Context) (*node, error) {
	bl.nodeSeq++
	seq := bl.nodeSeq
	if seq > 200 {
		return nil, errors.New("too many node runs for the LAN")
	}
	n := &node{bl: bl, short: fmt.Sprintf("nd%d", seq), ip: netip.AddrFrom4([4]byte{10, 240, 0, byte(10 + seq)})}
	var err error
	if n.ns, err = bl.lab.AddNamespace(n.short); err != nil {
		return nil, err
	}
	steps := []func() error{
		func() error { return bl.lab.LinkBridge(n.ns, bl.router, "lan", netip.PrefixFrom(n.ip, 24)) },
		n.ns.EnableForwarding,
		func() error { return n.ns.AddRoute(netip.MustParsePrefix("0.0.0.0/0"), routerLAN) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return nil, fmt.Errorf("build node %s: %w", n.short, err)
		}
	}
	if n.client, err = n.addPod(ctx, n.short+"cli", clientPodIP, "", netip.Prefix{}); err != nil {
		return nil, err
	}
	for i, s := range sinks {
		block := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, s.block, 0, 0}), sinkBits)
		ip := netip.AddrFrom4([4]byte{10, 244, 1, byte(20 + i)})
		if _, err := n.addPod(ctx, fmt.Sprintf("%ss%c", n.short, 'a'+i), ip, s.name, block); err != nil {
			return nil, err
		}
	}
	if err := bl.setNodeAddress(ctx, n.ip); err != nil {
		return nil, fmt.Errorf("update node object: %w", err)
	}
	return n, nil
}

// addPod wires a pod namespace to the node as test/cluster does. With a
// name it runs the echo server (reporting hostname=<name>); with a valid
// block it also answers every address of that block.
func (n *node) addPod(ctx context.Context, short string, ip netip.Addr, name string, block netip.Prefix) (*netns.Namespace, error) {
	bl := n.bl
	p, err := bl.lab.AddNamespace(short)
	if err != nil {
		return nil, err
	}
	steps := []func() error{
		func() error { return bl.lab.Link(p, n.ns, netip.PrefixFrom(ip, 32), netip.Prefix{}) },
		func() error { return n.ns.AddAddr(short, netip.PrefixFrom(podGateway, 32)) },
		func() error { return n.ns.AddDeviceRoute(netip.PrefixFrom(ip, 32), short) },
		func() error { return p.AddDeviceRoute(netip.PrefixFrom(podGateway, 32), n.ns.Short()) },
		func() error { return p.AddRoute(netip.MustParsePrefix("0.0.0.0/0"), podGateway) },
	}
	if block.IsValid() {
		steps = append(steps,
			func() error { return n.ns.AddDeviceRoute(block, short) },
			func() error { return addLocalRoute(p, block) },
		)
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return nil, fmt.Errorf("wire pod %s: %w", short, err)
		}
	}
	if name == "" {
		return p, nil
	}
	proc, err := p.Start(bl.bins.echo, "-listen", fmt.Sprintf(":%d", endpointPort), "-name", name)
	if err != nil {
		return nil, err
	}
	n.procs = append(n.procs, proc)
	wait, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := proc.WaitForOutput(wait, "listening on http"); err != nil {
		return nil, err
	}
	return p, nil
}

// addLocalRoute makes every address of block local to the namespace
// ("ip route add local <block> dev lo"), so a wildcard listener accepts
// connections to all of them.
func addLocalRoute(ns *netns.Namespace, block netip.Prefix) error {
	return ns.WithNetlink(func(h *netlink.Handle) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		a := block.Masked().Addr().As4()
		return h.RouteAdd(&netlink.Route{
			Dst:       ipNet(a[:], block.Bits()),
			Type:      syscall.RTN_LOCAL,
			Table:     syscall.RT_TABLE_LOCAL,
			Scope:     netlink.SCOPE_HOST,
			LinkIndex: lo.Attrs().Index,
		})
	})
}

// retire frees what a finished run holds: it stops the pods' servers,
// flushes the node's tables (the upstream layout at 30,000 Services holds
// hundreds of MB of kernel memory) and unplugs the node from the LAN. The
// empty namespaces go with the lab at the end.
func (n *node) retire(ctx context.Context) {
	for _, p := range n.procs {
		p.Stop()
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	if _, err := exec.LookPath("nft"); err == nil {
		n.ns.Run(ctx, "nft", "flush", "ruleset")
	} else {
		for _, bin := range []string{"iptables", "ip6tables"} {
			for _, t := range []string{"nat", "filter", "mangle"} {
				n.ns.Run(ctx, bin, "-w", "-t", t, "-F")
				n.ns.Run(ctx, bin, "-w", "-t", t, "-X")
			}
		}
	}
	n.bl.router.WithNetlink(func(h *netlink.Handle) error {
		l, err := h.LinkByName(n.short)
		if err != nil {
			return err
		}
		return h.LinkDel(l)
	})
}

// runOutput runs a command in ns and returns its stdout, trimmed.
func runOutput(ctx context.Context, ns *netns.Namespace, name string, args ...string) string {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, errOut, err := ns.Run(ctx, name, args...)
	if err != nil {
		return strings.TrimSpace(out + errOut)
	}
	return strings.TrimSpace(out)
}
