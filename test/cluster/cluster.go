// Package cluster builds the tutorial's cluster out of network namespaces: a
// router with the nodes' LAN, a client network and a load balancer VIP; a
// control plane with a real etcd, kube-apiserver and kube-controller-manager
// (whose EndpointSlice controller writes every EndpointSlice); nodes each
// running miniproxy as its own process, exactly as the DaemonSet would; and
// pods running the echo server behind their nodes. The lab plays the parts
// of the kubelet (pods bound to nodes, their status, their deletion) and of
// a packet-forwarding cloud load balancer that follows healthCheckNodePort.
//
// It is used by the end-to-end tests and by `make demo`.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/miniproxy/miniproxy/test/netns"
)

// The lab's addresses, the tutorial's where they fit.
var (
	LAN         = netip.MustParsePrefix("10.240.0.0/24")
	RouterLAN   = netip.MustParseAddr("10.240.0.1")
	ControlIP   = netip.MustParseAddr("10.240.0.2")
	ClientNet   = netip.MustParsePrefix("198.51.100.0/24")
	RouterWAN   = netip.MustParseAddr("198.51.100.1")
	ClientIP    = netip.MustParseAddr("198.51.100.79")
	FirstVIP    = netip.MustParseAddr("203.0.113.140")
	ClusterCIDR = netip.MustParsePrefix("10.244.0.0/16")
	ServiceCIDR = netip.MustParsePrefix("10.96.0.0/16")
)

// MaxEndpointsPerSlice is the EndpointSlice controller's limit in the lab
// (100 in a real cluster): small, so that slices split with a few pods.
const MaxEndpointsPerSlice = 2

// Options shape a cluster.
type Options struct {
	// Nodes is the number of nodes (at least 1; 2 when zero).
	Nodes int
	// Logf receives progress lines; nil discards them.
	Logf func(format string, args ...any)
	// ProxyArgs returns extra miniproxy arguments for a node, or the whole
	// command line when Replace is true (used to run a node from a config
	// file, as a DaemonSet would).
	ProxyArgs func(n *Node) (args []string, replace bool)
	// Proxy, when set, makes each node run another proxy than miniproxy
	// (upstream kube-proxy, for the parity test): it returns the command
	// for a node given the kubeconfig of the system:kube-proxy identity,
	// or nil for a node that runs miniproxy (with ProxyArgs). ProxySynced
	// is what that proxy prints once its first sync is done.
	Proxy       func(n *Node, kubeconfig string) *exec.Cmd
	ProxySynced string
	// NoLoadBalancer leaves load balancer IPs and their routes to the
	// caller: no VIP is assigned to LoadBalancer Services.
	NoLoadBalancer bool
}

// Cluster is a running lab cluster. Close tears everything down.
type Cluster struct {
	Lab     *netns.Lab
	Control *netns.ControlPlane
	Router  *netns.Namespace
	Client  *netns.Namespace
	CPNS    *netns.Namespace
	Nodes   []*Node
	// Kube is an admin client whose connections start inside the lab.
	Kube kubernetes.Interface

	logf     func(string, ...any)
	echoBin  string
	proxyBin string

	mu   sync.Mutex
	pods map[string]*Pod // namespace/name

	lb     *loadBalancer
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// proxySynced is what the nodes' proxy prints after its first sync.
	proxySynced string
}

// Node is one node namespace with its miniproxy.
type Node struct {
	Name    string
	Index   int
	IP      netip.Addr
	PodCIDR netip.Prefix
	Gateway netip.Addr // the node's address on its pods' links
	NS      *netns.Namespace
	Proxy   *netns.Process
	nextPod int
}

