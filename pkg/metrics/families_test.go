package metrics

import (
	"context"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	clientmetrics "k8s.io/client-go/tools/metrics"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// exposition reads the TYPE and HELP lines of /metrics.
func exposition(t *testing.T, m *Metrics) (types, helps map[string]string) {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	types, helps = map[string]string{}, map[string]string{}
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(f, " ")
			types[name] = typ
		}
		if f, ok := strings.CutPrefix(line, "# HELP "); ok {
			name, help, _ := strings.Cut(f, " ")
			helps[name] = help
		}
	}
	return types, helps
}

// A dual-stack sync: every per-family metric has one series per family,
// labelled "IPv4" and "IPv6" as kube-proxy spells them.
func TestEveryFamilyGetsItsSeries(t *testing.T) {
	m, _ := newTestMetrics()
	start := t0.Add(time.Second)
	res := syncResult(nil, start, 10*time.Millisecond, start.Add(-time.Second), nil,
		dataplane.Result{Family: iptables.IPv4, Full: true, Bytes: 10, TableRulesWritten: map[string]int{"nat": 4, "filter": 1}},
		dataplane.Result{Family: iptables.IPv6, Bytes: 0, TableRulesWritten: map[string]int{"nat": 0, "filter": 0}})
	res.Conntrack = []proxy.ConntrackCleanup{{Family: iptables.IPv6, Duration: 3 * time.Millisecond, Deleted: 2}}
	m.OnSync(res)
	got := scrape(t, m)
	want(t, got, `kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv4"}`, 1)
	want(t, got, `kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family="IPv6"}`, 1)
	want(t, got, `kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv6"}`, 1)
	for _, fam := range []string{"IPv4", "IPv6"} {
		want(t, got, `kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="`+fam+`"}`, seconds(start.Add(10*time.Millisecond)))
		want(t, got, `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="`+fam+`"}`, seconds(start.Add(-time.Second)))
		want(t, got, `kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="`+fam+`",traffic_policy="internal"}`, 0)
	}
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv4",table="nat"}`, 4)
	want(t, got, `kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv6",table="filter"}`, 0)
	// Only IPv4's rules changed: the change was IPv4's.
	want(t, got, `kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"}`, 1)
	if _, ok := got[`kubeproxy_network_programming_duration_seconds_count{ip_family="IPv6"}`]; ok {
		t.Error("IPv6 wrote nothing, yet observed a programming latency")
	}
	want(t, got, `kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family="IPv6"}`, 1)
	want(t, got, `kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv6"}`, 2)

	// A change queued later stamps every family.
	m.ChangeQueued()
	got = scrape(t, m)
	want(t, got, `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="IPv6"}`, seconds(t0))
}

func TestTypesAndHelpAreKubeProxys(t *testing.T) {
	m, _ := newTestMetrics()
	m.TrackChanges(fakeChanges{})
	m.OnSync(syncResult(nil, t0, time.Millisecond, t0, nil, dataplane.Result{Family: iptables.IPv4, Failed: true, TableRulesWritten: map[string]int{"nat": 1}}))
	m.ObserveHealthz(200)
	types, helps := exposition(t, m)
	for name, typ := range map[string]string{
		"kubeproxy_sync_proxy_rules_duration_seconds":                        "histogram",
		"kubeproxy_network_programming_duration_seconds":                     "histogram",
		"kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds":           "gauge",
		"kubeproxy_sync_proxy_rules_iptables_restore_failures_total":         "counter",
		"kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total": "counter",
		"kubeproxy_sync_proxy_rules_iptables_last":                           "gauge",
		"kubeproxy_sync_proxy_rules_endpoint_changes_total":                  "counter",
		"kubeproxy_sync_proxy_rules_service_changes_pending":                 "gauge",
		"kubeproxy_proxy_healthz_total":                                      "counter",
		"kubernetes_build_info":                                              "gauge",
		"rest_client_transport_cache_entries":                                "gauge",
		"rest_client_exec_plugin_ttl_seconds":                                "gauge",
	} {
		if types[name] != typ {
			t.Errorf("%s: type %q, want %q", name, types[name], typ)
		}
	}
	for name, help := range helps {
		switch {
		case strings.HasPrefix(name, "kubeproxy_") || strings.HasPrefix(name, "rest_client_"):
			if !strings.HasPrefix(help, "[ALPHA] ") {
				t.Errorf("%s: help %q lacks kube-proxy's [ALPHA] mark", name, help)
			}
		case name == "kubernetes_build_info":
			if !strings.HasPrefix(help, "[BETA] ") {
				t.Errorf("%s: help %q lacks kube-proxy's [BETA] mark", name, help)
			}
		}
	}
}

