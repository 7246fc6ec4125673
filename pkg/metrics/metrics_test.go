package metrics

import (
	"errors"
	"io"
	"maps"
	"math"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

var t0 = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

type clock struct{ t time.Time }

func (c *clock) Now() time.Time { return c.t }

func newTestMetrics() (*Metrics, *clock) {
	c := &clock{t: t0}
	return New(Options{Now: c.Now, NoProcessMetrics: true}), c
}

// scrape reads /metrics into series -> value ("name{labels}" as printed).
func scrape(t *testing.T, m *Metrics) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("/metrics: %d %s", rec.Code, rec.Body)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad line %q", line)
		}
		out[line[:i]] = v
	}
	return out
}

func want(t *testing.T, got map[string]float64, series string, value float64) {
	t.Helper()
	v, ok := got[series]
	if !ok {
		t.Errorf("%s is missing", series)
		return
	}
	if math.Abs(v-value) > 1e-9 {
		t.Errorf("%s = %v, want %v", series, v, value)
	}
}

func syncResult(snap *endpoints.Snapshot, start time.Time, d time.Duration, queued time.Time, err error, results ...dataplane.Result) proxy.SyncResult {
	if snap == nil {
		snap = &endpoints.Snapshot{Node: endpoints.Node{Name: "node1", Eligible: true}}
	}
	return proxy.SyncResult{Snapshot: snap, Results: results, Err: err, Start: start, End: start.Add(d), QueuedSince: queued}
}

func TestSyncsMoveTheSyncMetrics(t *testing.T) {
	m, _ := newTestMetrics()
	got := scrape(t, m)
	for s := range got {
		if strings.HasPrefix(s, "kubeproxy_sync_proxy_rules_duration_seconds") || strings.HasPrefix(s, "kubeproxy_sync_proxy_rules_last_queued") {
			t.Errorf("%s before any family is known", s)
		}
	}

	// A full sync carrying a change queued 2s before it ended.
	start := t0.Add(10 * time.Second)
	m.OnSync(syncResult(nil, start, 20*time.Millisecond, start.Add(-1980*time.Millisecond), nil,
		dataplane.Result{Family: iptables.IPv4, Full: true, Bytes: 1234, RulesWritten: 10, ChainsWritten: 4, RestoreDuration: 5 * time.Millisecond}))
	got = scrape(t, m)
	want(t, got, `kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}`, 1)
	want(t, got, `kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family="IPv4"}`, 0.02)
	want(t, got, `kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.032"}`, 1)
	want(t, got, `kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.016"}`, 0)
	want(t, got, `kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv4"}`, 1)
	want(t, got, `kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"}`, 1)
	want(t, got, `kubeproxy_network_programming_duration_seconds_sum{ip_family="IPv4"}`, 2)
	want(t, got, `kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}`, float64(start.Unix())+0.02)
	want(t, got, `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="IPv4"}`, seconds(start.Add(-1980*time.Millisecond)))
	want(t, got, `miniproxy_sync_restore_bytes{ip_family="IPv4"}`, 1234)
	want(t, got, `miniproxy_sync_rules_written{ip_family="IPv4"}`, 10)
	want(t, got, `miniproxy_sync_chains_written{ip_family="IPv4"}`, 4)
	want(t, got, `miniproxy_sync_restore_duration_seconds_sum{ip_family="IPv4"}`, 0.005)

	// A partial sync that fails: timed, counted, but not "last synced".
	start2 := start.Add(30 * time.Second)
	failed := syncResult(nil, start2, 3*time.Millisecond, start2.Add(-time.Second), errors.New("restore failed"),
		dataplane.Result{Family: iptables.IPv4, Bytes: 99, Failed: true, TableRulesWritten: map[string]int{"nat": 7, "filter": 0}})
	failed.FailedApplies = 1
	m.OnSync(failed)
	got = scrape(t, m)
	want(t, got, `kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}`, 2)
	want(t, got, `kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family="IPv4"}`, 1)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"}`, 1)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family="IPv4"}`, 1)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv4",table="nat"}`, 7)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv4",table="filter"}`, 0)
	want(t, got, `kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}`, float64(start.Unix())+0.02)
	want(t, got, `kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"}`, 1)
	want(t, got, `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="IPv4"}`, float64(start2.Unix()-1))

	// A periodic sync with nothing to write: no programming latency.
	m.OnSync(syncResult(nil, start2.Add(time.Minute), time.Millisecond, time.Time{}, nil,
		dataplane.Result{Family: iptables.IPv4}))
	got = scrape(t, m)
	want(t, got, `kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"}`, 1)
	want(t, got, `miniproxy_sync_restore_bytes{ip_family="IPv4"}`, 0)
	want(t, got, `miniproxy_sync_restore_duration_seconds_count{ip_family="IPv4"}`, 2) // the failed restore ran too
}

