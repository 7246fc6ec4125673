package healthcheck

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"

	"k8s.io/client-go/tools/record"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

var loopback = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}

type serviceLab struct {
	health   *ServiceHealth
	healthy  atomic.Bool
	recorder *record.FakeRecorder
	logs     *bytes.Buffer
	addrs    atomic.Value // []netip.Addr
}

// newServiceLab listens only on loopback addresses: --nodeport-addresses
// is set and the node's addresses are faked.
func newServiceLab(t *testing.T, ranges []netip.Prefix, local ...string) *serviceLab {
	t.Helper()
	l := &serviceLab{recorder: record.NewFakeRecorder(10), logs: &bytes.Buffer{}}
	l.healthy.Store(true)
	l.setAddrs(local...)
	l.health = NewServiceHealth(ServiceHealthOptions{
		NodePortAddresses: ranges,
		LocalAddresses:    func() ([]netip.Addr, error) { return l.addrs.Load().([]netip.Addr), nil },
		ProxyHealthy:      l.healthy.Load,
		Recorder:          l.recorder,
		Log:               slog.New(slog.NewTextHandler(syncWriter{l.logs}, nil)),
	})
	t.Cleanup(l.health.Close)
	return l
}

func (l *serviceLab) setAddrs(local ...string) {
	var addrs []netip.Addr
	for _, a := range local {
		addrs = append(addrs, netip.MustParseAddr(a))
	}
	l.addrs.Store(addrs)
}

func (l *serviceLab) sync(snapErr error, services ...svc) {
	l.health.OnSync(proxy.SyncResult{Snapshot: snapshot(true, services...), Err: snapErr})
}

// syncWriter serialises the log writes of the serving goroutines.
type syncWriter struct{ b *bytes.Buffer }

var logMu = make(chan struct{}, 1)

func (w syncWriter) Write(p []byte) (int, error) {
	logMu <- struct{}{}
	defer func() { <-logMu }()
	return w.b.Write(p)
}

func serviceAnswer(ns, name string, n int, healthy bool) string {
	return fmt.Sprintf("{\n\t\"service\": {\n\t\t\"namespace\": %q,\n\t\t\"name\": %q\n\t},\n\t\"localEndpoints\": %d,\n\t\"serviceProxyHealthy\": %t\n}", ns, name, n, healthy)
}

func wantService(t *testing.T, what string, got answer, code int, body string) {
	t.Helper()
	if got.code != code || got.body != body {
		t.Errorf("%s: got %d %q\nwant %d %q", what, got.code, got.body, code, body)
	}
	if got.ctype != "application/json" || got.nosniff != "nosniff" {
		t.Errorf("%s: headers Content-Type %q, X-Content-Type-Options %q", what, got.ctype, got.nosniff)
	}
	if m := localEndpointsRE.FindStringSubmatch(body); m != nil && got.weight != m[1] {
		t.Errorf("%s: X-Load-Balancing-Endpoint-Weight %q, want the local endpoints, %s", what, got.weight, m[1])
	}
}

var localEndpointsRE = regexp.MustCompile(`"localEndpoints": (\d+)`)

func TestServiceHealthFollowsLocalReadyEndpoints(t *testing.T) {
	l := newServiceLab(t, loopback, "127.0.0.1", "10.240.0.3")
	port := freePort(t)
	web := svc{ns: "default", name: "web", hcPort: port, ports: []string{"http", "https"}}

	// No endpoint on this node: 503.
	web.eps = list(ep("10.244.2.6", false, true))
	l.sync(nil, web)
	wantService(t, "no local endpoint", fetch(t, "GET", url("127.0.0.1", port, "/healthz")), 503, serviceAnswer("default", "web", 0, true))

	// One local ready pod serving both ports counts once; not-ready,
	// terminating and remote endpoints do not count. Any path, any method.
	web.eps = list(
		ep("10.244.1.5", true, true), ep("10.244.1.6", true, false),
		terminating("10.244.1.7", true), ep("10.244.2.6", false, true),
	)
	l.sync(nil, web)
	for _, path := range []string{"/", "/healthz", "/any/thing?x=1"} {
		wantService(t, "one local endpoint "+path, fetch(t, "GET", url("127.0.0.1", port, path)), 200, serviceAnswer("default", "web", 1, true))
	}
	wantService(t, "POST", fetch(t, "POST", url("127.0.0.1", port, "/")), 200, serviceAnswer("default", "web", 1, true))

	// The proxy is unhealthy: 503 although the endpoint is there.
	l.healthy.Store(false)
	wantService(t, "proxy unhealthy", fetch(t, "GET", url("127.0.0.1", port, "/")), 503, serviceAnswer("default", "web", 1, false))
	l.healthy.Store(true)

	// Back to no local endpoint.
	web.eps = list(terminating("10.244.1.5", true))
	l.sync(nil, web)
	wantService(t, "only a terminating local endpoint", fetch(t, "GET", url("127.0.0.1", port, "/")), 503, serviceAnswer("default", "web", 0, true))

	// Only on the addresses inside --nodeport-addresses.
	if got := l.health.Listening()[ServiceName{"default", "web"}]; len(got.Addrs) != 1 || got.Addrs[0].String() != fmt.Sprintf("127.0.0.1:%d", port) {
		t.Errorf("listening on %v, want only 127.0.0.1:%d", got.Addrs, port)
	}
}