// Start brings the whole cluster up; on error everything already made is
// torn down.
func Start(ctx context.Context, opts Options) (c *Cluster, err error) {
	if opts.Nodes <= 0 {
		opts.Nodes = 2
	}
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	lab, err := netns.New()
	if err != nil {
		return nil, fmt.Errorf("create lab: %w", err)
	}
	c = &Cluster{Lab: lab, logf: logf, pods: map[string]*Pod{}, proxySynced: miniproxySynced}
	if opts.ProxySynced != "" {
		c.proxySynced = opts.ProxySynced
	}
	defer func() {
		if err != nil {
			c.Close()
			c = nil
		}
	}()

	// Quick with Go's build cache; on a fresh machine the first build
	// compiles the dependencies, which takes minutes on 2 cores.
	if err := during(logf, "building echoserver and miniproxy (go build)", func() (err error) {
		if c.echoBin, err = netns.Build("github.com/miniproxy/miniproxy/cmd/echoserver"); err != nil {
			return err
		}
		c.proxyBin, err = netns.Build("github.com/miniproxy/miniproxy/cmd/miniproxy")
		return err
	}); err != nil {
		return c, err
	}
	if err := c.buildNetwork(opts.Nodes); err != nil {
		return c, err
	}
	logf("network up: router, client %s, control plane %s, %d nodes", ClientIP, ControlIP, opts.Nodes)

	start := time.Now()
	err = during(logf, "starting etcd, kube-apiserver and kube-controller-manager on cp ("+ControlIP.String()+")", func() (err error) {
		c.Control, err = netns.StartControlPlane(ctx, lab, c.CPNS, netns.ControlPlaneOptions{
			Address:           ControlIP,
			ServiceCIDR:       ServiceCIDR,
			ControllerManager: true,
			// A Service with three pods or more has its endpoints split over
			// several slices, as one with over 100 has in a real cluster.
			MaxEndpointsPerSlice: MaxEndpointsPerSlice,
		})
		return err
	})
	if err != nil {
		return c, fmt.Errorf("start control plane: %w", err)
	}
	c.Kube = c.Control.Client()
	logf("etcd and kube-apiserver ready at %s in %s", c.Control.Server(), time.Since(start).Round(100*time.Millisecond))

	if err := c.registerObjects(ctx); err != nil {
		return c, err
	}
	bg, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	c.lb = newLoadBalancer(c)
	if !opts.NoLoadBalancer {
		c.wg.Add(1)
		go func() { defer c.wg.Done(); c.lb.run(bg) }()
	}

	err = during(logf, "starting the proxies on "+strings.Join(c.nodeNames(), ", ")+" and waiting for their first sync", func() error {
		for _, n := range c.Nodes {
			var other *exec.Cmd
			if opts.Proxy != nil {
				other = opts.Proxy(n, c.Control.ProxyKubeconfig())
			}
			var err error
			if other != nil {
				err = c.StartProxyCmd(ctx, n, func(string, []string) *exec.Cmd { return other })
			} else {
				err = c.startProxy(ctx, n, miniproxyCmd(n, opts.ProxyArgs), miniproxySynced)
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return c, err
	}
	logf("proxies running on %s", strings.Join(c.nodeNames(), ", "))
	return c, nil
}

// during runs f after saying what it does, and says every 10 s that it is
// still at it, so that no step of bringing the lab up is silent for long.
func during(logf func(string, ...any), what string, f func() error) error {
	logf("%s", what)
	start := time.Now()
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(10 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				logf("%s: still at it, %s so far", what, time.Since(start).Round(time.Second))
			}
		}
	}()
	err := f()
	close(done)
	wg.Wait()
	return err
}

func (c *Cluster) nodeNames() []string {
	var out []string
	for _, n := range c.Nodes {
		out = append(out, n.Name)
	}
	return out
}

func (c *Cluster) buildNetwork(nodes int) error {
	var err error
	add := func(short string) *netns.Namespace {
		if err != nil {
			return nil
		}
		var ns *netns.Namespace
		ns, err = c.Lab.AddNamespace(short)
		return ns
	}
	c.Router, c.Client, c.CPNS = add("router"), add("client"), add("cp")
	for i := 1; i <= nodes; i++ {
		n := &Node{
			Name:    fmt.Sprintf("node%d", i),
			Index:   i,
			IP:      netip.AddrFrom4([4]byte{10, 240, 0, byte(2 + i)}),
			PodCIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24),
			Gateway: netip.AddrFrom4([4]byte{10, 244, byte(i), 1}),
			nextPod: 5,
		}
		n.NS = add(n.Name)
		c.Nodes = append(c.Nodes, n)
	}
	if err != nil {
		return err
	}
	steps := []func() error{
		func() error { return c.Router.AddBridge("lan", netip.PrefixFrom(RouterLAN, 24)) },
		c.Router.EnableForwarding,
		func() error {
			return c.Lab.Link(c.Client, c.Router, netip.PrefixFrom(ClientIP, 24), netip.PrefixFrom(RouterWAN, 24))
		},
		func() error { return c.Client.AddRoute(netip.MustParsePrefix("0.0.0.0/0"), RouterWAN) },
		func() error { return c.Lab.LinkBridge(c.CPNS, c.Router, "lan", netip.PrefixFrom(ControlIP, 24)) },
		func() error { return c.CPNS.AddRoute(netip.MustParsePrefix("0.0.0.0/0"), RouterLAN) },
	}
	for _, n := range c.Nodes {
		steps = append(steps,
			func() error { return c.Lab.LinkBridge(n.NS, c.Router, "lan", netip.PrefixFrom(n.IP, 24)) },
			n.NS.EnableForwarding,
			func() error { return n.NS.AddRoute(netip.MustParsePrefix("0.0.0.0/0"), RouterLAN) },
			func() error { return c.Router.AddRoute(n.PodCIDR, n.IP) },
		)
		for _, other := range c.Nodes {
			if other != n {
				steps = append(steps, func() error { return n.NS.AddRoute(other.PodCIDR, other.IP) })
			}
		}
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return fmt.Errorf("build lab network: %w", err)
		}
	}
	return nil
}

