package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

func TestHealthFlagsHaveKubeProxysDefaults(t *testing.T) {
	var o options
	if err := newFlagSet(&o).Parse(nil); err != nil {
		t.Fatal(err)
	}
	if o.cfg.HealthzBindAddress != "0.0.0.0:10256" || o.cfg.MetricsBindAddress != "127.0.0.1:10249" {
		t.Errorf("defaults %q %q", o.cfg.HealthzBindAddress, o.cfg.MetricsBindAddress)
	}
}

func TestBindAddress(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{"", "", ""},
		{"0.0.0.0:10256", "0.0.0.0:10256", ""},
		{"0.0.0.0", "0.0.0.0:10256", ""},
		{"10.240.0.3", "10.240.0.3:10256", ""},
		{"::", "[::]:10256", ""},
		{"[::]:10256", "[::]:10256", ""},
		{"[fd00::3]:9999", "[fd00::3]:9999", ""},
		{":10256", ":10256", ""},
		{"localhost:10256", "", "not an IP address"},
		{"0.0.0.0:0", "", "port must be 1..65535"},
		{"0.0.0.0:99999", "", "port must be 1..65535"},
		{"0.0.0.0:http", "", "port must be 1..65535"},
		{"1.2.3", "", "want ip:port or ip"},
	} {
		got, err := bindAddress("healthz-bind-address", tc.in, defaultHealthzPort)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%q: %v", tc.in, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, errUsage)):
			t.Errorf("%q: got %v, want an error about %q", tc.in, err, tc.err)
		case got != tc.want:
			t.Errorf("%q: got %q, want %q", tc.in, got, tc.want)
		}
	}
}

func freeLoopbackPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	res, err := c.Get(url)
	if err != nil {
		return -1, err.Error()
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

func lbService(hcPort int) *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web"},
		Spec: v1.ServiceSpec{
			Type:                  v1.ServiceTypeLoadBalancer,
			ClusterIP:             "10.0.0.10",
			ClusterIPs:            []string{"10.0.0.10"},
			ExternalTrafficPolicy: v1.ServiceExternalTrafficPolicyLocal,
			HealthCheckNodePort:   int32(hcPort),
			Ports:                 []v1.ServicePort{{Port: 80, Protocol: v1.ProtocolTCP, NodePort: 30080}},
		},
		Status: v1.ServiceStatus{LoadBalancer: v1.LoadBalancerStatus{Ingress: []v1.LoadBalancerIngress{{IP: "203.0.113.140"}}}},
	}
}

func webSlice(node string) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{
			Addresses:  []string{"10.244.1.5"},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
			NodeName:   ptr.To(node),
		}},
		Ports: []discoveryv1.EndpointPort{{Port: ptr.To[int32](8080), Protocol: ptr.To(v1.ProtocolTCP)}},
	}
}

// wireAsServe starts, as serve does, the proxy on a fake dataplane (node
// 127.0.0.1, cluster CIDR 10.244.0.0/16) with the healthz and metrics
// servers on 127.0.0.1 following its syncs, until ctx ends.
func wireAsServe(t *testing.T, ctx context.Context, healthzPort, metricsPort int) (*dataplane.Fake, *endpoints.Tracker, *proxy.Proxier) {
	t.Helper()
	var o options
	if err := newFlagSet(&o).Parse([]string{
		fmt.Sprintf("--healthz-bind-address=127.0.0.1:%d", healthzPort),
		fmt.Sprintf("--metrics-bind-address=127.0.0.1:%d", metricsPort),
	}); err != nil {
		t.Fatal(err)
	}
	addrs := func(f iptables.Family) ([]netip.Addr, error) {
		if f == iptables.IPv4 {
			return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
		}
		return nil, nil
	}
	fake := dataplane.NewFake()
	ho := newHealthOptions(o.cfg, []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}, addrs, fake)
	dp, err := dataplane.New(fake, iptables.IPv4, rules.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	planes := map[iptables.Family]proxy.Applier{iptables.IPv4: dp}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	tracker := endpoints.NewTracker("node1", log, nil)
	p := proxy.New(proxy.Options{SyncPeriod: 30 * time.Second, DetectLocal: rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}}},
		tracker, planes, addrs, log)
	// As serve wires them.
	tracker.SetOnChange(p.Changed)
	m := metrics.New(metrics.Options{Log: log, Families: []iptables.Family{iptables.IPv4}})
	m.TrackChanges(tracker)
	p.OnChange(m.ChangeQueued)
	servers, err := startHealth(ctx, ho, m, tracker.OldestPending, record.NewFakeRecorder(10), log)
	if err != nil {
		t.Fatal(err)
	}
	p.OnSync(servers.onSync)
	return fake, tracker, p
}