func TestAFailedSyncChangesNoAnswer(t *testing.T) {
	l := newServiceLab(t, loopback, "127.0.0.1")
	port := freePort(t)
	web := svc{ns: "default", name: "web", hcPort: port}
	l.sync(nil, web)
	web.eps = list(ep("10.244.1.5", true, true))
	l.sync(errors.New("restore failed"), web)
	wantService(t, "after a failed sync", fetch(t, "GET", url("127.0.0.1", port, "/")), 503, serviceAnswer("default", "web", 0, true))

	other := freePort(t)
	l.sync(errors.New("restore failed"), web, svc{ns: "default", name: "new", hcPort: other})
	if got := fetch(t, "GET", url("127.0.0.1", other, "/")); got.code != -1 {
		t.Errorf("a Service first seen in a failed sync must not be opened: %d", got.code)
	}
	l.sync(nil, web)
	wantService(t, "after the retry", fetch(t, "GET", url("127.0.0.1", port, "/")), 200, serviceAnswer("default", "web", 1, true))
}

func TestServiceDeletedOrPortChangedClosesTheOldPort(t *testing.T) {
	l := newServiceLab(t, loopback, "127.0.0.1")
	p1, p2 := freePort(t), freePort(t)
	web := svc{ns: "default", name: "web", hcPort: p1, eps: list(ep("10.244.1.5", true, true))}
	l.sync(nil, web)
	wantService(t, "first port", fetch(t, "GET", url("127.0.0.1", p1, "/")), 200, serviceAnswer("default", "web", 1, true))

	web.hcPort = p2
	l.sync(nil, web)
	if got := fetch(t, "GET", url("127.0.0.1", p1, "/")); got.code != -1 {
		t.Errorf("the old port should be closed, got %d", got.code)
	}
	wantService(t, "moved port", fetch(t, "GET", url("127.0.0.1", p2, "/")), 200, serviceAnswer("default", "web", 1, true))

	// No longer Local (the field is cleared): closed.
	web.hcPort = 0
	l.sync(nil, web)
	if got := fetch(t, "GET", url("127.0.0.1", p2, "/")); got.code != -1 {
		t.Errorf("a Service without healthCheckNodePort has no port, got %d", got.code)
	}

	// Deleted.
	web.hcPort = p1
	l.sync(nil, web)
	wantService(t, "reopened", fetch(t, "GET", url("127.0.0.1", p1, "/")), 200, serviceAnswer("default", "web", 1, true))
	l.sync(nil)
	if got := fetch(t, "GET", url("127.0.0.1", p1, "/")); got.code != -1 {
		t.Errorf("the deleted Service's port should be closed, got %d", got.code)
	}
	if n := len(l.health.Listening()); n != 0 {
		t.Errorf("%d ports still open", n)
	}
}

func TestAPortTakenIsReportedAndRetriedWithoutHarmingOthers(t *testing.T) {
	l := newServiceLab(t, loopback, "127.0.0.1")
	squatter, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	taken := int32(squatter.Addr().(*net.TCPAddr).Port)
	free := freePort(t)
	a := svc{ns: "shop", name: "a", hcPort: taken, eps: list(ep("10.244.1.5", true, true))}
	b := svc{ns: "shop", name: "b", hcPort: free, eps: list(ep("10.244.1.6", true, true))}

	l.sync(nil, a, b)
	wantService(t, "the other Service", fetch(t, "GET", url("127.0.0.1", free, "/")), 200, serviceAnswer("shop", "b", 1, true))
	select {
	case ev := <-l.recorder.Events:
		// kube-proxy's reason and message: the listener's error as it is.
		want := fmt.Sprintf(`Warning FailedToStartServiceHealthcheck node node1 failed to start healthcheck "shop/a" on port %d: listen tcp 127.0.0.1:%d: bind: address already in use`, taken, taken)
		if ev != want {
			t.Errorf("event %q\nwant       %q", ev, want)
		}
	default:
		t.Fatal("no event for the taken port")
	}
	logs := func() string {
		logMu <- struct{}{}
		defer func() { <-logMu }()
		return l.logs.String()
	}
	if !strings.Contains(logs(), "cannot open healthCheckNodePort") || !strings.Contains(logs(), "service=shop/a") {
		t.Errorf("no clear log line:\n%s", logs())
	}

	// Retried at the next sync, quietly.
	l.sync(nil, a, b)
	select {
	case ev := <-l.recorder.Events:
		t.Errorf("the same failure should not be reported again: %s", ev)
	default:
	}

	// The squatter leaves: the next sync opens the port.
	squatter.Close()
	l.sync(nil, a, b)
	wantService(t, "after the port was freed", fetch(t, "GET", url("127.0.0.1", taken, "/")), 200, serviceAnswer("shop", "a", 1, true))
	wantService(t, "the other Service still", fetch(t, "GET", url("127.0.0.1", free, "/")), 200, serviceAnswer("shop", "b", 1, true))
}

