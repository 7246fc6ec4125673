package endpoints

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

func TestEndpoints(t *testing.T) {
	svcName := ServicePortName{Namespace: "ns", Name: "svc"}
	// ep builds the expected endpoint for a ready, serving address on port 8080.
	ep := func(addr, node string) Endpoint {
		return Endpoint{IP: ip(addr), Port: 8080, Ready: true, Serving: true, NodeName: node, Local: node == testNode}
	}
	tests := []struct {
		name     string
		services []*v1.Service
		slices   []*discoveryv1.EndpointSlice
		// want maps service port names to their endpoints; names missing
		// from want must have no endpoints.
		want map[ServicePortName][]Endpoint
		// wantInvalid are substrings of the expected onInvalid calls.
		wantInvalid []string
	}{
		{
			name:     "a service port without endpoints has an empty list",
			services: []*v1.Service{makeService("ns", "svc")},
			want:     map[ServicePortName][]Endpoint{svcName: nil},
		},
		{
			name:     "two slices of one service are merged",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{
				makeSlice("ns", "svc-1", "svc", withEndpoints(ready("10.1.0.2", "node-b"))),
				makeSlice("ns", "svc-2", "svc", withEndpoints(ready("10.1.0.1", testNode))),
			},
			want: map[ServicePortName][]Endpoint{svcName: {ep("10.1.0.1", testNode), ep("10.1.0.2", "node-b")}},
		},
		{
			name:     "endpoints are sorted by IP then port, IPv4 first",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{
				makeSlice("ns", "svc-v6", "svc", withEndpoints(ready("fd00::2", "n")), func(s *discoveryv1.EndpointSlice) {
					s.AddressType = discoveryv1.AddressTypeIPv6
				}),
				makeSlice("ns", "svc-b", "svc", withEndpoints(ready("10.1.0.10", "n"), ready("10.1.0.9", "n")),
					withSlicePorts(slicePortOf("", v1.ProtocolTCP, 8081))),
				makeSlice("ns", "svc-a", "svc", withEndpoints(ready("10.1.0.10", "n"))),
			},
			want: map[ServicePortName][]Endpoint{svcName: {
				{IP: ip("10.1.0.9"), Port: 8081, Ready: true, Serving: true, NodeName: "n"},
				{IP: ip("10.1.0.10"), Port: 8080, Ready: true, Serving: true, NodeName: "n"},
				{IP: ip("10.1.0.10"), Port: 8081, Ready: true, Serving: true, NodeName: "n"},
				{IP: ip("fd00::2"), Port: 8080, Ready: true, Serving: true, NodeName: "n"},
			}},
		},
		{
			name:     "nil conditions mean ready and serving but not terminating",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(discoveryv1.Endpoint{
				Addresses: []string{"10.1.0.1"},
			}))},
			want: map[ServicePortName][]Endpoint{svcName: {{IP: ip("10.1.0.1"), Port: 8080, Ready: true, Serving: true}}},
		},
		{
			name:     "a terminating but serving endpoint keeps serving=true",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(discoveryv1.Endpoint{
				Addresses:  []string{"10.1.0.1"},
				Conditions: discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)},
			}))},
			want: map[ServicePortName][]Endpoint{svcName: {{IP: ip("10.1.0.1"), Port: 8080, Serving: true, Terminating: true}}},
		},
		{
			name:     "a terminating endpoint that no longer serves is listed as such",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(discoveryv1.Endpoint{
				Addresses:  []string{"10.1.0.1"},
				Conditions: discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(false), Terminating: ptr(true)},
			}))},
			want: map[ServicePortName][]Endpoint{svcName: {{IP: ip("10.1.0.1"), Port: 8080, Terminating: true}}},
		},
		{
			name:     "a not-ready endpoint is listed with ready=false",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(discoveryv1.Endpoint{
				Addresses:  []string{"10.1.0.1"},
				Conditions: discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(false)},
			}))},
			want: map[ServicePortName][]Endpoint{svcName: {{IP: ip("10.1.0.1"), Port: 8080}}},
		},
		{
			name:     "only an endpoint whose node is ours is local",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(
				ready("10.1.0.1", testNode),
				ready("10.1.0.2", "node-b"),
				discoveryv1.Endpoint{Addresses: []string{"10.1.0.3"}},
			))},
			want: map[ServicePortName][]Endpoint{svcName: {
				ep("10.1.0.1", testNode), ep("10.1.0.2", "node-b"),
				{IP: ip("10.1.0.3"), Port: 8080, Ready: true, Serving: true},
			}},
		},
		{
			name:     "zone hints are copied, sorted and deduplicated",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(discoveryv1.Endpoint{
				Addresses: []string{"10.1.0.1"},
				Hints:     &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: "zone-b"}, {Name: "zone-a"}, {Name: "zone-b"}}},
			}))},
			want: map[ServicePortName][]Endpoint{svcName: {{
				IP: ip("10.1.0.1"), Port: 8080, Ready: true, Serving: true, ZoneHints: []string{"zone-a", "zone-b"},
			}}},
		},
		{
			name:     "the endpoint's zone is kept, for explanations",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(discoveryv1.Endpoint{
				Addresses: []string{"10.1.0.1"},
				Zone:      ptr("zone-c"),
			}))},
			want: map[ServicePortName][]Endpoint{svcName: {{
				IP: ip("10.1.0.1"), Port: 8080, Ready: true, Serving: true, Zone: "zone-c",
			}}},
		},
		{
			name:     "node hints (PreferSameNode) are copied, sorted and deduplicated",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(discoveryv1.Endpoint{
				Addresses: []string{"10.1.0.1"},
				Hints: &discoveryv1.EndpointHints{
					ForZones: []discoveryv1.ForZone{{Name: "zone-a"}},
					ForNodes: []discoveryv1.ForNode{{Name: "node-b"}, {Name: "node-a"}, {Name: "node-b"}},
				},
			}))},
			want: map[ServicePortName][]Endpoint{svcName: {{
				IP: ip("10.1.0.1"), Port: 8080, Ready: true, Serving: true, ZoneHints: []string{"zone-a"}, NodeHints: []string{"node-a", "node-b"},
			}}},
		},
		{
			name:     "the same IP and port in two slices is kept once, preferring the ready copy",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{
				makeSlice("ns", "a", "svc", withEndpoints(discoveryv1.Endpoint{
					Addresses:  []string{"10.1.0.1"},
					Conditions: discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(false)},
					NodeName:   ptr("old"),
				})),
				makeSlice("ns", "b", "svc", withEndpoints(ready("10.1.0.1", "node-b"))),
			},
			want: map[ServicePortName][]Endpoint{svcName: {ep("10.1.0.1", "node-b")}},
		},
		{
			name: "a slice port belongs to the service port with the same name and protocol",
			services: []*v1.Service{makeService("ns", "svc", withPorts(
				v1.ServicePort{Name: "dns", Protocol: v1.ProtocolUDP, Port: 53},
				v1.ServicePort{Name: "dns-tcp", Protocol: v1.ProtocolTCP, Port: 53},
			))},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc",
				withSlicePorts(
					slicePortOf("dns", v1.ProtocolUDP, 5353),
					slicePortOf("dns-tcp", v1.ProtocolTCP, 5354),
					slicePortOf("dns", v1.ProtocolTCP, 9999), // name matches, protocol does not
					slicePortOf("metrics", v1.ProtocolTCP, 9153),
				),
				withEndpoints(discoveryv1.Endpoint{Addresses: []string{"10.1.0.1"}}),
			)},
			want: map[ServicePortName][]Endpoint{
				{Namespace: "ns", Name: "svc", Port: "dns"}:     {{IP: ip("10.1.0.1"), Port: 5353, Ready: true, Serving: true}},
				{Namespace: "ns", Name: "svc", Port: "dns-tcp"}: {{IP: ip("10.1.0.1"), Port: 5354, Ready: true, Serving: true}},
			},
		},
		{
			name:     "only the first address of an endpoint is used",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(discoveryv1.Endpoint{
				Addresses: []string{"10.1.0.1", "10.1.0.2"},
			}))},
			want: map[ServicePortName][]Endpoint{svcName: {{IP: ip("10.1.0.1"), Port: 8080, Ready: true, Serving: true}}},
		},
		{
			name:     "a slice port without a number is skipped",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc",
				withSlicePorts(discoveryv1.EndpointPort{Name: ptr("")}),
				withEndpoints(ready("10.1.0.1", "n")))},
			want: map[ServicePortName][]Endpoint{svcName: nil},
		},
		{
			name:     "a slice port without name or protocol gets the API defaults",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc",
				withSlicePorts(discoveryv1.EndpointPort{Port: ptr(int32(8080))}),
				withEndpoints(ready("10.1.0.1", "n")))},
			want: map[ServicePortName][]Endpoint{svcName: {ep("10.1.0.1", "n")}},
		},
		{
			name:     "an address that does not parse skips only that endpoint",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(
				ready("10.1.0.300", "n"), ready("10.1.0.1", "n"), discoveryv1.Endpoint{},
			))},
			want: map[ServicePortName][]Endpoint{svcName: {ep("10.1.0.1", "n")}},
			wantInvalid: []string{
				`EndpointSlice ns/s: endpoint address "10.1.0.300" ignored`,
				"EndpointSlice ns/s: endpoint 2 ignored: no address",
			},
		},
		{
			name:     "a slice port out of range skips only that port",
			services: []*v1.Service{makeService("ns", "svc", withPorts(v1.ServicePort{Name: "a", Port: 1}, v1.ServicePort{Name: "b", Port: 2}))},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc",
				withSlicePorts(slicePortOf("a", v1.ProtocolTCP, 70000), slicePortOf("b", v1.ProtocolTCP, 8080)),
				withEndpoints(ready("10.1.0.1", "n")))},
			want: map[ServicePortName][]Endpoint{
				{Namespace: "ns", Name: "svc", Port: "a"}: nil,
				{Namespace: "ns", Name: "svc", Port: "b"}: {ep("10.1.0.1", "n")},
			},
			wantInvalid: []string{`EndpointSlice ns/s: port "a" ignored: port 70000 out of range`},
		},
		{
			name:     "a slice without the service-name label is ignored",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(ready("10.1.0.1", "n")),
				func(s *discoveryv1.EndpointSlice) { s.Labels = nil })},
			want: map[ServicePortName][]Endpoint{svcName: nil},
		},
		{
			name:     "a slice of addressType FQDN is ignored",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{makeSlice("ns", "s", "svc", withEndpoints(ready("10.1.0.1", "n")),
				func(s *discoveryv1.EndpointSlice) { s.AddressType = discoveryv1.AddressTypeFQDN })},
			want: map[ServicePortName][]Endpoint{svcName: nil},
		},
		{
			name:     "slices labelled headless or service-proxy-name are ignored",
			services: []*v1.Service{makeService("ns", "svc")},
			slices: []*discoveryv1.EndpointSlice{
				makeSlice("ns", "a", "svc", withEndpoints(ready("10.1.0.1", "n")),
					func(s *discoveryv1.EndpointSlice) { s.Labels[LabelHeadless] = "" }),
				makeSlice("ns", "b", "svc", withEndpoints(ready("10.1.0.2", "n")),
					func(s *discoveryv1.EndpointSlice) { s.Labels[LabelServiceProxyName] = "other" }),
			},
			want: map[ServicePortName][]Endpoint{svcName: nil},
		},
		{
			name:     "a slice of a service in another namespace does not count",
			services: []*v1.Service{makeService("ns", "svc")},
			slices:   []*discoveryv1.EndpointSlice{makeSlice("other", "s", "svc", withEndpoints(ready("10.1.0.1", "n")))},
			want:     map[ServicePortName][]Endpoint{svcName: nil},
		},
		{
			name: "endpoints of a service we do not proxy are not listed",
			services: []*v1.Service{
				makeService("ns", "headless", withClusterIPs("None")),
				makeService("ns", "theirs", withLabel(LabelServiceProxyName, "other-proxy")),
			},
			slices: []*discoveryv1.EndpointSlice{
				makeSlice("ns", "a", "headless", withEndpoints(ready("10.1.0.1", "n"))),
				makeSlice("ns", "b", "theirs", withEndpoints(ready("10.1.0.2", "n"))),
				makeSlice("ns", "c", "unknown", withEndpoints(ready("10.1.0.3", "n"))),
			},
			want: map[ServicePortName][]Endpoint{},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr, inv := newTestTracker(t)
			// Slices before Services: arrival order must not matter.
			for _, s := range tc.slices {
				tr.OnEndpointSliceAdd(s)
			}
			for _, s := range tc.services {
				tr.OnServiceAdd(s)
			}
			snap := tr.Snapshot()
			if diff := cmp.Diff(tc.want, snap.Endpoints, cmpOpts); diff != "" {
				t.Errorf("endpoints (-want +got):\n%s", diff)
			}
			for n := range snap.Endpoints {
				if snap.Services[n] == nil {
					t.Errorf("endpoints listed for %v, which is not a service port", n)
				}
			}
			got := inv.get()
			if len(got) != len(tc.wantInvalid) {
				t.Fatalf("onInvalid calls = %q, want %d matching %q", got, len(tc.wantInvalid), tc.wantInvalid)
			}
			for i, want := range tc.wantInvalid {
				if !strings.Contains(got[i], want) {
					t.Errorf("onInvalid call %d = %q, want it to contain %q", i, got[i], want)
				}
			}
		})
	}
}