// A Service the kernel refuses: the sync succeeds for everything else, the
// refused restore counts as a failure, and the refused Service is counted
// for as long as it lasts.
func TestRefusedServicesAreCounted(t *testing.T) {
	m, _ := newTestMetrics()
	bad := proxy.Refusal{Service: endpoints.ServicePortName{Namespace: "default", Name: "bad"}, Err: "Need TCP, UDP, SCTP or DCCP with port specification", New: true}
	// The refused full apply, then the one without the refused Service.
	res := syncResult(nil, t0, time.Millisecond, t0, nil,
		dataplane.Result{Family: iptables.IPv4, Full: true, Failed: true}, dataplane.Result{Family: iptables.IPv4, Full: true})
	res.Refusals, res.FailedApplies = []proxy.Refusal{bad}, 1
	m.OnSync(res)
	got := scrape(t, m)
	want(t, got, "miniproxy_refused_services", 1)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"}`, 1)
	want(t, got, `kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv4"}`, 1)
	want(t, got, `kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}`, float64(t0.Unix())+0.001)
	if _, ok := got[`kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family="IPv4"}`]; ok {
		t.Error("a failed full apply is no partial restore failure")
	}

	bad.New = false
	res = syncResult(nil, t0, time.Millisecond, t0, nil, dataplane.Result{Family: iptables.IPv4})
	res.Refusals = []proxy.Refusal{bad}
	m.OnSync(res)
	got = scrape(t, m)
	want(t, got, "miniproxy_refused_services", 1)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"}`, 1)

	res.Refusals = nil
	m.OnSync(res)
	want(t, scrape(t, m), "miniproxy_refused_services", 0)
}

func TestBucketsAreKubeProxys(t *testing.T) {
	m, _ := newTestMetrics()
	m.OnSync(syncResult(nil, t0, time.Millisecond, t0, nil, dataplane.Result{Family: iptables.IPv4}))
	got := scrape(t, m)
	for _, le := range []string{"0.001", "0.002", "8.192", "16.384", "+Inf"} {
		if _, ok := got[`kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="`+le+`"}`]; !ok {
			t.Errorf("sync duration lacks bucket %s", le)
		}
	}
	n := 0
	for s := range got {
		if strings.HasPrefix(s, "kubeproxy_network_programming_duration_seconds_bucket") {
			n++
		}
	}
	// 0, 0.25, 0.5, 1..59, 60..115, 120..300, +Inf
	if n != 1+2+59+12+7+1 {
		t.Errorf("network programming has %d buckets", n)
	}
	for _, le := range []string{"0", "0.25", "0.5", "1", "59", "60", "115", "120", "300"} {
		if _, ok := got[`kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="`+le+`"}`]; !ok {
			t.Errorf("network programming lacks bucket %s", le)
		}
	}
}

func TestTrackerChangesShowOnScrape(t *testing.T) {
	m, c := newTestMetrics()
	m.WrapApplier(iptables.IPv4, &fakeApplier{})
	tr := endpoints.NewTracker("node1", nil, nil)
	m.TrackChanges(tr)
	m.TrackChanges(tr) // harmless

	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web"},
		Spec: v1.ServiceSpec{Type: v1.ServiceTypeClusterIP, ClusterIP: "10.0.0.10", ClusterIPs: []string{"10.0.0.10"},
			Ports: []v1.ServicePort{{Port: 80, Protocol: v1.ProtocolTCP}}},
	}
	tr.OnServiceAdd(svc)
	tr.OnServiceUpdate(svc, svc) // a no-op update still counts, as upstream
	tr.OnEndpointSliceAdd(&discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.244.1.5"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}},
		Ports:       []discoveryv1.EndpointPort{{Port: ptr.To[int32](8080), Protocol: ptr.To(v1.ProtocolTCP)}},
	})
	c.t = t0.Add(5 * time.Second)
	m.ChangeQueued()
	got := scrape(t, m)
	want(t, got, "kubeproxy_sync_proxy_rules_service_changes_total", 2)
	want(t, got, "kubeproxy_sync_proxy_rules_endpoint_changes_total", 1)
	want(t, got, "kubeproxy_sync_proxy_rules_service_changes_pending", 1)
	want(t, got, "kubeproxy_sync_proxy_rules_endpoint_changes_pending", 1)
	want(t, got, `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="IPv4"}`, float64(t0.Unix()+5))

	tr.Snapshot()
	got = scrape(t, m)
	want(t, got, "kubeproxy_sync_proxy_rules_service_changes_pending", 0)
	want(t, got, "kubeproxy_sync_proxy_rules_endpoint_changes_pending", 0)
	want(t, got, "kubeproxy_sync_proxy_rules_service_changes_total", 2)
}