func TestListenersFollowTheNodeAddresses(t *testing.T) {
	// Every 127.0.0.0/8 address is local on Linux, so two can be used.
	l := newServiceLab(t, []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, "127.0.0.1", "127.0.0.2", "10.240.0.3")
	port := freePort(t)
	web := svc{ns: "default", name: "web", hcPort: port, eps: list(ep("10.244.1.5", true, true))}
	l.sync(nil, web)
	for _, host := range []string{"127.0.0.1", "127.0.0.2"} {
		wantService(t, host, fetch(t, "GET", url(host, port, "/")), 200, serviceAnswer("default", "web", 1, true))
	}
	l.setAddrs("127.0.0.1", "10.240.0.3")
	l.sync(nil, web)
	wantService(t, "remaining address", fetch(t, "GET", url("127.0.0.1", port, "/")), 200, serviceAnswer("default", "web", 1, true))
	if got := fetch(t, "GET", url("127.0.0.2", port, "/")); got.code != -1 {
		t.Errorf("the removed address should not answer: %d", got.code)
	}
}

func TestWithoutNodePortAddressesOneListenerCoversEveryAddress(t *testing.T) {
	var asked []string
	h := NewServiceHealth(ServiceHealthOptions{
		Listen: func(addr string) (net.Listener, error) {
			asked = append(asked, addr)
			// Stand in for the wildcard listener with a loopback one.
			return net.Listen("tcp", "127.0.0.1:0")
		},
	})
	defer h.Close()
	h.Sync(snapshot(true, svc{ns: "default", name: "web", hcPort: 31234}))
	if len(asked) != 1 || asked[0] != ":31234" {
		t.Errorf("listened on %q, want [\":31234\"]", asked)
	}
}

func TestAListenFailureOnOneAddressClosesTheOthers(t *testing.T) {
	var opened []net.Listener
	h := NewServiceHealth(ServiceHealthOptions{
		NodePortAddresses: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
		LocalAddresses: func() ([]netip.Addr, error) {
			return []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")}, nil
		},
		Listen: func(addr string) (net.Listener, error) {
			if strings.HasPrefix(addr, "10.0.0.2:") {
				return nil, errors.New("cannot assign requested address")
			}
			l, err := net.Listen("tcp", "127.0.0.1:0")
			opened = append(opened, l)
			return l, err
		},
	})
	defer h.Close()
	h.Sync(snapshot(true, svc{ns: "default", name: "web", hcPort: 31234}))
	if len(h.Listening()) != 0 {
		t.Error("the Service should not count as open")
	}
	for _, l := range opened {
		if _, err := l.Accept(); err == nil {
			t.Error("the listener on the first address should have been closed")
		}
	}
}

func TestLocalReadyEndpointsCountsDistinctIPsPerService(t *testing.T) {
	snap := snapshot(true,
		svc{ns: "a", name: "two-ports", hcPort: 1, ports: []string{"http", "https"}, eps: list(ep("10.0.0.1", true, true), ep("10.0.0.2", true, true))},
		svc{ns: "a", name: "mixed", hcPort: 2, eps: list(ep("10.0.0.3", true, true), ep("10.0.0.4", false, true), ep("10.0.0.5", true, false), terminating("10.0.0.6", true))},
		svc{ns: "a", name: "none", hcPort: 3},
	)
	got := LocalReadyEndpoints(snap)
	want := map[ServiceName]int{{"a", "two-ports"}: 2, {"a", "mixed"}: 1}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %v, want %v", got, want)
	}
	ports := HealthCheckNodePorts(snap)
	if len(ports) != 3 || ports[ServiceName{"a", "two-ports"}] != 1 {
		t.Errorf("health check ports %v", ports)
	}
}

func TestClosedHealthOpensNothing(t *testing.T) {
	l := newServiceLab(t, loopback, "127.0.0.1")
	port := freePort(t)
	l.sync(nil, svc{ns: "default", name: "web", hcPort: port})
	l.health.Close()
	if got := fetch(t, "GET", url("127.0.0.1", port, "/")); got.code != -1 {
		t.Errorf("closed: %d", got.code)
	}
	l.sync(nil, svc{ns: "default", name: "web", hcPort: port})
	if len(l.health.Listening()) != 0 {
		t.Error("a closed ServiceHealth opened a port")
	}
}

// list lets a test write endpoint lists inline.
func list(e ...endpoints.Endpoint) []endpoints.Endpoint { return e }