// TestStartHealthFollowsTheSyncs wires everything as the daemon does, with
// the fake dataplane, and checks the three servers after real syncs. Every
// listener is on 127.0.0.1.
func TestStartHealthFollowsTheSyncs(t *testing.T) {
	healthzPort, metricsPort, hcPort := freeLoopbackPort(t), freeLoopbackPort(t), freeLoopbackPort(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fake, tracker, p := wireAsServe(t, ctx, healthzPort, metricsPort)
	base := func(port int) string { return fmt.Sprintf("http://127.0.0.1:%d", port) }

	if code, body := httpGet(t, base(metricsPort)+"/proxyMode"); code != 200 || body != "iptables" {
		t.Errorf("/proxyMode: %d %q", code, body)
	}
	// /configz: the effective configuration, as kube-proxy shows it.
	if code, body := httpGet(t, base(metricsPort)+"/configz"); code != 200 ||
		!strings.Contains(body, `{"kubeproxy.config.k8s.io":{"kind":"KubeProxyConfiguration","apiVersion":"kubeproxy.config.k8s.io/v1alpha1"`) ||
		!strings.Contains(body, fmt.Sprintf(`"metricsBindAddress":"127.0.0.1:%d"`, metricsPort)) {
		t.Errorf("/configz: %d %s", code, body)
	}
	if code, _ := httpGet(t, base(healthzPort)+"/healthz"); code != 200 {
		t.Errorf("/healthz at start: %d", code)
	}

	tracker.OnServiceAdd(lbService(hcPort))
	tracker.OnEndpointSliceAdd(webSlice("node1"))
	if code, _ := httpGet(t, base(hcPort)+"/"); code != -1 {
		t.Errorf("the health check port must not open before the rules are in: %d", code)
	}
	if res := p.Sync(false); res.Err != nil {
		t.Fatal(res.Err)
	}
	if code, body := httpGet(t, base(hcPort)+"/"); code != 200 || !strings.Contains(body, `"localEndpoints": 1`) {
		t.Errorf("with a local endpoint: %d %s", code, body)
	}

	// The endpoint moves to another node; the first attempt fails, so the
	// answer stays until a sync succeeds.
	tracker.OnEndpointSliceUpdate(nil, webSlice("node2"))
	fake.FailNext(1)
	if res := p.Sync(false); res.Err == nil {
		t.Fatal("the sync should have failed")
	}
	if code, _ := httpGet(t, base(hcPort)+"/"); code != 200 {
		t.Errorf("after a failed sync the answer must not change: %d", code)
	}
	if res := p.Sync(false); res.Err != nil {
		t.Fatal(res.Err)
	}
	if code, body := httpGet(t, base(hcPort)+"/"); code != 503 || !strings.Contains(body, `"localEndpoints": 0`) {
		t.Errorf("without a local endpoint: %d %s", code, body)
	}

	_, page := httpGet(t, base(metricsPort)+"/metrics")
	for _, want := range []string{
		`kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"} 3` + "\n",
		`kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"} 1` + "\n",
		"kubeproxy_sync_proxy_rules_service_changes_total 1\n",
		"kubeproxy_sync_proxy_rules_endpoint_changes_total 2\n",
		`kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="external"} 1` + "\n",
		`kubeproxy_proxy_healthz_total{code="200"} 1` + "\n",
		`kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"} `,
		"process_cpu_seconds_total ",
	} {
		if !strings.Contains(page, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if strings.Contains(page, `kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"} 0`+"\n") {
		t.Error("the nat table has rules")
	}

	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, _ := httpGet(t, base(hcPort)+"/")
		if code == -1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the health check port stays open after the context ended")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestStartHealthRefusesBadOptionsAndRetriesTakenPorts(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	m := metrics.New(metrics.Options{Log: log})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := startHealth(ctx, healthOptions{}, m, nil, nil, log); err == nil {
		t.Error("no sync period: want an error")
	}
	if _, err := startHealth(ctx, healthOptions{syncPeriod: time.Minute, metricsBindAddress: "localhost:1"}, m, nil, nil, log); err == nil || !errors.Is(err, errUsage) {
		t.Errorf("bad bind address: %v", err)
	}

	// The healthz port is taken by someone else: not fatal, served once free.
	squatter, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := squatter.Addr().String()
	o := healthOptions{healthzBindAddress: addr, syncPeriod: time.Minute, retry: 20 * time.Millisecond}
	if _, err := startHealth(ctx, o, m, nil, nil, log); err != nil {
		t.Fatalf("a taken port should be retried, not fatal: %v", err)
	}
	squatter.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if code, _ := httpGet(t, "http://"+addr+"/livez"); code == 200 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the healthz server never came up")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestProfilingIsServedOnlyWhenAsked(t *testing.T) {
	base := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "metrics") })
	for _, tc := range []struct{ on bool }{{false}, {true}} {
		rec := httptest.NewRecorder()
		withProfiling(base, tc.on).ServeHTTP(rec, httptest.NewRequest("GET", "/debug/pprof/", nil))
		isPprof := strings.Contains(rec.Body.String(), "heap")
		if isPprof != tc.on {
			t.Errorf("--profiling=%v: /debug/pprof/ answered %q", tc.on, rec.Body.String())
		}
		rec = httptest.NewRecorder()
		withProfiling(base, tc.on).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		if rec.Body.String() != "metrics" {
			t.Errorf("--profiling=%v: the metrics must still be served, got %q", tc.on, rec.Body.String())
		}
	}
}

