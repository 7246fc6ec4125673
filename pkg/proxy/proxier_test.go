package proxy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/explain"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

var (
	nodeIP = netip.MustParseAddr("10.240.0.3")
	client = netip.MustParseAddr("198.51.100.79")
	aPod   = netip.MustParseAddr("10.244.1.9")
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func service(name, ip string, proto v1.Protocol) *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: v1.ServiceSpec{
			Type:       v1.ServiceTypeClusterIP,
			ClusterIP:  ip,
			ClusterIPs: []string{ip},
			Ports:      []v1.ServicePort{{Port: 80, Protocol: proto, TargetPort: intstrFrom(8080)}},
		},
	}
}

func slice(svc, ip, node string, proto v1.Protocol) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: svc + "-abc", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{
			Addresses:  []string{ip},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
			NodeName:   ptr.To(node),
		}},
		Ports: []discoveryv1.EndpointPort{{Port: ptr.To[int32](8080), Protocol: ptr.To(proto)}},
	}
}

type lab struct {
	fake    *dataplane.Fake
	tracker *endpoints.Tracker
	proxier *Proxier
}

func newLab(t *testing.T, opts Options) *lab {
	t.Helper()
	return newLabWith(t, opts, nil)
}

// newLabWith is newLab with the dataplane's runner wrapped (nil: not).
func newLabWith(t *testing.T, opts Options, wrap func(dataplane.Runner) dataplane.Runner) *lab {
	t.Helper()
	fake := dataplane.NewFake()
	var runner dataplane.Runner = fake
	if wrap != nil {
		runner = wrap(fake)
	}
	dp, err := dataplane.New(runner, iptables.IPv4, rules.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	tracker := endpoints.NewTracker("node1", quietLog(), nil)
	if opts.SyncPeriod == 0 {
		opts.SyncPeriod = time.Minute
	}
	opts.DetectLocal = rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}}
	addrs := func(f iptables.Family) ([]netip.Addr, error) {
		if f == iptables.IPv4 {
			return []netip.Addr{nodeIP, netip.MustParseAddr("127.0.0.1")}, nil
		}
		return nil, nil
	}
	p := New(opts, tracker, map[iptables.Family]Applier{iptables.IPv4: dp}, addrs, quietLog())
	tracker.SetOnChange(p.Changed)
	return &lab{fake: fake, tracker: tracker, proxier: p}
}

// trace follows a packet through what the fake kernel holds now.
func (l *lab) trace(t *testing.T, p iptables.Packet) string {
	t.Helper()
	tr := &iptables.Tracer{State: l.fake.State(iptables.IPv4), LocalAddrs: []netip.Addr{nodeIP}}
	outs, err := tr.Trace(p)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprint(outs)
}

func TestAFailedSyncKeepsTheOldRulesAndIsRetried(t *testing.T) {
	l := newLab(t, Options{})
	l.tracker.OnServiceAdd(service("web", "10.0.0.10", v1.ProtocolTCP))
	l.tracker.OnEndpointSliceAdd(slice("web", "10.244.2.6", "node2", v1.ProtocolTCP))
	if res := l.proxier.Sync(false); res.Err != nil {
		t.Fatalf("first sync: %v", res.Err)
	}
	pkt := iptables.Packet{Src: aPod, Dst: netip.MustParseAddr("10.0.0.10"), Proto: "tcp", DPort: 80}
	if got := l.trace(t, pkt); got != "[ACCEPT 10.244.2.6:8080 (p=1.000)]" {
		t.Fatalf("after first sync: %s", got)
	}

	// The endpoint moves, but the restore fails.
	l.tracker.OnEndpointSliceUpdate(nil, slice("web", "10.244.1.5", "node1", v1.ProtocolTCP))
	l.fake.FailNext(1)
	res := l.proxier.Sync(false)
	if res.Err == nil {
		t.Fatal("the sync should have failed")
	}
	if res.QueuedSince.IsZero() {
		t.Error("a failed sync should report how long its change has been waiting")
	}
	if got := l.trace(t, pkt); got != "[ACCEPT 10.244.2.6:8080 (p=1.000)]" {
		t.Fatalf("after a failed sync the old rules should be intact, got %s", got)
	}

	// The retry carries no new event, yet applies the move and is full.
	res2 := l.proxier.Sync(false)
	if res2.Err != nil {
		t.Fatalf("retry: %v", res2.Err)
	}
	if !res2.Results[0].Full {
		t.Error("the sync after a failure should rewrite every chain")
	}
	if !res2.QueuedSince.Equal(res.QueuedSince) {
		t.Errorf("the retry still carries the change queued at %s, got %s", res.QueuedSince, res2.QueuedSince)
	}
	if got := l.trace(t, pkt); got != "[ACCEPT 10.244.1.5:8080 (p=1.000)]" {
		t.Fatalf("after the retry: %s", got)
	}
}

