package integration

import (
	"context"
	"net"
	"net/netip"
	"regexp"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
	"github.com/miniproxy/miniproxy/test/netns"
)

const dnsClusterIP = "10.96.0.53"

// udpDNS is a UDP Service on 10.96.0.53:53 whose pods answer on 8081.
func udpDNS() *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "dns"},
		Spec: v1.ServiceSpec{
			Type: v1.ServiceTypeClusterIP, ClusterIP: dnsClusterIP, ClusterIPs: []string{dnsClusterIP},
			Ports: []v1.ServicePort{{Port: 53, Protocol: v1.ProtocolUDP, TargetPort: intstr.FromInt32(8081)}},
		},
	}
}

// udpDNSSlice lists pods (pod1IP, pod2IP) as ready endpoints of udpDNS.
func udpDNSSlice(pods ...netip.Addr) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: "dns-1", Labels: map[string]string{discoveryv1.LabelServiceName: "dns"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: ptr.To[int32](8081), Protocol: ptr.To(v1.ProtocolUDP)}},
	}
	for _, p := range pods {
		node := "node2"
		if p == pod1IP {
			node = "node1"
		}
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{p.String()}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}, NodeName: ptr.To(node)})
	}
	return s
}

// startProxier is one run of miniproxy on the node: a fresh tracker that
// knows the Service and its endpoints, and a proxier whose conntrack table
// is the node's (nil: no reconciler). It syncs once and returns the result.
func startProxier(t *testing.T, top *topology, table conntrack.Table, pods ...netip.Addr) proxy.SyncResult {
	t.Helper()
	p, _ := newProxier(t, table, udpDNS(), udpDNSSlice(pods...))
	return syncInNode(t, top, p)
}

// newProxier is a miniproxy for the node that knows one Service and its
// slice, whose conntrack table is table (nil: no reconciler), and its
// tracker, to tell it of more.
func newProxier(t *testing.T, table conntrack.Table, svc *v1.Service, slice *discoveryv1.EndpointSlice) (*proxy.Proxier, *endpoints.Tracker) {
	t.Helper()
	dp, err := dataplane.New(dataplane.NewRunner(), iptables.IPv4, rules.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	tracker := endpoints.NewTracker("node1", quietLog, nil)
	tracker.OnServiceAdd(svc)
	tracker.OnEndpointSliceAdd(slice)
	opts := proxy.Options{DetectLocal: rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{clusterNet}}, SyncPeriod: time.Minute}
	if table != nil {
		opts.Conntrack = table
	}
	p := proxy.New(opts, tracker, map[iptables.Family]proxy.Applier{iptables.IPv4: dp},
		func(f iptables.Family) ([]netip.Addr, error) {
			if f == iptables.IPv4 {
				return []netip.Addr{nodeIP, pod1GW, pod2GW}, nil
			}
			return nil, nil
		}, quietLog)
	return p, tracker
}

// syncInNode syncs p once in the node's namespace and fails the test on an
// error of the sync or of its conntrack reconciliation.
func syncInNode(t *testing.T, top *topology, p *proxy.Proxier) proxy.SyncResult {
	t.Helper()
	var res proxy.SyncResult
	top.node.Do(func() error { res = p.Sync(false); return nil })
	if res.Err != nil {
		t.Fatalf("sync: %v", res.Err)
	}
	for _, c := range res.Conntrack {
		if c.Err != nil {
			t.Fatalf("conntrack reconciliation: %v", c.Err)
		}
	}
	return res
}