// --bind-address-hard-fail: a healthz or metrics port someone else holds
// is fatal, with an error naming the address and the cause, and nothing is
// left serving; without it the same start-up succeeds and the port is
// served once free (TestStartHealthRefusesBadOptionsAndRetriesTakenPorts).
func TestBindAddressHardFailMakesATakenPortFatal(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, server := range []string{"healthz", "metrics"} {
		t.Run(server, func(t *testing.T) {
			squatter, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer squatter.Close()
			taken, free := squatter.Addr().String(), fmt.Sprintf("127.0.0.1:%d", freeLoopbackPort(t))

			args := []string{"--bind-address-hard-fail", "--healthz-bind-address=" + free, "--metrics-bind-address=" + taken}
			if server == "healthz" {
				args[1], args[2] = "--healthz-bind-address="+taken, "--metrics-bind-address="+free
			}
			o, notes, err := commandLine(args, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if len(notes) != 0 {
				t.Errorf("--bind-address-hard-fail is acted on now, yet: %q", notes)
			}
			ho := newHealthOptions(o.cfg, nil, nil, nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			start := time.Now()
			_, err = startHealth(ctx, ho, metrics.New(metrics.Options{Log: log}), nil, nil, log)
			if err == nil {
				t.Fatal("a taken port must be fatal with --bind-address-hard-fail")
			}
			if time.Since(start) > time.Second {
				t.Errorf("the failure took %s", time.Since(start))
			}
			msg := err.Error()
			if !strings.Contains(msg, server) || !strings.Contains(msg, taken) || !strings.Contains(msg, "address already in use") {
				t.Errorf("the error should name the server, the address and the cause: %q", msg)
			}
			wantReason := map[string]string{"healthz": "FailedToStartProxierHealthcheck", "metrics": "FailedToStartMetricServer"}[server]
			if hf := (*hardFailure)(nil); !errors.As(err, &hf) || hf.reason != wantReason {
				t.Errorf("want a hard failure reported on the Node as %s, got %#v", wantReason, err)
			}

			// The same command line without the flag starts, and serves
			// once the squatter leaves.
			ho.bindAddressHardFail = false
			ho.retry = 20 * time.Millisecond
			if _, err := startHealth(ctx, ho, metrics.New(metrics.Options{Log: log}), nil, nil, log); err != nil {
				t.Fatalf("without --bind-address-hard-fail a taken port is retried: %v", err)
			}
			squatter.Close()
			path := map[string]string{"healthz": "/livez", "metrics": "/proxyMode"}[server]
			deadline := time.Now().Add(5 * time.Second)
			for {
				if code, _ := httpGet(t, "http://"+taken+path); code == 200 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the %s server never came up on %s", server, taken)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

func TestBuildInfoLabelsComeFromTheBuild(t *testing.T) {
	for _, tc := range []struct {
		b    build
		want metrics.BuildInfo
	}{
		{build{version: "v0.4.2", revision: "0123abc", treeState: "clean", vcsTime: "2026-11-30T10:00:00Z"},
			metrics.BuildInfo{Major: "0", Minor: "4", GitVersion: "v0.4.2", GitCommit: "0123abc", GitTreeState: "clean", BuildDate: "2026-11-30T10:00:00Z"}},
		{build{version: "(devel)", revision: "0123abc", treeState: "dirty"},
			metrics.BuildInfo{GitVersion: "(devel)", GitCommit: "0123abc", GitTreeState: "dirty"}},
	} {
		if got := tc.b.info(); got != tc.want {
			t.Errorf("%+v: got %+v, want %+v", tc.b, got, tc.want)
		}
	}
}

// The Node event of a hard failure is written before the daemon exits.
func TestNodeWarningNowWritesTheEvent(t *testing.T) {
	client := fake.NewClientset()
	sink := &eventSink{client: client, node: "node1", log: slog.New(slog.DiscardHandler)}
	sink.nodeWarningNow(context.Background(), "FailedToStartProxierHealthcheck", "start healthz server on 0.0.0.0:10256: bind: address already in use")
	evs, err := client.CoreV1().Events(metav1.NamespaceDefault).List(context.Background(), metav1.ListOptions{})
	if err != nil || len(evs.Items) != 1 {
		t.Fatalf("events %v %v", evs, err)
	}
	e := evs.Items[0]
	if e.InvolvedObject.Kind != "Node" || e.InvolvedObject.Name != "node1" || e.Type != v1.EventTypeWarning ||
		e.Reason != "FailedToStartProxierHealthcheck" || e.Message != "start healthz server on 0.0.0.0:10256: bind: address already in use" {
		t.Errorf("event %+v", e)
	}
}