// registerObjects writes what kubelets and controllers would: the Node
// objects and the default ServiceAccount.
func (c *Cluster) registerObjects(ctx context.Context) error {
	for _, n := range c.Nodes {
		node := &v1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: map[string]string{
				"kubernetes.io/hostname":      n.Name,
				"topology.kubernetes.io/zone": "zone-" + n.Name,
			}},
			Spec: v1.NodeSpec{PodCIDR: n.PodCIDR.String(), PodCIDRs: []string{n.PodCIDR.String()}},
			Status: v1.NodeStatus{
				Addresses:  []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: n.IP.String()}, {Type: v1.NodeHostName, Address: n.Name}},
				Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}},
			},
		}
		if _, err := c.Kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("register node %s: %w", n.Name, err)
		}
	}
	sa := &v1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "default"}}
	if _, err := c.Kube.CoreV1().ServiceAccounts("default").Create(ctx, sa, metav1.CreateOptions{}); err != nil && !strings.Contains(err.Error(), "already exists") {
		return fmt.Errorf("create default service account: %w", err)
	}
	return nil
}

// StartProxy runs miniproxy on a node, as the DaemonSet's container would,
// and waits for its first sync.
func (c *Cluster) StartProxy(ctx context.Context, n *Node, extra func(*Node) ([]string, bool)) error {
	return c.StartProxyCmd(ctx, n, miniproxyCmd(n, extra))
}

// miniproxySynced is what miniproxy logs after a sync.
const miniproxySynced = "rules synced"

// miniproxyCmd makes the command of a node's miniproxy from the lab's
// usual arguments and extra's.
func miniproxyCmd(n *Node, extra func(*Node) ([]string, bool)) func(bin string, args []string) *exec.Cmd {
	return func(bin string, args []string) *exec.Cmd {
		if extra != nil {
			more, replace := extra(n)
			if replace {
				args = more
			} else {
				args = append(args, more...)
			}
		}
		return exec.Command(bin, args...)
	}
}

// StartProxyCmd is StartProxy for a command the caller builds from the
// miniproxy binary and the lab's usual arguments (ProxyArgs: its kubeconfig, the
// node's name, the cluster CIDR): to replace the arguments, to set the
// environment (in-cluster credentials: KUBERNETES_SERVICE_HOST and
// KUBERNETES_SERVICE_PORT) or to run the binary under another program. It
// waits for the first sync as StartProxy does.
func (c *Cluster) StartProxyCmd(ctx context.Context, n *Node, mk func(bin string, args []string) *exec.Cmd) error {
	return c.startProxy(ctx, n, mk, c.proxySynced)
}