type fakeChanges struct{}

func (fakeChanges) ServiceChangesTotal() int64          { return 0 }
func (fakeChanges) EndpointChangesTotal() int64         { return 0 }
func (fakeChanges) PendingChanges() (services, eps int) { return 0, 0 }

func TestBuildInfoLabels(t *testing.T) {
	m := New(Options{NoProcessMetrics: true, Build: BuildInfo{Major: "0", Minor: "3", GitVersion: "v0.3.1", GitCommit: "abc", GitTreeState: "clean", BuildDate: "2026-01-02T03:04:05Z",
		GoVersion: "go1.26.8", Compiler: "gc", Platform: "linux/amd64"}})
	want(t, scrape(t, m), `kubernetes_build_info{build_date="2026-01-02T03:04:05Z",compiler="gc",git_commit="abc",git_tree_state="clean",git_version="v0.3.1",go_version="go1.26.8",major="0",minor="3",platform="linux/amd64"}`, 1)
}

// client-go's hooks reach the rest_client_* families with component-base's
// label names (retries: code, verb, host).
func TestClientGoHooksFeedRESTClientMetrics(t *testing.T) {
	HookClientGo()
	HookClientGo() // harmless
	ctx := context.Background()
	u := url.URL{Scheme: "https", Host: "10.240.0.2:6443", Path: "/api/v1/services"}
	clientmetrics.RequestLatency.Observe(ctx, "LIST", u, 20*time.Millisecond)
	clientmetrics.RateLimiterLatency.Observe(ctx, "LIST", u, time.Millisecond)
	clientmetrics.RequestSize.Observe(ctx, "POST", u.Host, 300)
	clientmetrics.ResponseSize.Observe(ctx, "LIST", u.Host, 3000)
	clientmetrics.RequestResult.Increment(ctx, "200", "GET", u.Host)
	clientmetrics.RequestRetry.IncrementRetry(ctx, "503", "GET", u.Host)
	clientmetrics.TransportCreateCalls.Increment("uncacheable")
	clientmetrics.TransportCacheEntries.Observe(2)
	m, _ := newTestMetrics()
	got := scrape(t, m)
	for _, s := range []string{
		`rest_client_request_duration_seconds_count{host="10.240.0.2:6443",verb="LIST"}`,
		`rest_client_rate_limiter_duration_seconds_count{host="10.240.0.2:6443",verb="LIST"}`,
		`rest_client_request_size_bytes_count{host="10.240.0.2:6443",verb="POST"}`,
		`rest_client_response_size_bytes_bucket{host="10.240.0.2:6443",verb="LIST",le="4096"}`,
		`rest_client_requests_total{code="200",host="10.240.0.2:6443",method="GET"}`,
		`rest_client_request_retries_total{code="503",host="10.240.0.2:6443",verb="GET"}`,
		`rest_client_transport_create_calls_total{result="uncacheable"}`,
		`rest_client_transport_cache_entries`,
		`rest_client_exec_plugin_ttl_seconds`,
	} {
		if _, ok := got[s]; !ok {
			t.Errorf("%s is missing", s)
		}
	}
	want(t, got, `rest_client_response_size_bytes_bucket{host="10.240.0.2:6443",verb="LIST",le="4096"}`, 1)
	want(t, got, `rest_client_transport_cache_entries`, 2)
}
