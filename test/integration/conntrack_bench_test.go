package integration

import (
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/test/netns"
)

// A table of 250,000 UDP entries to 1,000 UDP Services (250 clients each,
// spread over the Service's two endpoints) in a scratch namespace, and one
// reconciliation after some endpoints left. docs/reliability.md has the
// figures and the command:
//
//	go test -run '^$' -bench BenchmarkConntrackReconcile -benchtime 3x -benchmem ./test/integration/
const (
	benchServices = 1000
	benchClients  = 250
)

func benchClusterIP(s int) netip.Addr { return netip.AddrFrom4([4]byte{10, 96, byte(s >> 8), byte(s)}) }
func benchEndpoint(s, e int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 244, byte(s >> 8), byte(s)<<1 | byte(e)})
}

// benchEntry is client c of Service s, translated to endpoint c%2.
func benchEntry(s, c int) *netlink.ConntrackFlow {
	cl := netip.AddrFrom4([4]byte{10, 250, byte(c >> 8), byte(c)})
	ep := benchEndpoint(s, c%2)
	return &netlink.ConntrackFlow{
		FamilyType: unix.AF_INET,
		Forward:    netlink.IPTuple{Protocol: unix.IPPROTO_UDP, SrcIP: net.IP(cl.AsSlice()), DstIP: net.IP(benchClusterIP(s).AsSlice()), SrcPort: uint16(20000 + s), DstPort: 53},
		Reverse:    netlink.IPTuple{Protocol: unix.IPPROTO_UDP, SrcIP: net.IP(ep.AsSlice()), DstIP: net.IP(cl.AsSlice()), SrcPort: 53, DstPort: uint16(20000 + s)},
		TimeOut:    3600,
	}
}

// fill creates the entries of clients c (c%2 == 1 when onlyOdd) of every
// Service; it returns how many it created.
func fill(b *testing.B, ns *netns.Namespace, onlyOdd bool, servicesGone int) int {
	b.Helper()
	n := 0
	err := ns.WithNetlink(func(h *netlink.Handle) error {
		for s := range benchServices {
			for c := range benchClients {
				if onlyOdd && (s >= servicesGone || c%2 == 0) {
					continue
				}
				if err := h.ConntrackCreate(netlink.ConntrackTable, unix.AF_INET, benchEntry(s, c)); err != nil {
					return fmt.Errorf("create entry %d/%d: %w", s, c, err)
				}
				n++
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return n
}

// benchState has every Service with both endpoints, except the first gone
// Services, whose endpoint 1 left.
func benchState(gone int) *endpoints.Snapshot {
	snap := &endpoints.Snapshot{Services: map[endpoints.ServicePortName]*endpoints.ServicePort{}, Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{}}
	for s := range benchServices {
		name := endpoints.ServicePortName{Namespace: "bench", Name: fmt.Sprintf("udp-%d", s)}
		snap.Services[name] = &endpoints.ServicePort{Name: name, Protocol: endpoints.UDP, Port: 53, ClusterIPs: []netip.Addr{benchClusterIP(s)}}
		eps := []endpoints.Endpoint{{IP: benchEndpoint(s, 0), Port: 53, Ready: true, Serving: true}}
		if s >= gone {
			eps = append(eps, endpoints.Endpoint{IP: benchEndpoint(s, 1), Port: 53, Ready: true, Serving: true})
		}
		snap.Endpoints[name] = eps
	}
	return snap
}

func BenchmarkConntrackReconcile(b *testing.B) {
	if testing.Short() {
		b.Skip("fills a conntrack table of 250,000 entries")
	}
	lab, _ := rootLab(b)
	ns, err := lab.AddNamespace("ct")
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	total := fill(b, ns, false, 0)
	b.Logf("created %d UDP entries in %s", total, time.Since(start).Round(time.Millisecond))
	var table *conntrack.Kernel
	if err := ns.Do(func() error { table, err = conntrack.OpenKernel(); return err }); err != nil {
		b.Fatal(err)
	}
	defer table.Close()

	for _, gone := range []int{10, 500} {
		stale := gone * benchClients / 2
		b.Run(fmt.Sprintf("entries=%d/stale=%d", total, stale), func(b *testing.B) {
			b.StopTimer()
			f := conntrack.NewFrontends(benchState(gone), nil)
			for range b.N {
				runtime.GC()
				b.StartTimer()
				r := conntrack.Reconcile(table, iptables.IPv4, f, quietLog)
				b.StopTimer()
				if r.Err != nil || r.Seen != total || r.Deleted != stale {
					b.Fatalf("reconcile: %+v, want %d seen and %d deleted", r, total, stale)
				}
				b.Logf("reconciled in %s; the kernel filters dumps by protocol: %v", r.Duration.Round(time.Millisecond), table.KernelFilters())
				if got := fill(b, ns, true, gone); got != stale {
					b.Fatalf("re-created %d entries, want %d", got, stale)
				}
			}
		})
	}

	// For comparison: listing the same table with vishvananda/netlink, as
	// kube-proxy does before it judges a single entry.
	b.Run(fmt.Sprintf("entries=%d/netlink.ConntrackTableList", total), func(b *testing.B) {
		b.StopTimer()
		var peak uint64
		for range b.N {
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			var n int
			b.StartTimer()
			err := ns.WithNetlink(func(h *netlink.Handle) error {
				flows, err := h.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
				n = len(flows)
				runtime.ReadMemStats(&after)
				return err
			})
			b.StopTimer()
			if err != nil || n != total {
				b.Fatalf("list: %d entries, %v", n, err)
			}
			peak = max(peak, after.HeapAlloc-min(after.HeapAlloc, before.HeapAlloc))
		}
		b.ReportMetric(float64(peak)/1024/1024, "MiB-live-after-list")
	})
}