// nodeTable opens the node namespace's conntrack table.
func nodeTable(t *testing.T, ns *netns.Namespace) *conntrack.Kernel {
	t.Helper()
	var table *conntrack.Kernel
	if err := ns.Do(func() error {
		var err error
		table, err = conntrack.OpenKernel()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { table.Close() })
	return table
}

var udpServer = regexp.MustCompile(`server=(\S+)`)

// udpFlow is a client that sends a datagram every 100 ms from one fixed
// source port to the ClusterIP, as a long-lived UDP client (a metrics
// agent, a game, a VPN) does, and records every answer.
type udpFlow struct {
	conn *net.UDPConn
	mu   sync.Mutex
	sent int
	// answers are the servers that answered, in order, and when.
	answers []string
	at      []time.Time
	stop    chan struct{}
	done    sync.WaitGroup
}

func startFlow(t *testing.T, ns *netns.Namespace, srcPort int) *udpFlow {
	t.Helper()
	f := &udpFlow{stop: make(chan struct{})}
	if err := ns.Do(func() error {
		var err error
		f.conn, err = net.DialUDP("udp", &net.UDPAddr{Port: srcPort}, &net.UDPAddr{IP: net.ParseIP(dnsClusterIP), Port: 53})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	f.done.Add(2)
	go func() {
		defer f.done.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			f.mu.Lock()
			f.sent++
			f.mu.Unlock()
			f.conn.Write([]byte("ping"))
			select {
			case <-f.stop:
				return
			case <-tick.C:
			}
		}
	}()
	go func() {
		defer f.done.Done()
		buf := make([]byte, 1024)
		for {
			n, err := f.conn.Read(buf)
			if err != nil {
				return // closed by halt
			}
			if m := udpServer.FindSubmatch(buf[:n]); m != nil {
				f.mu.Lock()
				f.answers = append(f.answers, string(m[1]))
				f.at = append(f.at, time.Now())
				f.mu.Unlock()
			}
		}
	}()
	t.Cleanup(f.close)
	return f
}

// halt stops sending, waits for the last answers, and stops reading.
func (f *udpFlow) halt() {
	select {
	case <-f.stop:
		return
	default:
	}
	close(f.stop)
	time.Sleep(300 * time.Millisecond)
	f.conn.Close()
	f.done.Wait()
}

func (f *udpFlow) close() { f.halt() }

// state returns how many datagrams were sent and who answered.
func (f *udpFlow) state() (sent int, answers []string, at []time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sent, append([]string(nil), f.answers...), append([]time.Time(nil), f.at...)
}

// waitForAnswers waits until the flow has n answers and returns the last
// answerer.
func (f *udpFlow) waitForAnswers(t *testing.T, n int) string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if _, answers, _ := f.state(); len(answers) >= n {
			return answers[len(answers)-1]
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the UDP flow got fewer than %d answers in 5 s", n)
	return ""
}

// An endpoint of a UDP Service goes away (its pod is deleted: its packets
// now go nowhere) while miniproxy is not running. A client that keeps its
// 5-tuple keeps being sent to the dead pod by its conntrack entry, for as
// long as it sends (kubernetes #139628). When miniproxy starts again, its
// start-up reconciliation deletes that entry, and the client reaches the
// live endpoint within a second.
func TestUDPFlowToAnEndpointRemovedWhileMiniproxyWasDownRecoversAtStart(t *testing.T) {
	top := setUp(t)
	table := nodeTable(t, top.node)
	startProxier(t, top, table, pod1IP, pod2IP)

	flow := startFlow(t, top.client, 40053)
	first := flow.waitForAnswers(t, 3)
	dead, live, liveName, deadNS := pod1IP, pod2IP, "pod2", top.pod1
	if first == "pod2" {
		dead, live, liveName, deadNS = pod2IP, pod1IP, "pod1", top.pod2
	}
	t.Logf("the flow goes to %s (%s); that pod is deleted while miniproxy is stopped", first, dead)

	// miniproxy stops; the pod goes away: its link is cut, as a deleted
	// pod's would be.
	if err := deadNS.WithNetlink(func(h *netlink.Handle) error {
		l, err := h.LinkByName("node")
		if err != nil {
			return err
		}
		return h.LinkSetDown(l)
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	_, before, _ := flow.state()
	time.Sleep(500 * time.Millisecond)
	if _, after, _ := flow.state(); len(after) != len(before) {
		t.Fatalf("with the pod gone and no miniproxy, the flow should be black-holed, yet got %v", after[len(before):])
	}

	// miniproxy starts with the Service's current endpoints.
	res := startProxier(t, top, table, live)
	started := res.End
	deadline := started.Add(time.Second)
	time.Sleep(1200 * time.Millisecond)
	_, answers, at := flow.state()
	for i := len(before); i < len(answers); i++ {
		if answers[i] != liveName {
			t.Fatalf("after the restart the flow was answered by %s, want the live endpoint %s", answers[i], live)
		}
		if at[i].After(started) {
			if at[i].After(deadline) {
				t.Fatalf("first answer after the restart came %s after miniproxy's first sync, want within 1 s", at[i].Sub(started))
			}
			t.Logf("after the restart the same 5-tuple reached %s %s after the first sync (conntrack: %+v)", answers[i], at[i].Sub(started).Round(time.Millisecond), res.Conntrack)
			return
		}
	}
	t.Fatalf("the client on the same 5-tuple got no answer within 1 s of miniproxy's start (conntrack: %+v); still sent to the deleted %s", res.Conntrack, dead)
}

// Restarting miniproxy with nothing changed disturbs no established UDP
// flow: start-up reconciles the conntrack table and deletes nothing that
// still points to a serving endpoint, so every datagram of every flow is
// answered, and by the endpoint the flow was on (upstream kube-proxy
// deleted every UDP entry of its Services at start-up, kubernetes #122740,
// and each flow then picked an endpoint anew).
func TestARestartWithNoChangeKeepsEveryUDPFlowOnItsEndpoint(t *testing.T) {
	top := setUp(t)
	table := nodeTable(t, top.node)
	startProxier(t, top, table, pod1IP, pod2IP)

	var flows []*udpFlow
	for i := range 8 {
		flows = append(flows, startFlow(t, top.client, 41000+i))
	}
	for _, f := range flows {
		f.waitForAnswers(t, 3)
	}
	res := startProxier(t, top, table, pod1IP, pod2IP)
	if len(res.Conntrack) != 1 || res.Conntrack[0].Deleted != 0 || res.Conntrack[0].Seen < len(flows) {
		t.Errorf("start-up reconciliation %+v, want every flow seen and none deleted", res.Conntrack)
	}
	time.Sleep(1500 * time.Millisecond)
	for i, f := range flows {
		f.halt()
		sent, answers, _ := f.state()
		if len(answers) != sent {
			t.Errorf("flow %d: %d datagrams sent, %d answered", i, sent, len(answers))
		}
		for _, a := range answers {
			if a != answers[0] {
				t.Errorf("flow %d moved from %s to %s across the restart: %v", i, answers[0], a, answers)
				break
			}
		}
	}
}

// The kernel table is asked only for the protocols and family a sweep
// needs (a dump filter where the kernel has one), judged one entry at a
// time, and only what is judged stale is deleted: TCP, other protocols
// and the other family are left alone.
func TestTheKernelTableSweepsOnlyWhatItIsAskedFor(t *testing.T) {
	lab, must := rootLab(t)
	ns, err := lab.AddNamespace("ct")
	must(err)
	entry := func(fam uint8, proto uint8, src, dst, replySrc string) *netlink.ConntrackFlow {
		s, d, r := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst), netip.MustParseAddrPort(replySrc)
		return &netlink.ConntrackFlow{
			FamilyType: fam,
			Forward:    netlink.IPTuple{Protocol: proto, SrcIP: s.Addr().AsSlice(), DstIP: d.Addr().AsSlice(), SrcPort: s.Port(), DstPort: d.Port()},
			Reverse:    netlink.IPTuple{Protocol: proto, SrcIP: r.Addr().AsSlice(), DstIP: s.Addr().AsSlice(), SrcPort: r.Port(), DstPort: s.Port()},
			TimeOut:    600,
		}
	}
	flows := []*netlink.ConntrackFlow{
		entry(unix.AF_INET, unix.IPPROTO_UDP, "10.250.0.1:1000", "10.96.0.53:53", "10.244.1.5:8081"), // stale
		entry(unix.AF_INET, unix.IPPROTO_UDP, "10.250.0.2:1000", "10.96.0.53:53", "10.244.2.6:8081"), // serving
		entry(unix.AF_INET, unix.IPPROTO_TCP, "10.250.0.3:1000", "10.96.0.53:53", "10.244.1.5:8081"),
		entry(unix.AF_INET, unix.IPPROTO_SCTP, "10.250.0.4:1000", "10.96.0.53:53", "10.244.1.5:8081"),
		entry(unix.AF_INET6, unix.IPPROTO_UDP, "[fd00::1]:1000", "[fd00:96::53]:53", "[fd00::5]:8081"),
	}
	must(ns.WithNetlink(func(h *netlink.Handle) error {
		for _, f := range flows {
			if err := h.ConntrackCreate(netlink.ConntrackTable, netlink.InetFamily(f.FamilyType), f); err != nil {
				return err
			}
		}
		return nil
	}))
	var table *conntrack.Kernel
	must(ns.Do(func() error { table, err = conntrack.OpenKernel(); return err }))
	defer table.Close()

	var saw []conntrack.Entry
	seen, deleted, err := table.Sweep(iptables.IPv4, []uint8{conntrack.ProtoUDP}, func(e *conntrack.Entry) bool {
		saw = append(saw, *e)
		return e.ReplySrc.Addr() == pod1IP
	})
	must(err)
	if seen != 2 || deleted != 1 || len(saw) != 2 {
		t.Fatalf("sweep saw %d (%v) and deleted %d, want the 2 IPv4 UDP entries and 1 deleted", seen, saw, deleted)
	}
	want := conntrack.Entry{Proto: conntrack.ProtoUDP, OrigSrc: netip.MustParseAddrPort("10.250.0.1:1000"), OrigDst: netip.MustParseAddrPort("10.96.0.53:53"),
		ReplySrc: netip.MustParseAddrPort("10.244.1.5:8081"), ReplyDst: netip.MustParseAddrPort("10.250.0.1:1000")}
	if saw[0] != want && saw[1] != want {
		t.Errorf("sweep read %v, want %v among them", saw, want)
	}
	t.Logf("the kernel filters dumps by protocol: %v", table.KernelFilters())

	var left []string
	must(ns.WithNetlink(func(h *netlink.Handle) error {
		for _, fam := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
			list, err := h.ConntrackTableList(netlink.ConntrackTable, fam)
			if err != nil {
				return err
			}
			for _, f := range list {
				left = append(left, f.Forward.SrcIP.String())
			}
		}
		return nil
	}))
	if len(left) != len(flows)-1 {
		t.Errorf("left in the table: %v, want every entry but 10.250.0.1's", left)
	}
	for _, l := range left {
		if l == "10.250.0.1" {
			t.Errorf("the stale entry is still there: %v", left)
		}
	}

	seen, deleted, err = table.Sweep(iptables.IPv4, []uint8{conntrack.ProtoUDP, conntrack.ProtoSCTP}, func(e *conntrack.Entry) bool { return false })
	must(err)
	if seen != 2 || deleted != 0 {
		t.Errorf("a UDP+SCTP sweep saw %d and deleted %d, want the UDP and the SCTP entry, none deleted", seen, deleted)
	}
}

// webService is a TCP Service named name on clusterIP:80 whose one endpoint
// is pod2:8080.
func webService(name, clusterIP string) (*v1.Service, *discoveryv1.EndpointSlice) {
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: v1.ServiceSpec{Type: v1.ServiceTypeClusterIP, ClusterIP: clusterIP, ClusterIPs: []string{clusterIP},
			Ports: []v1.ServicePort{{Port: 80, Protocol: v1.ProtocolTCP, TargetPort: intstr.FromInt32(8080)}}},
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: name + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: ptr.To[int32](8080), Protocol: ptr.To(v1.ProtocolTCP)}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{pod2IP.String()}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}, NodeName: ptr.To("node2")}},
	}
	return svc, slice
}

