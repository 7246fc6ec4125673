package proxy

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/dataplane/dataplanetest"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// probe is a pod's connection to a ClusterIP on port 80.
func probe(ip string) iptables.Packet {
	return iptables.Packet{Src: aPod, Dst: netip.MustParseAddr(ip), Proto: "tcp", DPort: 80}
}

func served(ep string) string { return "[ACCEPT " + ep + ":8080 (p=1.000)]" }

func svcName(name string) endpoints.ServicePortName {
	return endpoints.ServicePortName{Namespace: "default", Name: name}
}

// breakingLab is a lab whose dataplane spoils the rules of whichever
// Service the returned Breaking is told to break, holding one ClusterIP
// Service per name (addresses from 10.0.0.10 on, one endpoint on node2).
func breakingLab(t *testing.T, how dataplanetest.Break, names ...string) (*lab, *dataplanetest.Breaking) {
	t.Helper()
	var brk *dataplanetest.Breaking
	l := newLabWith(t, Options{}, func(r dataplane.Runner) dataplane.Runner {
		brk = dataplanetest.NewBreaking(r, how)
		return brk
	})
	for i, name := range names {
		l.tracker.OnServiceAdd(service(name, fmt.Sprintf("10.0.%d.%d", (10+i)/256, (10+i)%256), v1.ProtocolTCP))
		l.tracker.OnEndpointSliceAdd(slice(name, "10.244.2.6", "node2", v1.ProtocolTCP))
	}
	return l, brk
}

// One Service the kernel refuses changes nothing for the others: found by
// the line the kernel names (DropProtocol) or by bisection when it names
// none (JumpNowhere), it keeps its last accepted rules, and it is reported
// once, while every other change of the same sync is programmed.
func TestARefusedServiceKeepsItsOldRulesAndStopsNoOther(t *testing.T) {
	for _, how := range []struct {
		name     string
		brk      dataplanetest.Break
		min, max int // scratch checks the search needs
	}{
		// All changed at once, nothing but base, bad alone, all but bad.
		{"the kernel names the refused line", dataplanetest.DropProtocol, 4, 4},
		{"the kernel names no line: bisection", dataplanetest.JumpNowhere, 5, 12},
	} {
		t.Run(how.name, func(t *testing.T) {
			l, brk := breakingLab(t, how.brk, "a", "b", "bad", "c", "d", "e")
			if res := l.proxier.Sync(false); res.Err != nil || len(res.Refusals) != 0 {
				t.Fatalf("first sync: %v %v", res.Err, res.Refusals)
			}

			// From now on the kernel refuses bad's rules with its new
			// endpoint. In one sync: bad's endpoint moves, a's too, c goes
			// away, f is new.
			brk.Break("default/bad", "10.244.1.5")
			l.tracker.OnEndpointSliceUpdate(nil, slice("bad", "10.244.1.5", "node1", v1.ProtocolTCP))
			l.tracker.OnEndpointSliceUpdate(nil, slice("a", "10.244.1.5", "node1", v1.ProtocolTCP))
			l.tracker.OnServiceDelete(service("c", "10.0.0.13", v1.ProtocolTCP))
			l.tracker.OnServiceAdd(service("f", "10.0.0.20", v1.ProtocolTCP))
			l.tracker.OnEndpointSliceAdd(slice("f", "10.244.1.5", "node1", v1.ProtocolTCP))
			before := len(l.fake.Calls())
			res := l.proxier.Sync(false)
			if res.Err != nil {
				t.Fatalf("the sync should succeed for every Service but the refused one: %v", res.Err)
			}
			if len(res.Refusals) != 1 || res.Refusals[0].Service != svcName("bad") || !res.Refusals[0].New {
				t.Fatalf("want bad reported as newly refused, got %+v", res.Refusals)
			}
			if how.brk == dataplanetest.DropProtocol && !strings.Contains(res.Refusals[0].Err, "Need TCP, UDP, SCTP or DCCP with port specification") {
				t.Errorf("the refusal should carry the kernel's words: %q", res.Refusals[0].Err)
			}
			checks := strings.Count(strings.Join(l.fake.Calls()[before:], "\n"), "check IPv4")
			if checks < how.min || checks > how.max {
				t.Errorf("%d scratch checks, want between %d and %d", checks, how.min, how.max)
			}
			for _, tc := range []struct{ what, ip, want string }{
				{"a's new endpoint", "10.0.0.10", served("10.244.1.5")},
				{"b unchanged", "10.0.0.11", served("10.244.2.6")},
				{"bad keeps its last accepted endpoint", "10.0.0.12", served("10.244.2.6")},
				{"c is gone", "10.0.0.13", "[ACCEPT 10.0.0.13:80 (p=1.000)]"},
				{"f is new", "10.0.0.20", served("10.244.1.5")},
			} {
				if got := l.trace(t, probe(tc.ip)); got != tc.want {
					t.Errorf("%s: got %s, want %s", tc.what, got, tc.want)
				}
			}
			if _, ok := res.Snapshot.Endpoints[svcName("bad")]; !ok || res.Snapshot.Endpoints[svcName("bad")][0].IP != netip.MustParseAddr("10.244.2.6") {
				t.Errorf("the sync's snapshot (what health checks read) should hold bad's accepted endpoints: %v", res.Snapshot.Endpoints[svcName("bad")])
			}

			// Unchanged, bad is held back: no refused restore, still reported,
			// not new. Another Service's change goes through.
			l.tracker.OnEndpointSliceUpdate(nil, slice("b", "10.244.1.5", "node1", v1.ProtocolTCP))
			res = l.proxier.Sync(false)
			if res.Err != nil || res.FailedApplies != 0 || len(res.Refusals) != 1 || res.Refusals[0].New {
				t.Fatalf("held back: want a clean sync still reporting bad (not new), got err=%v failed=%d %+v", res.Err, res.FailedApplies, res.Refusals)
			}
			if got := l.trace(t, probe("10.0.0.11")); got != served("10.244.1.5") {
				t.Errorf("b's change should be programmed: %s", got)
			}

			// Fixed (say, miniproxy upgraded) and changed: programmed.
			brk.Break("")
			l.tracker.OnEndpointSliceUpdate(nil, slice("bad", "10.244.1.6", "node1", v1.ProtocolTCP))
			res = l.proxier.Sync(false)
			if res.Err != nil || len(res.Refusals) != 0 {
				t.Fatalf("after the fix: err=%v refusals=%+v", res.Err, res.Refusals)
			}
			if got := l.trace(t, probe("10.0.0.12")); got != served("10.244.1.6") {
				t.Errorf("bad's new endpoint should be programmed: %s", got)
			}
		})
	}
}