func TestChangeTracking(t *testing.T) {
	svcA := makeService("ns", "a", withPorts(v1.ServicePort{Name: "http", Port: 80}, v1.ServicePort{Name: "https", Port: 443}))
	svcB := makeService("ns", "b", withClusterIPs("10.0.0.2"))
	sliceA := makeSlice("ns", "a-1", "a",
		withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080), slicePortOf("https", v1.ProtocolTCP, 8443)),
		withEndpoints(ready("10.1.0.1", "n")))
	sliceB := makeSlice("ns", "b-1", "b", withEndpoints(ready("10.1.0.9", "n")))

	// setup brings the tracker to a state with svcA, svcB and their slices,
	// and takes the first snapshot.
	setup := func(tr *Tracker) {
		tr.OnServiceAdd(svcA)
		tr.OnServiceAdd(svcB)
		tr.OnEndpointSliceAdd(sliceA)
		tr.OnEndpointSliceAdd(sliceB)
		tr.Snapshot()
	}
	tests := []struct {
		name   string
		change func(tr *Tracker)
		// wantChanged lists Changed as "ns/name:port" strings, sorted.
		wantChanged []string
		// wantOnChange says whether the change callback fires.
		wantOnChange bool
	}{
		{
			name:        "no change gives an empty Changed",
			change:      func(tr *Tracker) {},
			wantChanged: nil,
		},
		{
			name: "a resync with identical objects changes nothing and does not call back",
			change: func(tr *Tracker) {
				tr.OnServiceUpdate(svcA, svcA.DeepCopy())
				tr.OnEndpointSliceUpdate(sliceA, sliceA.DeepCopy())
				tr.OnNodeUpdate(nil, makeNode("some-other-node", "zone-x"))
			},
		},
		{
			name: "an update of fields we do not use changes nothing",
			change: func(tr *Tracker) {
				s := svcA.DeepCopy()
				s.Annotations = map[string]string{"x": "y"}
				s.ResourceVersion = "42"
				tr.OnServiceUpdate(svcA, s)
			},
		},
		{
			name: "an endpoint added changes that service's ports only",
			change: func(tr *Tracker) {
				s := sliceA.DeepCopy()
				s.Endpoints = append(s.Endpoints, ready("10.1.0.2", "n"))
				tr.OnEndpointSliceUpdate(sliceA, s)
			},
			wantChanged:  []string{"ns/a:http", "ns/a:https"},
			wantOnChange: true,
		},
		{
			name: "an endpoint turning not-ready is a change",
			change: func(tr *Tracker) {
				s := sliceB.DeepCopy()
				s.Endpoints[0].Conditions.Ready = ptr(false)
				tr.OnEndpointSliceUpdate(sliceB, s)
			},
			wantChanged:  []string{"ns/b"},
			wantOnChange: true,
		},
		{
			name:         "a deleted slice changes its service",
			change:       func(tr *Tracker) { tr.OnEndpointSliceDelete(sliceB) },
			wantChanged:  []string{"ns/b"},
			wantOnChange: true,
		},
		{
			name:         "a deleted service is changed and gone",
			change:       func(tr *Tracker) { tr.OnServiceDelete(svcA) },
			wantChanged:  []string{"ns/a:http", "ns/a:https"},
			wantOnChange: true,
		},
		{
			name: "a changed port changes only that port",
			change: func(tr *Tracker) {
				s := svcA.DeepCopy()
				s.Spec.Ports[1].Port = 8443
				tr.OnServiceUpdate(svcA, s)
			},
			wantChanged:  []string{"ns/a:https"},
			wantOnChange: true,
		},
		{
			name: "a renamed port changes the old and the new name",
			change: func(tr *Tracker) {
				s := svcA.DeepCopy()
				s.Spec.Ports[1].Name = "tls"
				tr.OnServiceUpdate(svcA, s)
			},
			wantChanged:  []string{"ns/a:https", "ns/a:tls"},
			wantOnChange: true,
		},
		{
			name: "a service becoming headless disappears",
			change: func(tr *Tracker) {
				tr.OnServiceUpdate(svcB, makeService("ns", "b", withClusterIPs("None")))
			},
			wantChanged:  []string{"ns/b"},
			wantOnChange: true,
		},
		{
			name: "a service gaining the service-proxy-name label disappears",
			change: func(tr *Tracker) {
				tr.OnServiceUpdate(svcB, makeService("ns", "b", withClusterIPs("10.0.0.2"), withLabel(LabelServiceProxyName, "x")))
			},
			wantChanged:  []string{"ns/b"},
			wantOnChange: true,
		},
		{
			name: "a slice moving to another service changes both",
			change: func(tr *Tracker) {
				s := sliceB.DeepCopy()
				s.Labels[LabelServiceName] = "a"
				s.Ports = sliceA.Ports
				tr.OnEndpointSliceUpdate(sliceB, s)
			},
			wantChanged:  []string{"ns/a:http", "ns/a:https", "ns/b"},
			wantOnChange: true,
		},
		{
			name: "a change undone before the snapshot changes nothing",
			change: func(tr *Tracker) {
				s := svcB.DeepCopy()
				s.Spec.Ports[0].Port = 81
				tr.OnServiceUpdate(svcB, s)
				tr.OnServiceUpdate(s, svcB)
			},
			wantOnChange: true,
		},
		{
			name: "endpoints of a service we do not proxy change nothing",
			change: func(tr *Tracker) {
				tr.OnEndpointSliceAdd(makeSlice("ns", "c-1", "c", withEndpoints(ready("10.1.0.5", "n"))))
			},
			wantOnChange: true,
		},
		{
			name:         "a new zone on our node changes every service port",
			change:       func(tr *Tracker) { tr.OnNodeUpdate(nil, makeNode(testNode, "zone-a")) },
			wantChanged:  []string{"ns/a:http", "ns/a:https", "ns/b"},
			wantOnChange: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr, _ := newTestTracker(t)
			setup(tr)
			var calls atomic.Int32
			tr.SetOnChange(func() { calls.Add(1) })
			tc.change(tr)
			if got := calls.Load() > 0; got != tc.wantOnChange {
				t.Errorf("onChange called %d times, want called: %v", calls.Load(), tc.wantOnChange)
			}
			if got := tr.Pending(); got != tc.wantOnChange {
				t.Errorf("Pending() = %v, want %v", got, tc.wantOnChange)
			}
			snap := tr.Snapshot()
			if diff := cmp.Diff(tc.wantChanged, changedNames(snap), cmpOpts); diff != "" {
				t.Errorf("Changed (-want +got):\n%s", diff)
			}
			for n := range snap.Changed {
				_, inServices := snap.Services[n]
				_, inEndpoints := snap.Endpoints[n]
				if inServices != inEndpoints {
					t.Errorf("%v: in Services %v but in Endpoints %v", n, inServices, inEndpoints)
				}
			}
			if again := tr.Snapshot(); len(again.Changed) != 0 {
				t.Errorf("a second snapshot right away has Changed %v, want none", changedNames(again))
			}
		})
	}
}