// connectFrom opens (and closes) a TCP connection from the client's port
// to address, waiting at most 500 ms.
func connectFrom(top *topology, port int, address string) error {
	return top.client.Do(func() error {
		d := net.Dialer{LocalAddr: &net.TCPAddr{Port: port}, Timeout: 500 * time.Millisecond}
		c, err := d.Dial("tcp", address)
		if err == nil {
			c.Close()
		}
		return err
	})
}

// untranslatedFrom counts the node's TCP entries from the client's port
// that were never translated.
func untranslatedFrom(t *testing.T, top *topology, table conntrack.Table, port uint16) int {
	t.Helper()
	n := 0
	err := top.node.Do(func() error {
		_, _, err := table.Sweep(iptables.IPv4, []uint8{conntrack.ProtoTCP}, func(e *conntrack.Entry) bool {
			if e.OrigSrc.Port() == port && e.ReplySrc == e.OrigDst {
				n++
			}
			return false
		})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// A TCP sweep is passed only the entries that never saw a reply (the kernel
// filters them by status where it can, Linux 5.19+, and the sweep drops the
// rest itself): on a busy node nearly every TCP entry did, and none of those
// can be an untranslated SYN.
func TestATCPSweepReadsOnlyUnrepliedEntries(t *testing.T) {
	lab, must := rootLab(t)
	ns, err := lab.AddNamespace("ct-tcp")
	must(err)
	ctx := context.Background()
	for _, e := range []struct{ sport, status string }{{"1001", ""}, {"1002", "SEEN_REPLY"}, {"1003", "SEEN_REPLY,ASSURED"}} {
		args := []string{"-I", "-p", "tcp", "-s", "10.250.0.1", "-d", "10.96.0.80", "--sport", e.sport, "--dport", "80",
			"--state", "SYN_SENT", "-t", "120"}
		if e.status != "" {
			args = append(args, "-u", e.status)
		}
		if _, stderr, err := ns.Run(ctx, "conntrack", args...); err != nil {
			t.Fatalf("conntrack %v: %v: %s", args, err, stderr)
		}
	}
	var table *conntrack.Kernel
	must(ns.Do(func() error { table, err = conntrack.OpenKernel(); return err }))
	defer table.Close()
	var saw []conntrack.Entry
	seen, _, err := table.Sweep(iptables.IPv4, []uint8{conntrack.ProtoTCP}, func(e *conntrack.Entry) bool {
		saw = append(saw, *e)
		return false
	})
	must(err)
	if seen != 1 || len(saw) != 1 || saw[0].OrigSrc.Port() != 1001 || saw[0].Replied {
		t.Fatalf("a TCP sweep was passed %v; want only the unreplied entry from port 1001", saw)
	}
}

// A TCP Service whose rules another program flushed: a client's SYN sent
// meanwhile goes out untranslated and leaves a conntrack entry, UNREPLIED
// in SYN_SENT for two minutes, that every retransmission and any later
// connection from the same source port matches, skipping the nat table even
// after the rules are back. The sync that finds the rules flushed rewrites
// them and deletes that entry, so the same source port connects again at
// once (found by the fault drills: requests to a steady Service failed a
// minute after another drill flushed the rules, when a new connection
// reused a source port).
func TestATCPConnectionBegunWhileTheRulesWereFlushedWorksOnceTheyAreBack(t *testing.T) {
	top := setUp(t)
	table := nodeTable(t, top.node)
	web, webSlice := webService("web", "10.96.0.80")
	p, _ := newProxier(t, table, web, webSlice)
	syncInNode(t, top, p)
	const srcPort = 45080
	if err := connectFrom(top, srcPort+1, "10.96.0.80:80"); err != nil {
		t.Fatalf("before the flush: %v", err)
	}

	if _, stderr, err := top.node.Run(context.Background(), "iptables", "-t", "nat", "-F"); err != nil {
		t.Fatalf("iptables -t nat -F: %v: %s", err, stderr)
	}
	if err := connectFrom(top, srcPort, "10.96.0.80:80"); err == nil {
		t.Fatal("connected while the nat table was flushed")
	}
	if n := untranslatedFrom(t, top, table, srcPort); n != 1 {
		out, _, _ := top.node.Run(context.Background(), "conntrack", "-L")
		t.Fatalf("%d untranslated entries from the client's port after the SYN sent while flushed, want 1\n%s", n, out)
	}

	res := syncInNode(t, top, p)
	if len(res.Results) != 1 || res.Results[0].Reason != dataplane.ReasonCanary {
		t.Fatalf("the sync after the flush: %+v; want a full apply for the lost canary", res.Results)
	}
	if n := untranslatedFrom(t, top, table, srcPort); n != 0 {
		t.Fatalf("%d untranslated entries left after the sync that rewrote the rules (conntrack: %+v)", n, res.Conntrack)
	}
	if err := connectFrom(top, srcPort, "10.96.0.80:80"); err != nil {
		t.Fatalf("from the same source port after the rules were back: %v (conntrack: %+v)", err, res.Conntrack)
	}
}

// A client connects to a Service the moment it is created, before the
// node's rules have it (a deployment script, a test): its SYN leaves an
// untranslated entry, and without help its retransmissions, and any later
// connection from that port, would match it for two minutes. The sync that
// programs the Service deletes it, so the same source port connects at once.
func TestATCPConnectionToAServiceBeforeItsRulesWorksOnceTheyAreIn(t *testing.T) {
	top := setUp(t)
	table := nodeTable(t, top.node)
	web, webSlice := webService("web", "10.96.0.80")
	p, tracker := newProxier(t, table, web, webSlice)
	syncInNode(t, top, p)

	const srcPort = 45090
	if err := connectFrom(top, srcPort, "10.96.0.81:80"); err == nil {
		t.Fatal("connected to a Service the rules do not have yet")
	}
	if n := untranslatedFrom(t, top, table, srcPort); n != 1 {
		t.Fatalf("%d untranslated entries from the client's port after the SYN to the new Service, want 1", n)
	}
	svc, slice := webService("api", "10.96.0.81")
	tracker.OnServiceAdd(svc)
	tracker.OnEndpointSliceAdd(slice)
	res := syncInNode(t, top, p)
	if n := untranslatedFrom(t, top, table, srcPort); n != 0 {
		t.Fatalf("%d untranslated entries left after the sync that programmed the Service (conntrack: %+v)", n, res.Conntrack)
	}
	if err := connectFrom(top, srcPort, "10.96.0.81:80"); err != nil {
		t.Fatalf("from the same source port once the Service's rules were in: %v (conntrack: %+v)", err, res.Conntrack)
	}
}
