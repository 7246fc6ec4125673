package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

// service is one benchmark Service as created.
type service struct {
	name      string
	clusterIP netip.Addr
}

// loader writes the benchmark's Services and EndpointSlices and remembers
// which slices a run changed, so the next run starts from the same state.
type loader struct {
	bl    *benchLab
	svcs  []service
	dirty map[int]bool
	logf  func(string, ...any)
	// local puts every endpoint on the measured node (placementLocal);
	// otherwise they are spread over 97 other nodes.
	local bool
}

// The two placements of endpoints the benchmark knows. With all endpoints
// on the measured node every one of them is local to it, which the rules
// treat differently (hairpin masquerade; upstream's per-endpoint chains);
// spread over other nodes is what most Services of a large cluster look
// like from one node.
const (
	placementOther = "other"
	placementLocal = "local"
)

// placementText says where a placement puts the endpoints.
func placementText(p string) string {
	if p == placementLocal {
		return "all endpoints on the measured node"
	}
	return "endpoints spread over 97 other nodes"
}

// placement is the placement of the slices as written now.
func (l *loader) placement() string {
	if l.local {
		return placementLocal
	}
	return placementOther
}

const managedBy = "bench.miniproxy.test"

func svcName(i int) string { return fmt.Sprintf("svc-%05d", i) }

// slice returns Service i's EndpointSlice with its two endpoints in the
// ranges of the sinks whose blocks are given.
func slice(i int, blockA, blockB byte, local bool) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: benchNS,
			Name:      svcName(i) + "-1",
			Labels: map[string]string{
				discoveryv1.LabelServiceName: svcName(i),
				discoveryv1.LabelManagedBy:   managedBy,
			},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To(""), Protocol: ptr.To(v1.ProtocolTCP), Port: ptr.To(int32(endpointPort))}},
	}
	setEndpoints(s, i, blockA, blockB, local)
	return s
}

// setEndpoints gives s two ready endpoints, on the node under test when
// local is set, else on other nodes.
func setEndpoints(s *discoveryv1.EndpointSlice, i int, blockA, blockB byte, local bool) {
	s.Endpoints = nil
	for k, b := range []byte{blockA, blockB} {
		node := fmt.Sprintf("worker-%03d", (2*i+k)%97)
		if local {
			node = nodeName
		}
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{endpointIP(b, i).String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
			NodeName:   ptr.To(node),
		})
	}
}

// grow creates Services (and their slices) until there are n. All but the
// last are written by parallel workers; the last one is written after all
// the others, so it is the last-created Service.
func (l *loader) grow(ctx context.Context, n int) error {
	from := len(l.svcs)
	if n <= from {
		return nil
	}
	start := time.Now()
	l.svcs = append(l.svcs, make([]service, n-from)...)
	if err := l.parallel(ctx, from, n-1, "Services written", l.create); err != nil {
		return err
	}
	if err := l.create(ctx, n-1); err != nil {
		return err
	}
	l.logf("%d Services x 2 endpoints in the API server (%d written in %s)", n, n-from, time.Since(start).Round(time.Second))
	return l.waitCache(ctx, n)
}

// parallel runs do for every index in [from, to) on 24 workers, logging
// every 5,000 done, and returns the first error once all workers stopped.
func (l *loader) parallel(ctx context.Context, from, to int, what string, do func(context.Context, int) error) error {
	start := time.Now()
	jobs := make(chan int)
	errs := make(chan error, 1)
	var wg sync.WaitGroup
	var mu sync.Mutex
	done := 0
	for range 24 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				if err := do(ctx, i); err != nil {
					select {
					case errs <- err:
					default:
					}
					continue
				}
				mu.Lock()
				done++
				if done%5000 == 0 {
					l.logf("  %d/%d %s (%s)", from+done, to, what, time.Since(start).Round(time.Second))
				}
				mu.Unlock()
			}
		}()
	}
feed:
	for i := from; i < to; i++ {
		select {
		case jobs <- i:
		case err := <-errs:
			errs <- err
			break feed
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
	}
	return ctx.Err()
}

