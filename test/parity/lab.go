// Package parity runs miniproxy and upstream kube-proxy (iptables mode) on
// two identical namespace labs, puts the same randomized cluster states
// into both, sends the same probes to both, and compares what the clients
// saw. See docs/parity.md.
package parity

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

// The two proxies.
const (
	miniproxy = "miniproxy"
	kubeProxy = "kube-proxy"
)

// minSyncPeriod is both proxies' minimum time between syncs: short, so
// that a scenario's state reaches both quickly; the same for both.
const minSyncPeriod = "100ms"

// backendsPerNode is the pool of endpoint pods each node keeps; scenarios
// choose among them by labels and readiness.
const backendsPerNode = 3

// Outside clients sit on the nodes' LAN, outside the cluster, each sending
// everything that is not on the LAN through one node: "in" ones inside the
// range that scenarios admit with loadBalancerSourceRanges, "out" ones
// outside it.
var (
	admittedRange = netip.MustParsePrefix("10.240.0.64/30")
	outsideAddr   = map[string]netip.Addr{
		"in-node1":  netip.MustParseAddr("10.240.0.65"),
		"in-node2":  netip.MustParseAddr("10.240.0.66"),
		"out-node1": netip.MustParseAddr("10.240.0.129"),
		"out-node2": netip.MustParseAddr("10.240.0.130"),
	}
)

// outsideVia names the node an outside client (outsideAddr's key) sends
// through.
func outsideVia(client string) string {
	return strings.TrimPrefix(strings.TrimPrefix(client, "in-"), "out-")
}

// side is one lab with one kind of proxy on its nodes.
type side struct {
	proxy    string
	c        *cluster.Cluster
	outside  map[string]*netns.Namespace // by outsideAddr's keys
	clients  map[string]*cluster.Pod     // a client pod per node name
	backends []*cluster.Pod              // the pool, node by node
	// extra are pods made for one scenario (terminating ones), deleted
	// at its end.
	extra []*cluster.Pod
	// next numbers the extra pods, the same on both sides.
	next int
	// transient counts failures among answers left out of outcomes.
	transient atomic.Int64
}

// startSide brings up a lab whose nodes run proxy, with its outside
// clients and pods. Both sides are built by the same calls in the same
// order, so pods get the same addresses on both.
func startSide(ctx context.Context, proxy string, logf func(string, ...any)) (s *side, err error) {
	opts := cluster.Options{
		Nodes:          2,
		NoLoadBalancer: true,
		Logf:           func(f string, a ...any) { logf(proxy+": "+f, a...) },
	}
	switch proxy {
	case miniproxy:
		opts.ProxyArgs = func(*cluster.Node) ([]string, bool) {
			return []string{"--iptables-min-sync-period", minSyncPeriod}, false
		}
	case kubeProxy:
		bins, err := netns.K8sBinaries()
		if err != nil {
			return nil, err
		}
		opts.Proxy = func(n *cluster.Node, kubeconfig string) *exec.Cmd {
			return kubeProxyCmd(bins.KubeProxy, n, kubeconfig)
		}
		opts.ProxySynced = kubeProxySynced
	}
	c, err := cluster.Start(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("start the %s lab: %w", proxy, err)
	}
	s = &side{proxy: proxy, c: c, outside: map[string]*netns.Namespace{}, clients: map[string]*cluster.Pod{}}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	for _, n := range c.Nodes {
		// REJECT answers with ICMP errors (kube-proxy for TCP too); the
		// kernel's per-host rate limit would turn some refusals into
		// silent drops at random, on either side.
		for key, value := range map[string]string{
			"net.ipv4.icmp_ratelimit": "0",
			// And the node-wide budget, which parallel probes exceed.
			"net.ipv4.icmp_msgs_per_sec": "100000",
			"net.ipv4.icmp_msgs_burst":   "100000",
		} {
			if err := n.NS.SetSysctl(key, value); err != nil {
				return nil, err
			}
		}
	}
	for _, name := range slices.Sorted(maps.Keys(outsideAddr)) {
		ns, err := c.Lab.AddNamespace(name)
		if err != nil {
			return nil, err
		}
		if err := c.Lab.LinkBridge(ns, c.Router, "lan", netip.PrefixFrom(outsideAddr[name], 24)); err != nil {
			return nil, err
		}
		via := c.Node(outsideVia(name)).IP
		if err := ns.AddRoute(netip.MustParsePrefix("0.0.0.0/0"), via); err != nil {
			return nil, err
		}
		s.outside[name] = ns
	}
	for _, n := range c.Nodes {
		p, err := c.AddPod(ctx, cluster.PodSpec{Name: "client-" + n.Name, Labels: map[string]string{"role": "client"}, Node: n})
		if err != nil {
			return nil, err
		}
		s.clients[n.Name] = p
		for i := 0; i < backendsPerNode; i++ {
			p, err := c.AddPod(ctx, cluster.PodSpec{Name: fmt.Sprintf("b-%s-%d", n.Name, i), Labels: map[string]string{"role": "backend"}, Node: n})
			if err != nil {
				return nil, err
			}
			s.backends = append(s.backends, p)
		}
	}
	return s, nil
}

// kubeProxySynced is what upstream kube-proxy logs (at --v=2) after a sync.
const kubeProxySynced = "SyncProxyRules complete"