func TestFirstSnapshotListsEverything(t *testing.T) {
	tr, _ := newTestTracker(t)
	if snap := tr.Snapshot(); len(snap.Services) != 0 || len(snap.Changed) != 0 {
		t.Fatalf("empty tracker: got %d services, %d changed", len(snap.Services), len(snap.Changed))
	}
	tr.OnServiceAdd(makeService("ns", "a"))
	tr.OnServiceAdd(makeService("ns", "b"))
	snap := tr.Snapshot()
	if diff := cmp.Diff([]string{"ns/a", "ns/b"}, changedNames(snap)); diff != "" {
		t.Errorf("Changed (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]ServicePortName{{Namespace: "ns", Name: "a"}, {Namespace: "ns", Name: "b"}}, snap.SortedNames()); diff != "" {
		t.Errorf("SortedNames (-want +got):\n%s", diff)
	}
}

func TestOldSnapshotsDoNotChange(t *testing.T) {
	tr, _ := newTestTracker(t)
	tr.OnServiceAdd(makeService("ns", "a"))
	slice := makeSlice("ns", "a-1", "a", withEndpoints(ready("10.1.0.1", "n")))
	tr.OnEndpointSliceAdd(slice)
	first := tr.Snapshot()
	before := fmt.Sprintf("%+v %+v %v", first.Services[ServicePortName{Namespace: "ns", Name: "a"}], first.Endpoints, first.Changed)

	updated := slice.DeepCopy()
	updated.Endpoints = append(updated.Endpoints, ready("10.1.0.2", "n"))
	tr.OnEndpointSliceUpdate(slice, updated)
	tr.OnServiceAdd(makeService("ns", "b"))
	tr.OnServiceDelete(makeService("ns", "a"))
	tr.OnNodeUpdate(nil, makeNode(testNode, "zone-z"))
	second := tr.Snapshot()

	after := fmt.Sprintf("%+v %+v %v", first.Services[ServicePortName{Namespace: "ns", Name: "a"}], first.Endpoints, first.Changed)
	if before != after {
		t.Errorf("first snapshot changed:\nbefore %s\nafter  %s", before, after)
	}
	if len(first.Services) != 1 || first.Node.Zone != "" {
		t.Errorf("first snapshot changed: %d services, zone %q", len(first.Services), first.Node.Zone)
	}
	if len(second.Services) != 1 || second.Node.Zone != "zone-z" {
		t.Errorf("second snapshot: %d services, zone %q; want 1 and zone-z", len(second.Services), second.Node.Zone)
	}
}

func TestInvalidInput(t *testing.T) {
	tr, inv := newTestTracker(t)
	bad := makeService("ns", "bad", withClusterIPs("10.0.0.300"))
	tr.OnServiceAdd(bad)
	tr.OnServiceAdd(makeService("ns", "good", withClusterIPs("10.0.0.2")))
	tr.OnServiceAdd(makeService("ns", "mixed", withPorts(
		v1.ServicePort{Name: "icmp", Protocol: "ICMP", Port: 1},
		v1.ServicePort{Name: "http", Protocol: v1.ProtocolTCP, Port: 80},
	)))
	snap := tr.Snapshot()

	if diff := cmp.Diff([]ServicePortName{
		{Namespace: "ns", Name: "good"},
		{Namespace: "ns", Name: "mixed", Port: "http"},
	}, snap.SortedNames()); diff != "" {
		t.Errorf("service ports (-want +got):\n%s", diff)
	}
	want := []string{
		`Service ns/bad: Service ignored: cluster IP "10.0.0.300"`,
		`Service ns/mixed: port "icmp" ignored: unsupported protocol "ICMP"`,
	}
	got := inv.get()
	if len(got) != len(want) {
		t.Fatalf("onInvalid calls = %q, want %d", got, len(want))
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) {
			t.Errorf("onInvalid call %d = %q, want prefix %q", i, got[i], want[i])
		}
	}

	// A resync of the same bad object is not reported again...
	tr.OnServiceUpdate(bad, bad.DeepCopy())
	if n := len(inv.get()); n != 2 {
		t.Errorf("after a resync onInvalid was called %d times in all, want still 2", n)
	}
	// ...but once fixed and broken again, it is.
	tr.OnServiceUpdate(bad, makeService("ns", "bad", withClusterIPs("10.0.0.3")))
	tr.OnServiceUpdate(bad, bad)
	if n := len(inv.get()); n != 3 {
		t.Errorf("after fixing and breaking again onInvalid was called %d times in all, want 3", n)
	}
}