// Several refused Services among many, at start-up: every other Service
// is programmed, each refused one is reported.
func TestRefusedServicesAmongManyAtStartUp(t *testing.T) {
	var names []string
	for i := 0; i < 200; i++ {
		names = append(names, fmt.Sprintf("svc-%03d", i))
	}
	l, brk := breakingLab(t, dataplanetest.JumpNowhere, names...)
	brk.Break("default/svc-077")
	res := l.proxier.Sync(false)
	if res.Err != nil || len(res.Refusals) != 1 || res.Refusals[0].Service != svcName("svc-077") {
		t.Fatalf("want svc-077 refused and everything else programmed: err=%v refusals=%+v", res.Err, res.Refusals)
	}
	if len(res.Snapshot.Services) != 199 {
		t.Errorf("the kernel should hold 199 Services, holds %d", len(res.Snapshot.Services))
	}
	for _, ip := range []string{"10.0.0.10", "10.0.0.86", "10.0.0.88", "10.0.0.209"} {
		if got := l.trace(t, probe(ip)); got != served("10.244.2.6") {
			t.Errorf("%s should be served: %s", ip, got)
		}
	}
	if got := l.trace(t, probe("10.0.0.87")); got != "[ACCEPT 10.0.0.87:80 (p=1.000)]" {
		t.Errorf("the refused Service never had rules, so it has none: %s", got)
	}
}

// When the kernel refuses a Service's earlier rules too, the Service is
// left without rules, and still no other Service suffers.
func TestARefusedServiceWhoseOldRulesAreRefusedTooIsLeftOut(t *testing.T) {
	l, brk := breakingLab(t, dataplanetest.DropProtocol, "a", "bad")
	if res := l.proxier.Sync(false); res.Err != nil {
		t.Fatal(res.Err)
	}
	brk.Break("default/bad")
	l.tracker.OnEndpointSliceUpdate(nil, slice("bad", "10.244.1.5", "node1", v1.ProtocolTCP))
	l.tracker.OnEndpointSliceUpdate(nil, slice("a", "10.244.1.5", "node1", v1.ProtocolTCP))
	res := l.proxier.Sync(false)
	if res.Err != nil || len(res.Refusals) != 1 {
		t.Fatalf("want bad refused, the rest programmed: err=%v refusals=%+v", res.Err, res.Refusals)
	}
	if got := l.trace(t, probe("10.0.0.10")); got != served("10.244.1.5") {
		t.Errorf("a's change should be programmed: %s", got)
	}
	if got := l.trace(t, probe("10.0.0.11")); got != "[ACCEPT 10.0.0.11:80 (p=1.000)]" {
		t.Errorf("bad has no acceptable rules left, so none: %s", got)
	}
}

