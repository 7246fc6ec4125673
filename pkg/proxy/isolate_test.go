package proxy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/dataplane/dataplanetest"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// probe is a pod's connection to a ClusterIP on port 80.
func probe(ip string) rules.Packet {
	return rules.Packet{Src: aPod, Dst: netip.MustParseAddr(ip), Proto: "tcp", DPort: 80}
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
		name  string
		brk   dataplanetest.Break
		least int // scratch checks the search needs at least
	}{
		{"the kernel names the refused line", dataplanetest.DropProtocol, 3},
		{"the kernel names no line: bisection", dataplanetest.JumpNowhere, 5},
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
			if checks < how.least || checks > maxChecks {
				t.Errorf("%d scratch checks, want between %d and %d", checks, how.least, maxChecks)
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