// kubeProxyCmd is upstream kube-proxy in iptables mode on node n, with the
// lab's settings and extra flags.
func kubeProxyCmd(bin string, n *cluster.Node, kubeconfig string, extra ...string) *exec.Cmd {
	args := append([]string{
		"--proxy-mode=iptables",
		"--kubeconfig=" + kubeconfig,
		"--hostname-override=" + n.Name,
		"--cluster-cidr=" + cluster.ClusterCIDR.String(),
		"--iptables-min-sync-period=" + minSyncPeriod,
		"--metrics-bind-address=127.0.0.1:10249",
		"--healthz-bind-address=0.0.0.0:10256",
		"--v=2",
	}, netns.LeaveConntrackAlone...)
	cmd := exec.Command(bin, append(args, extra...)...)
	cmd.Env = netns.CleanEnv()
	return cmd
}

// startBoth starts the two sides at once.
func startBoth(ctx context.Context, logf func(string, ...any)) (sides [2]*side, err error) {
	var wg sync.WaitGroup
	var errs [2]error
	for i, proxy := range []string{miniproxy, kubeProxy} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sides[i], errs[i] = startSide(ctx, proxy, logf)
		}()
	}
	wg.Wait()
	for i, e := range errs {
		if e != nil {
			for _, s := range sides {
				if s != nil {
					s.c.Close()
				}
			}
			return sides, fmt.Errorf("%s: %w", []string{miniproxy, kubeProxy}[i], e)
		}
	}
	return sides, nil
}

// close tears the side's lab down.
func (s *side) close() error { return s.c.Close() }

// waitSynced waits until the cluster state has settled (no Service or
// EndpointSlice changed for a while: the EndpointSlice controller is done)
// and every node's proxy has synced it: no change pending, and the last
// successful sync ended after the last change was queued (a sync that took
// a change ends after it was queued; a change queued during a sync stays
// pending). Both proxies export these kube-proxy metrics (kube-proxy per
// IP family: the IPv4 ones count).
func (s *side) waitSynced(ctx context.Context) error {
	if _, err := s.waitSettled(ctx); err != nil {
		return err
	}
	return cluster.Eventually(ctx, 20*time.Second, func() error {
		for _, n := range s.c.Nodes {
			m, err := scrape(ctx, n)
			if err != nil {
				return err
			}
			pending := sum(m["kubeproxy_sync_proxy_rules_service_changes_pending"]) + sum(m["kubeproxy_sync_proxy_rules_endpoint_changes_pending"])
			synced := least(m["kubeproxy_sync_proxy_rules_last_timestamp_seconds"])
			queued := most(m["kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"])
			if pending > 0 || synced < queued {
				return fmt.Errorf("%s on %s has not synced the last change (pending %v, last sync %.3f, last change queued %.3f)",
					s.proxy, n.Name, pending, synced, queued)
			}
		}
		return nil
	})
}

func sum(vs []float64) float64 {
	t := 0.0
	for _, v := range vs {
		t += v
	}
	return t
}

func least(vs []float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	m := vs[0]
	for _, v := range vs {
		m = min(m, v)
	}
	return m
}

func most(vs []float64) float64 {
	m := 0.0
	for _, v := range vs {
		m = max(m, v)
	}
	return m
}

// quiet is how long the state must stay unchanged to count as settled.
const quiet = 300 * time.Millisecond

// waitSettled polls Services and EndpointSlices until none has changed for
// quiet, and returns when the last change was seen.
func (s *side) waitSettled(ctx context.Context) (time.Time, error) {
	last, lastChange := "", time.Now()
	deadline := time.Now().Add(20 * time.Second)
	for {
		v, err := s.versions(ctx)
		if err != nil {
			return time.Time{}, err
		}
		if v != last {
			last, lastChange = v, time.Now()
		} else if time.Since(lastChange) >= quiet {
			return lastChange, nil
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("%s: the cluster state did not settle within 20s", s.proxy)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// versions sums up the resource versions of every Service and
// EndpointSlice, to tell whether anything changed.
func (s *side) versions(ctx context.Context) (string, error) {
	svcs, err := s.c.Kube.CoreV1().Services(namespace).List(ctx, listAll)
	if err != nil {
		return "", err
	}
	slices, err := s.c.Kube.DiscoveryV1().EndpointSlices(namespace).List(ctx, listAll)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, x := range svcs.Items {
		b.WriteString(x.Name + "@" + x.ResourceVersion + " ")
	}
	for _, x := range slices.Items {
		b.WriteString(x.Name + "@" + x.ResourceVersion + " ")
	}
	return b.String(), nil
}

// scrape reads a node proxy's metrics (on loopback inside the node): the
// values of each metric name, one per label set.
func scrape(ctx context.Context, n *cluster.Node) (map[string][]float64, error) {
	_, body, err := n.NS.HTTPGet(ctx, "http://127.0.0.1:10249/metrics", 2*time.Second)
	if err != nil {
		return nil, err
	}
	out := map[string][]float64{}
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, "#") || l == "" {
			continue
		}
		i := strings.LastIndex(l, " ")
		if i < 0 {
			continue
		}
		name := l[:i]
		// The scenarios are IPv4 only; kube-proxy's IPv6 proxier may be
		// asked to sync by them and not do it, and has nothing to sync.
		if strings.Contains(name, `ip_family="IPv6"`) {
			continue
		}
		if j := strings.Index(name, "{"); j >= 0 {
			name = name[:j]
		}
		var v float64
		if _, err := fmt.Sscan(l[i+1:], &v); err == nil {
			out[name] = append(out[name], v)
		}
	}
	return out, nil
}