func TestAServiceOfAProtocolTheNodeCannotDoIsSkippedAlone(t *testing.T) {
	l := newLab(t, Options{UnsupportedProtocols: map[endpoints.Protocol]bool{endpoints.SCTP: true}})
	l.tracker.OnServiceAdd(service("web", "10.0.0.10", v1.ProtocolTCP))
	l.tracker.OnEndpointSliceAdd(slice("web", "10.244.2.6", "node2", v1.ProtocolTCP))
	l.tracker.OnServiceAdd(service("sig", "10.0.0.11", v1.ProtocolSCTP))
	l.tracker.OnEndpointSliceAdd(slice("sig", "10.244.2.7", "node2", v1.ProtocolSCTP))
	res := l.proxier.Sync(false)
	if res.Err != nil || res.Skipped != 1 {
		t.Fatalf("want a successful sync skipping one port, got err=%v skipped=%d", res.Err, res.Skipped)
	}
	web := iptables.Packet{Src: aPod, Dst: netip.MustParseAddr("10.0.0.10"), Proto: "tcp", DPort: 80}
	if got := l.trace(t, web); got != "[ACCEPT 10.244.2.6:8080 (p=1.000)]" {
		t.Errorf("the TCP Service should work: %s", got)
	}
	if strings.Contains(fmt.Sprint(l.fake.Inputs()), "sctp") {
		t.Error("no SCTP rule should have been written")
	}
}

func TestNodePortAddressesPickTheLocalAddressesInRange(t *testing.T) {
	l := newLab(t, Options{NodePortAddresses: []netip.Prefix{netip.MustParsePrefix("192.168.99.0/24")}})
	svc := service("web", "10.0.0.10", v1.ProtocolTCP)
	svc.Spec.Type = v1.ServiceTypeNodePort
	svc.Spec.Ports[0].NodePort = 30080
	l.tracker.OnServiceAdd(svc)
	l.tracker.OnEndpointSliceAdd(slice("web", "10.244.2.6", "node2", v1.ProtocolTCP))
	if res := l.proxier.Sync(false); res.Err != nil {
		t.Fatal(res.Err)
	}
	pkt := iptables.Packet{Src: client, Dst: nodeIP, Proto: "tcp", DPort: 30080}
	if got := l.trace(t, pkt); got != "[ACCEPT 10.240.0.3:30080 (p=1.000)]" {
		t.Errorf("the node's address is outside --nodeport-addresses, so no NodePort: %s", got)
	}
}

func TestRunSyncsEachChangeWithinAFewSeconds(t *testing.T) {
	l := newLab(t, Options{MinSyncPeriod: 100 * time.Millisecond})
	synced := make(chan SyncResult, 16)
	l.proxier.OnSync(func(r SyncResult) { synced <- r })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go l.proxier.Run(ctx)
	<-synced // the initial sync
	l.tracker.OnServiceAdd(service("web", "10.0.0.10", v1.ProtocolTCP))
	l.tracker.OnEndpointSliceAdd(slice("web", "10.244.2.6", "node2", v1.ProtocolTCP))
	deadline := time.After(10 * time.Second)
	for {
		select {
		case r := <-synced:
			if _, ok := r.Snapshot.Services[endpoints.ServicePortName{Namespace: "default", Name: "web"}]; ok && len(r.Snapshot.Endpoints[endpoints.ServicePortName{Namespace: "default", Name: "web"}]) == 1 {
				if r.Err != nil {
					t.Fatal(r.Err)
				}
				return
			}
		case <-deadline:
			t.Fatal("the change was not synced within 10s")
		}
	}
}

// New leaves the tracker's change callback to whoever wires the daemon;
// Changed tells OnChange's functions and asks for a sync.
func TestChangesReachTheLoopOnlyThroughChanged(t *testing.T) {
	tracker := endpoints.NewTracker("node1", quietLog(), nil)
	var wired, heard int
	tracker.SetOnChange(func() { wired++ })
	p := New(Options{SyncPeriod: time.Minute}, tracker, map[iptables.Family]Applier{}, nil, quietLog())
	p.OnChange(func() { heard++ })
	tracker.OnServiceAdd(service("web", "10.0.0.10", v1.ProtocolTCP))
	if wired != 1 || heard != 0 || len(p.kick) != 0 {
		t.Fatalf("New took the tracker's callback: wired %d, heard %d, kicks %d", wired, heard, len(p.kick))
	}
	p.Changed()
	p.Changed()
	if heard != 2 || len(p.kick) != 1 {
		t.Errorf("Changed twice: heard %d, kicks pending %d; want 2 and 1", heard, len(p.kick))
	}
}

func intstrFrom(i int) intstr.IntOrString { return intstr.FromInt32(int32(i)) }