func TestNode(t *testing.T) {
	tr, _ := newTestTracker(t)
	if got, want := tr.Snapshot().Node, (Node{Name: testNode, Eligible: true}); got != want {
		t.Errorf("before any Node: %+v, want %+v", got, want)
	}
	tr.OnNodeAdd(makeNode("node-b", "zone-b"))
	if tr.Pending() {
		t.Errorf("another node's event made a change pending")
	}
	tr.OnNodeAdd(makeNode(testNode, "zone-a"))
	if got, want := tr.Snapshot().Node, (Node{Name: testNode, Zone: "zone-a", Eligible: true}); got != want {
		t.Errorf("after our Node: %+v, want %+v", got, want)
	}
	tainted := makeNode(testNode, "zone-a")
	tainted.Spec.Taints = []v1.Taint{{Key: TaintToBeDeletedByClusterAutoscaler}}
	tr.OnNodeUpdate(nil, tainted)
	if got, want := tr.Snapshot().Node, (Node{Name: testNode, Zone: "zone-a"}); got != want {
		t.Errorf("after taint: %+v, want %+v", got, want)
	}
	tr.OnNodeDelete(tainted)
	if got, want := tr.Snapshot().Node, (Node{Name: testNode}); got != want {
		t.Errorf("after delete: %+v, want %+v", got, want)
	}
}