func TestNoLocalEndpointsCountsLocalPoliciesWithoutLocalEndpointsPerFamily(t *testing.T) {
	lb := []netip.Addr{netip.MustParseAddr("203.0.113.140")}
	v4 := []netip.Addr{netip.MustParseAddr("10.96.0.10")}
	v6 := []netip.Addr{netip.MustParseAddr("fd00:96::10")}
	dual := append(slices.Clone(v4), v6...)
	name := func(n string) endpoints.ServicePortName {
		return endpoints.ServicePortName{Namespace: "default", Name: n}
	}
	local := endpoints.Endpoint{IP: netip.MustParseAddr("10.244.1.5"), Ready: true, Serving: true, Local: true}
	remote := endpoints.Endpoint{IP: netip.MustParseAddr("10.244.2.5"), Ready: true, Serving: true}
	localTerminating := endpoints.Endpoint{IP: netip.MustParseAddr("10.244.1.6"), Serving: true, Terminating: true, Local: true}
	local6 := endpoints.Endpoint{IP: netip.MustParseAddr("fd00:244:1::5"), Ready: true, Serving: true, Local: true}
	svc := func(n string, ips []netip.Addr, sp endpoints.ServicePort) *endpoints.ServicePort {
		sp.Name, sp.ClusterIPs = name(n), ips
		return &sp
	}
	snap := &endpoints.Snapshot{
		Node: endpoints.Node{Name: "node1", Eligible: true},
		Services: map[endpoints.ServicePortName]*endpoints.ServicePort{
			name("lb-local-remote-only"): svc("lb-local-remote-only", v4, endpoints.ServicePort{LoadBalancerIPs: lb, NodePort: 30001, ExternalPolicyLocal: true, HealthCheckNodePort: 32001}),
			name("lb-local-with-local"):  svc("lb-local-with-local", v4, endpoints.ServicePort{LoadBalancerIPs: lb, NodePort: 30002, ExternalPolicyLocal: true, HealthCheckNodePort: 32002}),
			name("lb-local-terminating"): svc("lb-local-terminating", v4, endpoints.ServicePort{LoadBalancerIPs: lb, NodePort: 30003, ExternalPolicyLocal: true, HealthCheckNodePort: 32003}),
			name("itp-local-none"):       svc("itp-local-none", v4, endpoints.ServicePort{InternalPolicyLocal: true}),
			name("itp-local-with-local"): svc("itp-local-with-local", v4, endpoints.ServicePort{InternalPolicyLocal: true}),
			name("both-local-none"):      svc("both-local-none", v4, endpoints.ServicePort{NodePort: 30004, InternalPolicyLocal: true, ExternalPolicyLocal: true}),
			name("cluster"):              svc("cluster", v4, endpoints.ServicePort{NodePort: 30005}),
			// Dual-stack with a local IPv4 endpoint only: none in IPv6.
			name("itp-dual-v4-only"): svc("itp-dual-v4-only", dual, endpoints.ServicePort{InternalPolicyLocal: true}),
			// IPv6 only, with a local endpoint.
			name("itp-v6-with-local"): svc("itp-v6-with-local", v6, endpoints.ServicePort{InternalPolicyLocal: true}),
		},
		Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{
			name("lb-local-remote-only"): {remote},
			name("lb-local-with-local"):  {local, remote},
			name("lb-local-terminating"): {localTerminating},
			name("itp-local-with-local"): {local},
			name("cluster"):              {remote},
			name("itp-dual-v4-only"):     {local},
			name("itp-v6-with-local"):    {local6},
		},
	}
	got := NoLocalEndpoints(snap)
	if want := (map[iptables.Family]LocalPolicyCounts{iptables.IPv4: {Internal: 2, External: 2}, iptables.IPv6: {Internal: 1}}); !maps.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}

	m, _ := newTestMetrics()
	m.OnSync(syncResult(snap, t0, time.Millisecond, time.Time{}, nil, dataplane.Result{Family: iptables.IPv4}, dataplane.Result{Family: iptables.IPv6}))
	page := scrape(t, m)
	want(t, page, `kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="internal"}`, 2)
	want(t, page, `kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="external"}`, 2)
	want(t, page, `kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv6",traffic_policy="internal"}`, 1)
	want(t, page, `kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv6",traffic_policy="external"}`, 0)
}