// fakeSysctl records what the proxier asks of the kernel's parameters.
type fakeSysctl struct {
	values map[string]int
	calls  int
	err    error
}

func (f *fakeSysctl) Ensure(name string, value int) (bool, error) {
	f.calls++
	if f.err != nil {
		return false, f.err
	}
	changed := f.values[name] != value
	f.values[name] = value
	return changed, nil
}

func TestLocalhostNodePortsSetRouteLocalnetOnceAndServeLoopback(t *testing.T) {
	loopback := iptables.Packet{Src: netip.MustParseAddr("127.0.0.1"), Dst: netip.MustParseAddr("127.0.0.1"), Proto: "tcp", DPort: 30080, FromNode: true}
	served, untouched := "[ACCEPT 10.244.2.6:8080 masqueraded (p=1.000)]", "[ACCEPT 127.0.0.1:30080 (p=1.000)]"
	tests := []struct {
		name      string
		opts      Options
		sysctlErr error
		noSysctl  bool
		wantErr   bool
		wantCalls int
		want      string
	}{
		{name: "on: route_localnet set once, localhost served", opts: Options{LocalhostNodePorts: true}, wantCalls: 1, want: served},
		{name: "on, nodeport-addresses covering 127.0.0.1", opts: Options{LocalhostNodePorts: true, NodePortAddresses: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}}, wantCalls: 1, want: served},
		{name: "on, nodeport-addresses without loopback: the sysctl left alone", opts: Options{LocalhostNodePorts: true, NodePortAddresses: []netip.Prefix{netip.MustParsePrefix("10.240.0.0/16")}}, want: untouched},
		{name: "off: the sysctl left alone, localhost untouched", opts: Options{}, want: untouched},
		{name: "on, the sysctl cannot be set: the sync fails", opts: Options{LocalhostNodePorts: true}, sysctlErr: fmt.Errorf("read-only file system"), wantErr: true, wantCalls: 2},
		{name: "on, no Sysctl given: the sync fails", opts: Options{LocalhostNodePorts: true}, noSysctl: true, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sysctl := &fakeSysctl{values: map[string]int{RouteLocalnet: 0}, err: tc.sysctlErr}
			opts := tc.opts
			if !tc.noSysctl {
				opts.Sysctl = sysctl
			}
			l := newLab(t, opts)
			svc := service("web", "10.0.0.10", v1.ProtocolTCP)
			svc.Spec.Type = v1.ServiceTypeNodePort
			svc.Spec.Ports[0].NodePort = 30080
			l.tracker.OnServiceAdd(svc)
			l.tracker.OnEndpointSliceAdd(slice("web", "10.244.2.6", "node2", v1.ProtocolTCP))
			for range 2 {
				if res := l.proxier.Sync(false); (res.Err != nil) != tc.wantErr {
					t.Fatalf("sync: %v, want an error: %v", res.Err, tc.wantErr)
				}
			}
			if sysctl.calls != tc.wantCalls {
				t.Errorf("Sysctl.Ensure called %d times, want %d", sysctl.calls, tc.wantCalls)
			}
			if tc.wantCalls > 0 && !tc.wantErr && sysctl.values[RouteLocalnet] != 1 {
				t.Errorf("%s = %d, want 1", RouteLocalnet, sysctl.values[RouteLocalnet])
			}
			if tc.wantErr {
				if len(l.fake.Inputs()) != 0 {
					t.Error("no rules should be applied before the sysctl they need")
				}
				return
			}
			if got := l.trace(t, loopback); got != tc.want {
				t.Errorf("localhost to the NodePort: %s, want %s", got, tc.want)
			}
		})
	}
}

// A sync result says what the kernel holds: its snapshot and configs
// rebuild the rules exactly, so an explanation can be made from it alone.
func TestASyncResultRebuildsTheKernelsRules(t *testing.T) {
	l := newLab(t, Options{})
	l.tracker.OnServiceAdd(service("web", "10.0.0.10", v1.ProtocolTCP))
	l.tracker.OnEndpointSliceAdd(slice("web", "10.244.2.6", "node2", v1.ProtocolTCP))
	res := l.proxier.Sync(false)
	if res.Err != nil {
		t.Fatal(res.Err)
	}
	cfg, ok := res.Configs[iptables.IPv4]
	if !ok || len(res.Configs) != 1 || !slices.Contains(cfg.NodeIPs, nodeIP) {
		t.Fatalf("configs %+v: want the IPv4 one, with the node's addresses", res.Configs)
	}
	view := explain.View{Snapshot: res.Snapshot, Configs: res.Configs, LocalAddrs: []netip.Addr{nodeIP}}
	if d := explain.Drift(view, explain.Kernel{iptables.IPv4: l.fake.State(iptables.IPv4)}); len(d) > 0 {
		t.Errorf("the result's snapshot and configs build other rules than the kernel holds: %v", d)
	}
}