func TestPendingOldestAndCounters(t *testing.T) {
	tr, _ := newTestTracker(t)
	if tr.Pending() || !tr.OldestPending().IsZero() {
		t.Fatalf("new tracker: Pending %v, OldestPending %v; want false and zero", tr.Pending(), tr.OldestPending())
	}
	start := time.Now()
	svc := makeService("ns", "a")
	tr.OnServiceAdd(svc)
	first := tr.OldestPending()
	if first.Before(start) || first.After(time.Now()) {
		t.Errorf("OldestPending %v not within the add call", first)
	}
	time.Sleep(2 * time.Millisecond)
	tr.OnEndpointSliceAdd(makeSlice("ns", "a-1", "a", withEndpoints(ready("10.1.0.1", "n"))))
	if got := tr.OldestPending(); !got.Equal(first) {
		t.Errorf("a later change moved OldestPending from %v to %v", first, got)
	}
	if s, e := tr.PendingChanges(); s != 1 || e != 1 {
		t.Errorf("PendingChanges = %d, %d; want 1, 1", s, e)
	}
	tr.OnServiceUpdate(svc, svc) // no-op, still counted as an event
	tr.Snapshot()
	if tr.Pending() || !tr.OldestPending().IsZero() {
		t.Errorf("after Snapshot: Pending %v, OldestPending %v; want false and zero", tr.Pending(), tr.OldestPending())
	}
	if s, e := tr.PendingChanges(); s != 0 || e != 0 {
		t.Errorf("PendingChanges after Snapshot = %d, %d; want 0, 0", s, e)
	}
	if got := tr.ServiceChangesTotal(); got != 2 {
		t.Errorf("ServiceChangesTotal = %d, want 2", got)
	}
	if got := tr.EndpointChangesTotal(); got != 1 {
		t.Errorf("EndpointChangesTotal = %d, want 1", got)
	}
}