// fakeApplier returns what it is told to.
type fakeApplier struct {
	err   error
	calls int
	lost  string
}

func (f *fakeApplier) Apply(rs *iptables.Ruleset, full bool) (dataplane.Result, error) {
	f.calls++
	return dataplane.Result{Family: rs.Family, Full: full}, f.err
}

func (f *fakeApplier) Check(*iptables.Ruleset) error { return f.err }
func (f *fakeApplier) CanaryLost() (string, error)   { return f.lost, f.err }

func ruleset(natRules, filterRules int) *iptables.Ruleset {
	rs := &iptables.Ruleset{Family: iptables.IPv4}
	mk := func(table iptables.Table, n int) iptables.TableRules {
		tr := iptables.TableRules{Table: table, Chains: []iptables.Chain{{Name: "MP-A"}, {Name: "MP-B"}}}
		for i := range n {
			c := &tr.Chains[i%2]
			c.Rules = append(c.Rules, iptables.Rule{"-j", "RETURN"})
		}
		return tr
	}
	if natRules >= 0 {
		rs.Tables = append(rs.Tables, mk("nat", natRules))
	}
	if filterRules >= 0 {
		rs.Tables = append(rs.Tables, mk("filter", filterRules))
	}
	return rs
}

func TestWrappedApplierCountsRulesPerTable(t *testing.T) {
	m, _ := newTestMetrics()
	f := &fakeApplier{}
	a := m.WrapApplier(iptables.IPv4, f)

	if _, err := a.Apply(ruleset(3, 1), true); err != nil {
		t.Fatal(err)
	}
	got := scrape(t, m)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"}`, 3)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="filter"}`, 1)
	want(t, got, `miniproxy_sync_apply_cpu_seconds_count{ip_family="IPv4"}`, 1)

	// A failed apply changes no count: nobody knows what is in the kernel
	// beyond what was last applied.
	f.err = errors.New("restore failed")
	if _, err := a.Apply(ruleset(7, 7), false); err == nil {
		t.Fatal("the error should pass through")
	}
	got = scrape(t, m)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"}`, 3)
	want(t, got, `miniproxy_sync_apply_cpu_seconds_count{ip_family="IPv4"}`, 2)

	// A table that disappears drops to zero.
	f.err = nil
	if _, err := a.Apply(ruleset(5, -1), false); err != nil {
		t.Fatal(err)
	}
	got = scrape(t, m)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"}`, 5)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="filter"}`, 0)
	if f.calls != 3 {
		t.Errorf("%d calls reached the dataplane", f.calls)
	}
}

func TestTheMetricsPortsOtherAnswers(t *testing.T) {
	m, _ := newTestMetrics()
	for _, tc := range []struct{ path, body, ctype string }{
		{"/proxyMode", "iptables", "text/plain; charset=utf-8"},
		{"/healthz", "ok", "text/plain; charset=utf-8"},
	} {
		rec := httptest.NewRecorder()
		m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", tc.path, nil))
		body, _ := io.ReadAll(rec.Result().Body)
		if rec.Code != 200 || string(body) != tc.body || rec.Header().Get("Content-Type") != tc.ctype {
			t.Errorf("%s: %d %q %q", tc.path, rec.Code, body, rec.Header().Get("Content-Type"))
		}
	}
}

func TestProcessMetricsAreExportedByDefault(t *testing.T) {
	m := New(Options{})
	got := scrape(t, m)
	for _, s := range []string{"process_cpu_seconds_total", "process_resident_memory_bytes", "go_goroutines"} {
		if _, ok := got[s]; !ok {
			t.Errorf("%s is missing", s)
		}
	}
}

// The wrapper forwards the canary check between syncs: without it the loop
// would not see a flush until the next sync.
func TestWrappedApplierForwardsTheCanaryCheck(t *testing.T) {
	m := New(Options{})
	a := m.WrapApplier(iptables.IPv4, &fakeApplier{lost: "the canary chain MP-CANARY of table nat is gone"})
	if lost, err := a.CanaryLost(); lost != "the canary chain MP-CANARY of table nat is gone" || err != nil {
		t.Errorf("CanaryLost through the wrapper = %q, %v", lost, err)
	}
}
