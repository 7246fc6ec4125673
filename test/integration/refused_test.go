package integration

import (
	"bytes"
	"io"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/dataplane/dataplanetest"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// syncBuffer is a log sink safe for the proxier's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func apiService(name, clusterIP string, nodePort int32) *v1.Service {
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: v1.ServiceSpec{
			Type: v1.ServiceTypeClusterIP, ClusterIP: clusterIP, ClusterIPs: []string{clusterIP},
			Ports: []v1.ServicePort{{Port: 80, Protocol: v1.ProtocolTCP, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	if nodePort != 0 {
		svc.Spec.Type = v1.ServiceTypeNodePort
		svc.Spec.Ports[0].NodePort = nodePort
	}
	return svc
}

// apiSlice is the EndpointSlice of Service svc with one ready endpoint, on
// node1 (this node) for pod1 and node2 for pod2.
func apiSlice(svc, ip string) *discoveryv1.EndpointSlice {
	node := "node2"
	if ip == pod1IP.String() {
		node = "node1"
	}
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: svc + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}, NodeName: ptr.To(node)}},
		Ports:       []discoveryv1.EndpointPort{{Port: ptr.To[int32](8080), Protocol: ptr.To(v1.ProtocolTCP)}},
	}
}

// A Service whose new rules the kernel refuses (spoilt by a test hook in
// the dataplane, not by the rules package) stops no other Service: in the
// same sync the others' changes reach the kernel and carry traffic, the
// refused one keeps its last accepted rules, and the node says so: a log
// line naming the Service with the kernel's words, the refused-Services
// metric, a restore failure counted. Both ways of finding it are used: the
// line the kernel names, and bisection when it names none.
func TestARefusedServiceStopsNoOtherInTheKernel(t *testing.T) {
	for _, how := range []struct {
		name   string
		brk    dataplanetest.Break
		kernel string // what the kernel says
	}{
		{"the kernel names the line", dataplanetest.DropProtocol, "Need TCP, UDP, SCTP or DCCP with port specification"},
		{"the kernel names no line", dataplanetest.JumpNowhere, "Chain 'MP-NOWHERE' does not exist"},
	} {
		t.Run(how.name, func(t *testing.T) {
			top := setUp(t)
			var logs syncBuffer
			log := slog.New(slog.NewTextHandler(&logs, nil))
			brk := dataplanetest.NewBreaking(dataplane.NewRunner(), how.brk)
			dp, err := dataplane.New(brk, iptables.IPv4, rules.Prefix)
			if err != nil {
				t.Fatal(err)
			}
			m := metrics.New(metrics.Options{NoProcessMetrics: true, Families: []iptables.Family{iptables.IPv4}})
			tracker := endpoints.NewTracker("node1", log, nil)
			p := proxy.New(proxy.Options{DetectLocal: rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{clusterNet}}, SyncPeriod: time.Minute}, tracker,
				map[iptables.Family]proxy.Applier{iptables.IPv4: dp},
				func(f iptables.Family) ([]netip.Addr, error) {
					if f == iptables.IPv4 {
						return []netip.Addr{nodeIP, pod1GW, pod2GW}, nil
					}
					return nil, nil
				}, log)
			p.OnSync(m.OnSync)
			sync := func() proxy.SyncResult {
				t.Helper()
				var res proxy.SyncResult
				top.node.Do(func() error { res = p.Sync(false); return nil })
				return res
			}

			tracker.OnServiceAdd(apiService("web", "10.96.0.10", 0))
			tracker.OnEndpointSliceAdd(apiSlice("web", pod2IP.String()))
			tracker.OnServiceAdd(apiService("bad", "10.96.0.11", 30081))
			tracker.OnEndpointSliceAdd(apiSlice("bad", pod2IP.String()))
			if res := sync(); res.Err != nil {
				t.Fatal(res.Err)
			}

			// bad's next rules (those to pod1) are refused. In one sync, bad
			// and web move to pod1 and a Service is added.
			brk.Break("default/bad", pod1IP.String())
			tracker.OnEndpointSliceUpdate(nil, apiSlice("bad", pod1IP.String()))
			tracker.OnEndpointSliceUpdate(nil, apiSlice("web", pod1IP.String()))
			tracker.OnServiceAdd(apiService("added", "10.96.0.12", 0))
			tracker.OnEndpointSliceAdd(apiSlice("added", pod2IP.String()))
			res := sync()
			if res.Err != nil || len(res.Refusals) != 1 || res.Refusals[0].Service.Name != "bad" || !res.Refusals[0].New {
				t.Fatalf("want every Service but bad programmed and bad reported: err=%v refusals=%+v", res.Err, res.Refusals)
			}
			for _, tc := range []struct{ what, url, server string }{
				{"web follows its change", "http://10.96.0.10/", "pod1"},
				{"the added Service works", "http://10.96.0.12/", "pod2"},
				{"bad keeps its last accepted rules: ClusterIP", "http://10.96.0.11/", "pod2"},
				{"bad keeps its last accepted rules: NodePort", "http://198.51.100.1:30081/", "pod2"},
			} {
				from := top.client
				if _, s := get(t, from, tc.url); s != tc.server {
					t.Errorf("%s: answered by %s, want %s", tc.what, s, tc.server)
				}
			}
			line := ""
			for _, l := range strings.Split(logs.String(), "\n") {
				if strings.Contains(l, "the kernel refuses this Service's rules") {
					line = l
				}
			}
			if !strings.Contains(line, "service=default/bad") || !strings.Contains(line, how.kernel) {
				t.Errorf("want an error log line naming default/bad and saying %q, got %q", how.kernel, line)
			}
			scraped := scrape(t, m)
			for _, want := range []string{"miniproxy_refused_services 1", `kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"} 1`} {
				if !strings.Contains(scraped, want+"\n") {
					t.Errorf("metrics lack %q", want)
				}
			}

			// Another change while bad is refused: programmed at once, with
			// no refused restore, bad still reported.
			tracker.OnEndpointSliceUpdate(nil, apiSlice("web", pod2IP.String()))
			res = sync()
			if res.Err != nil || res.FailedApplies != 0 || len(res.Refusals) != 1 {
				t.Fatalf("a later change: err=%v failedApplies=%d refusals=%+v", res.Err, res.FailedApplies, res.Refusals)
			}
			if _, s := get(t, top.pod1, "http://10.96.0.10/"); s != "pod2" {
				t.Errorf("web's later change: answered by %s, want pod2", s)
			}
			if n := strings.Count(logs.String(), "the kernel refuses this Service's rules"); n != 1 {
				t.Errorf("the refusal should be logged once, not at every sync: %d lines", n)
			}
		})
	}
}

// scrape returns the metrics page.
func scrape(t *testing.T, m *metrics.Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	b, _ := io.ReadAll(rec.Body)
	return string(b)
}