// ProxyArgs are the lab's usual miniproxy arguments for node n: its
// kubeconfig, the node's name, the cluster CIDR, and no change to the
// machine's conntrack settings.
func (c *Cluster) ProxyArgs(n *Node) []string {
	return append([]string{
		"--kubeconfig", c.Control.ProxyKubeconfig(),
		"--hostname-override", n.Name,
		"--cluster-cidr", ClusterCIDR.String(),
	}, netns.LeaveConntrackAlone...)
}

// startProxy starts a node's proxy and waits until it prints synced.
func (c *Cluster) startProxy(ctx context.Context, n *Node, mk func(bin string, args []string) *exec.Cmd, synced string) error {
	p, err := n.NS.StartCmd(mk(c.proxyBin, c.ProxyArgs(n)))
	if err != nil {
		return fmt.Errorf("start miniproxy on %s: %w", n.Name, err)
	}
	n.Proxy = p
	wait, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := p.WaitForOutput(wait, synced); err != nil {
		return fmt.Errorf("miniproxy on %s did not sync: %w\n%s", n.Name, err, p.Output())
	}
	return nil
}

// StopProxy stops a node's miniproxy (its rules stay, as when a DaemonSet
// pod is replaced).
func (c *Cluster) StopProxy(n *Node) error {
	if n.Proxy == nil {
		return nil
	}
	err := n.Proxy.Stop()
	n.Proxy = nil
	return err
}

// Node returns the node with the given name.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// Kubectl runs kubectl with the admin credentials from inside ns.
func (c *Cluster) Kubectl(ctx context.Context, ns *netns.Namespace, args ...string) (string, error) {
	return c.Control.Kubectl(ctx, ns, args...)
}

// Close stops the controllers and tears the lab down; it is safe to call
// more than once.
func (c *Cluster) Close() error {
	if c == nil {
		return nil
	}
	if c.cancel != nil {
		c.cancel()
		c.wg.Wait()
		c.cancel = nil
	}
	if c.Lab == nil {
		return nil
	}
	return c.Lab.Close()
}

// Outputs returns every lab process's recent output, for failure reports.
func (c *Cluster) Outputs() string {
	var b strings.Builder
	for _, n := range c.Nodes {
		if n.Proxy != nil {
			fmt.Fprintf(&b, "--- miniproxy on %s:\n%s\n", n.Name, tail(n.Proxy.Output(), 40))
		}
	}
	return b.String()
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// Eventually polls f every 100ms until it returns nil or the timeout passes,
// and returns f's last error.
func Eventually(ctx context.Context, timeout time.Duration, f func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(100 * time.Millisecond):
		}
	}
}

var errNoPod = errors.New("no such pod")

// RunTests is the TestMain of a test package that shares one lab cluster
// of two nodes: it skips without root, fails without the Kubernetes
// binaries, starts the cluster, hands it to use, runs the tests, prints
// every process's output if one failed, and tears everything down. It
// returns the exit code.
func RunTests(m interface{ Run() int }, pkg string, use func(*Cluster)) int {
	if os.Geteuid() != 0 {
		fmt.Println(pkg + ": skipped, needs root to build network namespaces")
		return 0
	}
	if _, err := netns.K8sBinaries(); err != nil {
		fmt.Printf("%s: kube-apiserver is not available (run `make k8s-binaries`): %v\n", pkg, err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	c, err := Start(ctx, Options{Nodes: 2, Logf: func(f string, a ...any) { fmt.Printf("lab: "+f+"\n", a...) }})
	cancel()
	if err != nil {
		fmt.Printf("%s: start the lab cluster: %v\n", pkg, err)
		return 1
	}
	use(c)
	code := m.Run()
	if code != 0 {
		fmt.Println(c.Outputs())
	}
	c.Close()
	return code
}
