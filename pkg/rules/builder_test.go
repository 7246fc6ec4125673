package rules

import (
	"fmt"
	"math/rand"
	"net/netip"
	"reflect"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
)

// nextSnapshot changes a few service ports the way the tracker does: a
// changed ServicePort or endpoint list is a new value, everything else is
// shared with the previous snapshot.
func nextSnapshot(prev *endpoints.Snapshot, rng *rand.Rand, step int) *endpoints.Snapshot {
	next := &endpoints.Snapshot{
		Node:      prev.Node,
		Services:  map[endpoints.ServicePortName]*endpoints.ServicePort{},
		Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{},
	}
	for n, s := range prev.Services {
		next.Services[n] = s
		next.Endpoints[n] = prev.Endpoints[n]
	}
	names := prev.SortedNames()
	for i := 0; i < 5; i++ {
		name := names[rng.Intn(len(names))]
		switch rng.Intn(5) {
		case 0: // an endpoint added
			next.Endpoints[name] = append(append([]endpoints.Endpoint{}, prev.Endpoints[name]...),
				ready(netip.AddrFrom4([4]byte{10, 247, byte(step), byte(i)}), rng.Intn(2) == 0))
		case 1: // endpoints gone
			next.Endpoints[name] = nil
		case 2: // becomes a Local-policy NodePort
			svc := *prev.Services[name]
			svc.NodePort, svc.ExternalPolicyLocal = int32(30000+rng.Intn(2000)), true
			next.Services[name] = &svc
		case 3: // deleted
			delete(next.Services, name)
			delete(next.Endpoints, name)
		case 4: // a new Service
			n := endpoints.ServicePortName{Namespace: "new", Name: fmt.Sprintf("svc-%d-%d", step, i)}
			next.Services[n] = &endpoints.ServicePort{Name: n, Protocol: endpoints.UDP, Port: 53,
				ClusterIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 100, byte(step), byte(i)})}}
			next.Endpoints[n] = []endpoints.Endpoint{ready(netip.AddrFrom4([4]byte{10, 248, byte(step), byte(i)}), true)}
		}
	}
	return next
}

func TestBuilderGivesWhatBuildGivesAcrossChanges(t *testing.T) {
	rng := rand.New(rand.NewSource(3))
	snap := manyServices(500, 4)
	var b Builder
	cfg := testConfig()
	for step := 0; step < 40; step++ {
		if step == 20 {
			cfg.MasqueradeAll = true // a config change invalidates everything
		}
		if step == 30 {
			snap.Node.Zone = "zone-b"
		}
		want, got := Build(snap, cfg), b.Build(snap, cfg)
		if !reflect.DeepEqual(want, got) {
			t.Fatalf("step %d: the incremental builder differs from Build (-want +got):\n%s", step, cmp.Diff(want, got))
		}
		snap = nextSnapshot(snap, rng, step)
	}
}

// BenchmarkBuilderOneChange measures a sync after one endpoint changed,
// the common case the incremental builder is for.
func BenchmarkBuilderOneChange(b *testing.B) {
	for _, n := range []int{10000, 30000} {
		snap := manyServices(n, 7)
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			var builder Builder
			builder.Build(snap, testConfig())
			rng := rand.New(rand.NewSource(1))
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				name := endpoints.ServicePortName{Namespace: "bench", Name: fmt.Sprintf("svc-%05d", rng.Intn(n))}
				snap.Endpoints[name] = append([]endpoints.Endpoint{}, snap.Endpoints[name]...)
				builder.Build(snap, testConfig())
			}
		})
	}
}
