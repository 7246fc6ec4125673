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
}

const managedBy = "bench.miniproxy.test"

func svcName(i int) string { return fmt.Sprintf("svc-%05d", i) }

// slice returns Service i's EndpointSlice with its two endpoints in the
// ranges of the sinks whose blocks are given.
func slice(i int, blockA, blockB byte) *discoveryv1.EndpointSlice {
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
	setEndpoints(s, i, blockA, blockB)
	return s
}

// setEndpoints gives s two ready endpoints, on nodes other than the one
// under test (as nearly all endpoints are in a large cluster).
func setEndpoints(s *discoveryv1.EndpointSlice, i int, blockA, blockB byte) {
	s.Endpoints = nil
	for k, b := range []byte{blockA, blockB} {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{endpointIP(b, i).String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
			NodeName:   ptr.To(fmt.Sprintf("worker-%03d", (2*i+k)%97)),
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
				if err := l.create(ctx, i); err != nil {
					select {
					case errs <- err:
					default:
					}
					continue
				}
				mu.Lock()
				done++
				if done%5000 == 0 {
					l.logf("  %d/%d Services written (%s)", from+done, n, time.Since(start).Round(time.Second))
				}
				mu.Unlock()
			}
		}()
	}
feed:
	for i := from; i < n-1; i++ {
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
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := l.create(ctx, n-1); err != nil {
		return err
	}
	l.logf("%d Services x 2 endpoints in the API server (%d written in %s)", n, n-from, time.Since(start).Round(time.Second))
	return l.waitCache(ctx, n)
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
	s := slice(i, sinks[0].block, sinks[1].block)
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
	setEndpoints(s, i, blockA, blockB)
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
