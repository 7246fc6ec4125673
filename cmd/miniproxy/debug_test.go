package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/explain"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// getAccepting is httpGet with an Accept header.
func getAccepting(t *testing.T, url, accept string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", accept)
	res, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

// The /debug/ endpoints of the metrics server, wired as serve wires them,
// answer from the last sync and the rules the (fake) kernel holds.
func TestDebugEndpointsExplainFromTheLastSync(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	metricsPort := freeLoopbackPort(t)
	fake, tracker, p := wireAsServe(t, ctx, freeLoopbackPort(t), metricsPort)
	base := fmt.Sprintf("http://127.0.0.1:%d", metricsPort)
	trace := base + "/debug/trace?src=198.51.100.79&dst=203.0.113.140&port=80&proto=tcp"

	if code, body := httpGet(t, trace); code != http.StatusServiceUnavailable {
		t.Errorf("before the first sync: %d %s, want 503", code, body)
	}
	tracker.OnServiceAdd(lbService(freeLoopbackPort(t)))
	tracker.OnEndpointSliceAdd(webSlice("node1"))
	if res := p.Sync(false); res.Err != nil {
		t.Fatal(res.Err)
	}

	code, body := httpGet(t, base+"/debug/services")
	var view explain.Services
	if err := json.Unmarshal([]byte(body), &view); code != 200 || err != nil {
		t.Fatalf("/debug/services: %d %v\n%s", code, err, body)
	}
	if len(view.Services) != 1 || view.Services[0].Name.Name != "web" || len(view.Services[0].Endpoints) != 1 ||
		!view.Services[0].Endpoints[0].Local || len(view.Configs) != 1 || view.Node.Name != "node1" {
		t.Errorf("/debug/services: %s", body)
	}

	code, body = httpGet(t, trace)
	for _, want := range []string{"Service:    default/web (TCP), by its loadbalancer IP 203.0.113.140:80", "spec.externalTrafficPolicy: Local", "10.244.1.5:8080", "Masquerade: no", "Outcome:    DNAT"} {
		if code != 200 || !strings.Contains(body, want) {
			t.Errorf("/debug/trace: %d, lacks %q:\n%s", code, want, body)
		}
	}
	for _, url := range []string{trace + "&o=json", trace} {
		_, body = getAccepting(t, url, "application/json")
		var e explain.Explanation
		if err := json.Unmarshal([]byte(body), &e); err != nil || e.Outcome.Verdict != explain.VerdictDNAT || len(e.Candidates) != 1 || len(e.Warnings) != 0 {
			t.Errorf("%s as JSON: %v\n%s", url, err, body)
		}
	}
	if code, body := httpGet(t, base+"/debug/trace?src=198.51.100.79&dst=203.0.113.140"); code != http.StatusBadRequest || !strings.Contains(body, "port") {
		t.Errorf("without a port: %d %s", code, body)
	}

	code, body = httpGet(t, base+"/debug/rules?service=default/web")
	if code != 200 || !strings.Contains(body, `IPv4 nat [0 packets, 0 bytes] -A MP-VIP-8C -m comment --comment "default/web loadbalancer IP"`) || strings.Contains(body, "MP-SERVICES") {
		t.Errorf("/debug/rules: %d\n%s", code, body)
	}
	_, body = getAccepting(t, base+"/debug/rules?service=default/web", "application/json")
	var rules []explain.KernelRule
	if err := json.Unmarshal([]byte(body), &rules); err != nil || len(rules) == 0 {
		t.Errorf("/debug/rules as JSON: %v\n%s", err, body)
	}
	if code, _ := httpGet(t, base+"/debug/rules?service=default/nothing"); code != http.StatusNotFound {
		t.Errorf("an unknown Service: %d, want 404", code)
	}

	// Another program sends the load balancer's traffic elsewhere: the
	// trace says what the kernel does, and warns.
	st := fake.State(iptables.IPv4)
	c := st[iptables.NAT]["MP-VIP-8C"]
	last := append(iptables.Rule{}, c.Rules[len(c.Rules)-1]...)
	last[len(last)-1] = "10.244.9.9:8080"
	c.Rules = append(c.Rules[:len(c.Rules)-1:len(c.Rules)-1], last)
	fake.SetState(iptables.IPv4, st)
	_, body = httpGet(t, trace)
	for _, want := range []string{"10.244.9.9:8080", "WARNING:", "IPv4 nat MP-VIP-8C (different)"} {
		if !strings.Contains(body, want) {
			t.Errorf("after a change behind miniproxy's back, the trace lacks %q:\n%s", want, body)
		}
	}
}

// A sync writes the kernel's rules a moment before the daemon's view
// follows: an explanation that reads the two in that moment sees a drift
// that is gone on the next reading, and does not report it; a drift that
// stays is reported after about a second.
func TestAnExplanationWaitsOutASyncInProgress(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	metricsPort := freeLoopbackPort(t)
	fake, tracker, p := wireAsServe(t, ctx, freeLoopbackPort(t), metricsPort)
	viewNow := func() explain.View {
		t.Helper()
		_, body := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/debug/services", metricsPort))
		var s explain.Services
		if err := json.Unmarshal([]byte(body), &s); err != nil {
			t.Fatalf("/debug/services: %v\n%s", err, body)
		}
		return s.View()
	}
	tracker.OnServiceAdd(lbService(freeLoopbackPort(t)))
	tracker.OnEndpointSliceAdd(webSlice("node1"))
	if res := p.Sync(false); res.Err != nil {
		t.Fatal(res.Err)
	}
	before := viewNow()
	tracker.OnEndpointSliceUpdate(nil, webSlice("node2"))
	if res := p.Sync(false); res.Err != nil {
		t.Fatal(res.Err)
	}
	after, kernel := viewNow(), explain.Kernel{iptables.IPv4: fake.State(iptables.IPv4)}

	// The first reading pairs the new rules with the old view.
	readings := 0
	x, err := settledExplainer(settleAttempts, func() (explain.View, explain.Kernel, error) {
		readings++
		if readings == 1 {
			return before, kernel, nil
		}
		return after, kernel, nil
	})
	if err != nil || len(x.Drift()) != 0 || readings != 2 {
		t.Errorf("with the view catching up: %d readings, drift %v, err %v; want no drift after 2", readings, x.Drift(), err)
	}

	// The old view never catches up: the drift is reported.
	readings = 0
	x, err = settledExplainer(settleAttempts, func() (explain.View, explain.Kernel, error) {
		readings++
		return before, kernel, nil
	})
	if err != nil || len(x.Drift()) == 0 || readings != settleAttempts {
		t.Errorf("with a drift that stays: %d readings, drift %v, err %v; want it reported after %d", readings, x.Drift(), err, settleAttempts)
	}
}