// A restore that fails for every input (the tool is broken, the lock is
// held) is no Service's fault: the sync fails as a whole and nobody is
// blamed.
func TestAFailureOfTheToolBlamesNoService(t *testing.T) {
	l := newLab(t, Options{})
	l.tracker.OnServiceAdd(service("web", "10.0.0.10", v1.ProtocolTCP))
	l.tracker.OnEndpointSliceAdd(slice("web", "10.244.2.6", "node2", v1.ProtocolTCP))
	l.fake.FailNext(1)
	res := l.proxier.Sync(false)
	if res.Err == nil || len(res.Refusals) != 0 {
		t.Fatalf("want a failed sync blaming nobody, got err=%v refusals=%+v", res.Err, res.Refusals)
	}
	if !strings.Contains(res.Err.Error(), "pass in a scratch namespace") {
		t.Errorf("the error should say the rules themselves are fine: %v", res.Err)
	}
}

// failingChecks is a runner whose scratch checks cannot be made at all
// (say, the node forbids creating network namespaces).
type failingChecks struct{ dataplane.Runner }

func (failingChecks) Check(iptables.Family, []byte) error {
	return errors.New("create network namespace: operation not permitted")
}

// When the kernel refuses an apply but cannot be asked why, nobody is
// blamed: the sync fails as a whole and says so.
func TestChecksThatCannotBeMadeBlameNoService(t *testing.T) {
	var brk *dataplanetest.Breaking
	l := newLabWith(t, Options{}, func(r dataplane.Runner) dataplane.Runner {
		brk = dataplanetest.NewBreaking(failingChecks{r}, dataplanetest.DropProtocol)
		return brk
	})
	l.tracker.OnServiceAdd(service("bad", "10.0.0.10", v1.ProtocolTCP))
	l.tracker.OnEndpointSliceAdd(slice("bad", "10.244.2.6", "node2", v1.ProtocolTCP))
	brk.Break("default/bad")
	res := l.proxier.Sync(false)
	if res.Err == nil || len(res.Refusals) != 0 || !strings.Contains(res.Err.Error(), "could not be asked") {
		t.Fatalf("want a failed sync that blames nobody and says why: err=%v refusals=%+v", res.Err, res.Refusals)
	}
}

// A refused Service tried again by the hourly full sync, and refused
// again, is not reported as new, even when other Services moved its
// rules to other lines of the input.
func TestARefusalFoundAgainByAFullSyncIsNotNew(t *testing.T) {
	l, brk := breakingLab(t, dataplanetest.DropProtocol, "m", "bad")
	if res := l.proxier.Sync(false); res.Err != nil {
		t.Fatal(res.Err)
	}
	brk.Break("default/bad", "10.244.1.5")
	l.tracker.OnEndpointSliceUpdate(nil, slice("bad", "10.244.1.5", "node1", v1.ProtocolTCP))
	if res := l.proxier.Sync(false); len(res.Refusals) != 1 || !res.Refusals[0].New {
		t.Fatalf("want bad newly refused: %+v", res.Refusals)
	}
	for i, name := range []string{"a", "b", "c"} { // chains that sort before bad's
		l.tracker.OnServiceAdd(service(name, fmt.Sprintf("10.0.0.%d", 2+i), v1.ProtocolTCP))
		l.tracker.OnEndpointSliceAdd(slice(name, "10.244.2.6", "node2", v1.ProtocolTCP))
	}
	if res := l.proxier.Sync(false); res.Err != nil || res.FailedApplies != 0 {
		t.Fatalf("bad is held back, the others go in: err=%v failed=%d", res.Err, res.FailedApplies)
	}
	res := l.proxier.Sync(true)
	if res.Err != nil || len(res.Refusals) != 1 || res.Refusals[0].New || res.FailedApplies == 0 {
		t.Fatalf("a full sync should try bad again, find it refused again, and not call it new: err=%v failed=%d %+v", res.Err, res.FailedApplies, res.Refusals)
	}
	if got := l.trace(t, probe("10.0.0.3")); got != served("10.244.2.6") {
		t.Errorf("the Services added meanwhile should be programmed: %s", got)
	}
}

// More refused Services than one sync's checks can find (each only by
// bisection): every sync makes progress with what it could judge, and
// within a few syncs every other Service is programmed and each refused
// one reported.
func TestMoreRefusalsThanOneSyncCanFind(t *testing.T) {
	var names, bad []string
	for i := 0; i < 120; i++ {
		names = append(names, fmt.Sprintf("svc-%03d", i))
		if i%5 == 0 {
			bad = append(bad, "default/"+names[i])
		}
	}
	l, brk := breakingLab(t, dataplanetest.JumpNowhere, names...)
	brk.BreakEach(bad...)
	var res SyncResult
	syncs := 0
	for syncs = 1; syncs <= 10; syncs++ {
		res = l.proxier.Sync(false)
		if syncs == 1 && (res.Err == nil || !strings.Contains(res.Err.Error(), "could not tell which")) {
			t.Errorf("the first sync should run out of checks and say so: %v", res.Err)
		}
		if res.Err == nil {
			break
		}
	}
	if res.Err != nil || len(res.Refusals) != len(bad) {
		t.Fatalf("after %d syncs: err=%v, %d refused, want %d", syncs, res.Err, len(res.Refusals), len(bad))
	}
	t.Logf("%d refused Services among %d found in %d syncs", len(bad), len(names), syncs)
	if len(res.Snapshot.Services) != len(names)-len(bad) {
		t.Errorf("the kernel should hold %d Services, holds %d", len(names)-len(bad), len(res.Snapshot.Services))
	}
	if got := l.trace(t, probe("10.0.0.11")); got != served("10.244.2.6") {
		t.Errorf("svc-001 should be served: %s", got)
	}
}