// place rewrites every slice with its endpoints where placement says, and
// waits for the watch cache to show them all, so that every proxy of the
// next runs lists the same state.
func (l *loader) place(ctx context.Context, placement string) error {
	local := placement == placementLocal
	if local == l.local {
		return nil
	}
	start := time.Now()
	l.local = local
	err := l.parallel(ctx, 0, len(l.svcs), "slices rewritten", func(ctx context.Context, i int) error {
		s := slice(i, sinks[0].block, sinks[1].block, local)
		cur, err := l.bl.kube.DiscoveryV1().EndpointSlices(benchNS).Get(ctx, s.Name, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("get endpointslice %s: %w", s.Name, err)
		}
		s.ResourceVersion = cur.ResourceVersion
		if _, err := l.bl.kube.DiscoveryV1().EndpointSlices(benchNS).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("update endpointslice %s: %w", s.Name, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	l.dirty = nil // every slice is in its original state again
	l.logf("%d slices now with %s (%s)", len(l.svcs), placementText(placement), time.Since(start).Round(time.Second))
	return l.waitPlaced(ctx)
}

// waitPlaced waits until the watch cache (what a proxy's first list reads)
// shows every slice with the loader's placement.
func (l *loader) waitPlaced(ctx context.Context) error {
	deadline := time.Now().Add(5 * time.Minute)
	for {
		slices, err := l.bl.kube.DiscoveryV1().EndpointSlices(benchNS).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
		placed := 0
		if err == nil {
			for _, s := range slices.Items {
				if len(s.Endpoints) > 0 && s.Endpoints[0].NodeName != nil && (*s.Endpoints[0].NodeName == nodeName) == l.local {
					placed++
				}
			}
			if placed == len(l.svcs) {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("watch cache shows %d of %d slices placed (%v)", placed, len(l.svcs), err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func (l *loader) create(ctx context.Context, i int) error {
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: benchNS, Name: svcName(i)},
		Spec: v1.ServiceSpec{
			Type:  v1.ServiceTypeClusterIP,
			Ports: []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: servicePort, TargetPort: intstr.FromInt32(endpointPort)}},
		},
	}
	var created *v1.Service
	var err error
	for attempt := 0; ; attempt++ {
		created, err = l.bl.kube.CoreV1().Services(benchNS).Create(ctx, svc, metav1.CreateOptions{})
		if err == nil || attempt == 4 || ctx.Err() != nil {
			break
		}
		time.Sleep(time.Second)
	}
	if err != nil {
		return fmt.Errorf("create service %s: %w", svc.Name, err)
	}
	ip, err := netip.ParseAddr(created.Spec.ClusterIP)
	if err != nil {
		return fmt.Errorf("service %s: cluster IP %q: %w", svc.Name, created.Spec.ClusterIP, err)
	}
	l.svcs[i] = service{name: svc.Name, clusterIP: ip}
	s := slice(i, sinks[0].block, sinks[1].block, l.local)
	for attempt := 0; ; attempt++ {
		_, err = l.bl.kube.DiscoveryV1().EndpointSlices(benchNS).Create(ctx, s, metav1.CreateOptions{})
		if err == nil || attempt == 4 || ctx.Err() != nil {
			break
		}
		time.Sleep(time.Second)
	}
	if err != nil {
		return fmt.Errorf("create endpointslice %s: %w", s.Name, err)
	}
	return nil
}

// waitCache waits until the API server's watch cache (what a proxy's first
// list reads) holds all n Services and slices, so that both proxies start
// from the same, complete state.
func (l *loader) waitCache(ctx context.Context, n int) error {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		svcs, err1 := l.bl.kube.CoreV1().Services(benchNS).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
		slices, err2 := l.bl.kube.DiscoveryV1().EndpointSlices(benchNS).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
		if err1 == nil && err2 == nil && len(svcs.Items) == n && len(slices.Items) == n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("watch cache does not show %d services and slices (%v, %v)", n, err1, err2)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// move changes Service i's endpoints to the given sinks' ranges and returns
// the time just before the update was sent.
func (l *loader) move(ctx context.Context, i int, blockA, blockB byte) (time.Time, error) {
	s, err := l.bl.kube.DiscoveryV1().EndpointSlices(benchNS).Get(ctx, svcName(i)+"-1", metav1.GetOptions{})
	if err != nil {
		return time.Time{}, err
	}
	setEndpoints(s, i, blockA, blockB, l.local)
	if l.dirty == nil {
		l.dirty = map[int]bool{}
	}
	l.dirty[i] = blockA != sinks[0].block
	t0 := time.Now()
	_, err = l.bl.kube.DiscoveryV1().EndpointSlices(benchNS).Update(ctx, s, metav1.UpdateOptions{})
	return t0, err
}

// reset puts every moved endpoint back, so the next proxy starts from the
// state the previous one started from.
func (l *loader) reset(ctx context.Context) error {
	changed := false
	for i, moved := range l.dirty {
		if !moved {
			continue
		}
		if _, err := l.move(ctx, i, sinks[0].block, sinks[1].block); err != nil {
			return fmt.Errorf("reset %s: %w", svcName(i), err)
		}
		changed = true
	}
	l.dirty = nil
	if changed {
		// Let the watch cache take the writes before a proxy lists.
		time.Sleep(3 * time.Second)
	}
	return nil
}

func ipNet(ip []byte, bits int) *net.IPNet {
	return &net.IPNet{IP: net.IP(ip), Mask: net.CIDRMask(bits, 8*len(ip))}
}