// TestConcurrentUse feeds events from several goroutines while snapshots
// are taken; run with -race to make it meaningful.
func TestConcurrentUse(t *testing.T) {
	tr, _ := newTestTracker(t)
	var changes atomic.Int64
	tr.SetOnChange(func() { changes.Add(1); tr.Pending() })
	const n = 50
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range n {
				name := fmt.Sprintf("svc-%d-%d", g, i)
				tr.OnServiceAdd(makeService("ns", name, withClusterIPs(fmt.Sprintf("10.0.%d.%d", g, i+1))))
				tr.OnEndpointSliceAdd(makeSlice("ns", name+"-1", name, withEndpoints(ready(fmt.Sprintf("10.1.%d.%d", g, i+1), "n"))))
			}
		}()
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	seen := map[ServicePortName]bool{}
	for finished := false; !finished; {
		select {
		case <-done:
			finished = true
		default:
		}
		for name := range tr.Snapshot().Changed {
			seen[name] = true
		}
	}
	if len(seen) != 4*n {
		t.Errorf("saw %d service ports change, want %d", len(seen), 4*n)
	}
	final := tr.Snapshot()
	for _, name := range final.SortedNames() {
		if len(final.Endpoints[name]) != 1 {
			t.Errorf("%v has %d endpoints, want 1", name, len(final.Endpoints[name]))
		}
	}
	if changes.Load() != 2*4*n {
		t.Errorf("onChange called %d times, want %d", changes.Load(), 2*4*n)
	}
}

// With the feature gate AllowServiceExternalIPs off, as kube-proxy, a
// Service's externalIPs get no rules; everything else about it stays.
func TestDropExternalIPs(t *testing.T) {
	for _, drop := range []bool{false, true} {
		tr, _ := newTestTracker(t)
		if drop {
			tr.DropExternalIPs()
		}
		tr.OnServiceAdd(makeService("ns", "a", func(s *v1.Service) {
			s.Spec.ExternalIPs = []string{"192.0.2.10"}
		}))
		snap := tr.Snapshot()
		sp := snap.Services[ServicePortName{Namespace: "ns", Name: "a"}]
		if sp == nil {
			t.Fatalf("drop=%v: the Service is gone: %v", drop, snap.SortedNames())
		}
		if got := len(sp.ExternalIPs); (got == 0) != drop {
			t.Errorf("drop=%v: external IPs %v", drop, sp.ExternalIPs)
		}
		if len(sp.ClusterIPs) == 0 {
			t.Errorf("drop=%v: the cluster IP went too", drop)
		}
	}
}