// On a dual-stack node a Service refused in one family keeps its last
// accepted rules in both, so that both families always agree.
func TestARefusalInOneFamilyHoldsTheServiceBackInBoth(t *testing.T) {
	fake := dataplane.NewFake()
	brk := dataplanetest.NewBreaking(fake, dataplanetest.DropProtocol)
	planes := map[iptables.Family]Applier{}
	for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		dp, err := dataplane.New(brk, fam, rules.Prefix)
		if err != nil {
			t.Fatal(err)
		}
		planes[fam] = dp
	}
	tracker := endpoints.NewTracker("node1", quietLog(), nil)
	addrs := func(f iptables.Family) ([]netip.Addr, error) {
		if f == iptables.IPv6 {
			return []netip.Addr{netip.MustParseAddr("fd00::3")}, nil
		}
		return []netip.Addr{nodeIP}, nil
	}
	p := New(Options{SyncPeriod: time.Minute, DetectLocal: rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:244::/32")}}},
		tracker, planes, addrs, quietLog())
	for i, name := range []string{"a", "bad"} {
		svc := service(name, fmt.Sprintf("10.0.0.%d", 10+i), v1.ProtocolTCP)
		svc.Spec.ClusterIPs = append(svc.Spec.ClusterIPs, fmt.Sprintf("fd00:96::%d", 10+i))
		svc.Spec.IPFamilies = []v1.IPFamily{v1.IPv4Protocol, v1.IPv6Protocol}
		tracker.OnServiceAdd(svc)
		tracker.OnEndpointSliceAdd(slice(name, "10.244.2.6", "node2", v1.ProtocolTCP))
		v6 := slice(name, "fd00:244:2::6", "node2", v1.ProtocolTCP)
		v6.Name, v6.AddressType = name+"-v6", discoveryv1.AddressTypeIPv6
		tracker.OnEndpointSliceAdd(v6)
	}
	if res := p.Sync(false); res.Err != nil {
		t.Fatal(res.Err)
	}
	// Only bad's new IPv6 rules are refused; both of its families move.
	brk.Break("default/bad", "fd00:244:1::5")
	for _, name := range []string{"a", "bad"} {
		tracker.OnEndpointSliceUpdate(nil, slice(name, "10.244.1.5", "node1", v1.ProtocolTCP))
		v6 := slice(name, "fd00:244:1::5", "node1", v1.ProtocolTCP)
		v6.Name, v6.AddressType = name+"-v6", discoveryv1.AddressTypeIPv6
		tracker.OnEndpointSliceUpdate(nil, v6)
	}
	res := p.Sync(false)
	if res.Err != nil || len(res.Refusals) != 1 || res.Refusals[0].Service != svcName("bad") {
		t.Fatalf("want bad refused, a programmed: err=%v %+v", res.Err, res.Refusals)
	}
	trace := func(fam iptables.Family, dst string) string {
		tr := &iptables.Tracer{State: fake.State(fam), LocalAddrs: []netip.Addr{nodeIP}}
		src := aPod
		if fam == iptables.IPv6 {
			src = netip.MustParseAddr("fd00:244:1::9")
		}
		outs, err := tr.Trace(iptables.Packet{Src: src, Dst: netip.MustParseAddr(dst), Proto: "tcp", DPort: 80})
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprint(outs)
	}
	for _, tc := range []struct {
		fam       iptables.Family
		dst, want string
	}{
		{iptables.IPv4, "10.0.0.10", served("10.244.1.5")},
		{iptables.IPv6, "fd00:96::10", "[ACCEPT [fd00:244:1::5]:8080 (p=1.000)]"},
		{iptables.IPv4, "10.0.0.11", served("10.244.2.6")},
		{iptables.IPv6, "fd00:96::11", "[ACCEPT [fd00:244:2::6]:8080 (p=1.000)]"},
	} {
		if got := trace(tc.fam, tc.dst); got != tc.want {
			t.Errorf("%s: got %s, want %s", tc.dst, got, tc.want)
		}
	}
}
