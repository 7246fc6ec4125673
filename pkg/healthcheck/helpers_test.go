package healthcheck

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
)

// fakeClock is a clock the test moves by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Step(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// answer is one HTTP answer, reduced to what the tests compare.
type answer struct {
	code    int
	body    string
	ctype   string
	nosniff string
	// weight is the X-Load-Balancing-Endpoint-Weight header.
	weight string
}

func get(t *testing.T, h http.Handler, method, path string) answer {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, path, nil))
	res := rec.Result()
	body, _ := io.ReadAll(res.Body)
	return answer{res.StatusCode, string(body), res.Header.Get("Content-Type"), res.Header.Get("X-Content-Type-Options"), res.Header.Get("X-Load-Balancing-Endpoint-Weight")}
}

// fetch asks a real listener; refused connections come back as code -1.
func fetch(t *testing.T, method, url string) answer {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	res, err := client.Do(req)
	if err != nil {
		return answer{code: -1, body: err.Error()}
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	return answer{res.StatusCode, string(body), res.Header.Get("Content-Type"), res.Header.Get("X-Content-Type-Options"), res.Header.Get("X-Load-Balancing-Endpoint-Weight")}
}

// freePort finds a TCP port free on 127.0.0.1 (and, on Linux, on the rest
// of 127.0.0.0/8) at the time of the call.
func freePort(t *testing.T) int32 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return int32(l.Addr().(*net.TCPAddr).Port)
}

func url(host string, port int32, path string) string {
	return "http://" + net.JoinHostPort(host, strconv.Itoa(int(port))) + path
}

// svc describes one Service of a test snapshot: its ports share the
// health check port, each port gets the listed endpoints.
type svc struct {
	ns, name string
	hcPort   int32
	ports    []string
	eps      []endpoints.Endpoint
}

func snapshot(eligible bool, services ...svc) *endpoints.Snapshot {
	snap := &endpoints.Snapshot{
		Node:      endpoints.Node{Name: "node1", Eligible: eligible},
		Services:  map[endpoints.ServicePortName]*endpoints.ServicePort{},
		Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{},
		Changed:   map[endpoints.ServicePortName]bool{},
	}
	for _, s := range services {
		ports := s.ports
		if len(ports) == 0 {
			ports = []string{""}
		}
		for i, p := range ports {
			n := endpoints.ServicePortName{Namespace: s.ns, Name: s.name, Port: p}
			snap.Services[n] = &endpoints.ServicePort{
				Name: n, Protocol: endpoints.TCP, Port: int32(80 + i), NodePort: int32(30080 + i),
				LoadBalancerIPs:     []netip.Addr{netip.MustParseAddr("203.0.113.140")},
				ExternalPolicyLocal: s.hcPort != 0, HealthCheckNodePort: s.hcPort,
			}
			var eps []endpoints.Endpoint
			for _, ep := range s.eps {
				ep.Port = int32(8080 + i)
				eps = append(eps, ep)
			}
			snap.Endpoints[n] = eps
		}
	}
	return snap
}

func ep(ip string, local, ready bool) endpoints.Endpoint {
	e := endpoints.Endpoint{IP: netip.MustParseAddr(ip), Local: local, Ready: ready, Serving: ready}
	if local {
		e.NodeName = "node1"
	} else {
		e.NodeName = "node2"
	}
	return e
}

func terminating(ip string, local bool) endpoints.Endpoint {
	e := ep(ip, local, false)
	e.Serving, e.Terminating = true, true
	return e
}
