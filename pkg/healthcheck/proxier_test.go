package healthcheck

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

const timeout = time.Minute // twice a 30s sync period

type proxierLab struct {
	clock   *fakeClock
	pending time.Time
	health  *ProxierHealth
	metrics *metrics.Metrics
	handler http.Handler
}

func newProxierLab() *proxierLab {
	l := &proxierLab{clock: newFakeClock()}
	l.metrics = metrics.New(metrics.Options{Now: l.clock.Now, NoProcessMetrics: true})
	l.health = NewProxierHealth(ProxierHealthOptions{
		Timeout:  timeout,
		Pending:  func() time.Time { return l.pending },
		Now:      l.clock.Now,
		Observer: l.metrics,
	})
	l.handler = l.health.Handler()
	return l
}

// sync feeds a sync that ran from now-d to now.
func (l *proxierLab) sync(d time.Duration, queued time.Time, err error, eligible bool) {
	end := l.clock.Now()
	l.health.OnSync(proxy.SyncResult{
		Snapshot:    snapshot(eligible),
		Results:     []proxy.ApplyResult{{Result: dataplane.Result{Full: true}}},
		Err:         err,
		Start:       end.Add(-d),
		End:         end,
		QueuedSince: queued,
	})
}

// healthzBody is kube-proxy 1.37's /healthz answer: top is the top-level
// lastUpdated, synced the IPv4 status's (zero: no family synced yet, no
// status).
func healthzBody(top, now time.Time, eligible, healthy bool, synced time.Time) string {
	return fmt.Sprintf(`{"lastUpdated":%q,"currentTime":%q,"nodeEligible":%t,"healthy":%t%s}`,
		jsonTime(top), jsonTime(now), eligible, healthy, status(healthy, synced))
}

// livezBody is /livez's: the same without nodeEligible.
func livezBody(top, now time.Time, healthy bool, synced time.Time) string {
	return fmt.Sprintf(`{"lastUpdated":%q,"currentTime":%q,"healthy":%t%s}`, jsonTime(top), jsonTime(now), healthy, status(healthy, synced))
}

func status(healthy bool, synced time.Time) string {
	if synced.IsZero() {
		return ""
	}
	return fmt.Sprintf(`,"status":{"IPv4":{"lastUpdated":%q,"healthy":%t}}`, jsonTime(synced), healthy)
}

func jsonTime(t time.Time) string { return t.Format(time.RFC3339Nano) }

func wantAnswer(t *testing.T, what string, got answer, code int, body string) {
	t.Helper()
	if got.code != code || got.body != body {
		t.Errorf("%s: got %d %s\nwant %d %s", what, got.code, got.body, code, body)
	}
	if got.ctype != "application/json" || got.nosniff != "nosniff" {
		t.Errorf("%s: headers Content-Type %q, X-Content-Type-Options %q", what, got.ctype, got.nosniff)
	}
}

func TestProxierHealthAnswersLikeKubeProxy(t *testing.T) {
	l := newProxierLab()
	now := l.clock.Now()
	wantAnswer(t, "/healthz at start", get(t, l.handler, "GET", "/healthz"), 200, healthzBody(now, now, true, true, time.Time{}))
	wantAnswer(t, "/livez at start", get(t, l.handler, "GET", "/livez"), 200, livezBody(now, now, true, time.Time{}))
	if got := get(t, l.handler, "GET", "/other"); got.code != 404 {
		t.Errorf("other paths should be 404, got %d", got.code)
	}

	// Healthy: lastUpdated follows the current time, as in kube-proxy.
	l.sync(time.Second, now.Add(-2*time.Second), nil, true)
	synced := now
	l.clock.Step(45 * time.Second)
	now = l.clock.Now()
	wantAnswer(t, "/healthz after a sync", get(t, l.handler, "GET", "/healthz"), 200, healthzBody(now, now, true, true, synced))
	if !l.health.IsHealthy() {
		t.Error("IsHealthy should be true")
	}
}

func TestAChangeWaitingLongerThanTheTimeoutIsUnhealthy(t *testing.T) {
	// At start-up, before the first sync: the informers deliver a change
	// and the loop never takes it.
	l := newProxierLab()
	started := l.clock.Now()
	l.clock.Step(5 * time.Second)
	l.pending = l.clock.Now()
	l.clock.Step(timeout - time.Second)
	if got := get(t, l.handler, "GET", "/healthz"); got.code != 200 {
		t.Fatalf("one second before the timeout: %d %s", got.code, got.body)
	}
	l.clock.Step(time.Second)
	now := l.clock.Now()
	wantAnswer(t, "/healthz at the timeout", get(t, l.handler, "GET", "/healthz"), 503, healthzBody(started, now, true, false, time.Time{}))
	wantAnswer(t, "/livez at the timeout", get(t, l.handler, "GET", "/livez"), 503, livezBody(started, now, false, time.Time{}))
	if l.health.IsHealthy() {
		t.Error("IsHealthy should be false")
	}

	// A sync takes it: healthy again at once.
	queued := l.pending
	l.pending = time.Time{}
	l.sync(time.Second, queued, nil, true)
	now = l.clock.Now()
	wantAnswer(t, "/healthz after the sync", get(t, l.handler, "GET", "/healthz"), 200, healthzBody(now, now, true, true, now))
}

func TestAFailedSyncIsUnhealthyAfterTheTimeout(t *testing.T) {
	l := newProxierLab()
	l.sync(time.Second, time.Time{}, nil, true)
	lastGood := l.clock.Now()

	// A change is taken by a sync that fails; the retries fail too.
	l.clock.Step(10 * time.Second)
	queued := l.clock.Now().Add(-time.Second)
	l.sync(time.Second, queued, errors.New("restore IPv4 rules: exit status 1"), true)
	for range 5 {
		l.clock.Step(10 * time.Second)
		if got := get(t, l.handler, "GET", "/healthz"); l.clock.Now().Sub(queued) < timeout && got.code != 200 {
			t.Fatalf("%s after the change, before the timeout: %d", l.clock.Now().Sub(queued), got.code)
		}
		l.sync(time.Second, queued, errors.New("restore IPv4 rules: exit status 1"), true)
	}
	l.clock.Step(10 * time.Second) // 61s after the change
	now := l.clock.Now()
	wantAnswer(t, "/healthz", get(t, l.handler, "GET", "/healthz"), 503, healthzBody(lastGood, now, true, false, lastGood))
	wantAnswer(t, "/livez", get(t, l.handler, "GET", "/livez"), 503, livezBody(lastGood, now, false, lastGood))

	l.sync(time.Second, queued, nil, true)
	now = l.clock.Now()
	wantAnswer(t, "/healthz after a good sync", get(t, l.handler, "GET", "/healthz"), 200, healthzBody(now, now, true, true, now))
}

func TestAFailedPeriodicSyncCountsFromItsStart(t *testing.T) {
	l := newProxierLab()
	l.sync(time.Second, time.Time{}, nil, true)
	l.clock.Step(30 * time.Second)
	l.sync(time.Second, time.Time{}, errors.New("canary chain vanished and the restore failed"), true)
	l.clock.Step(timeout - 2*time.Second)
	if got := get(t, l.handler, "GET", "/livez"); got.code != 200 {
		t.Fatalf("before the timeout: %d", got.code)
	}
	l.clock.Step(time.Second)
	l.sync(time.Second, time.Time{}, errors.New("still failing"), true)
	if got := get(t, l.handler, "GET", "/livez"); got.code != 503 {
		t.Fatalf("a minute after the failed sync started: %d", got.code)
	}
}

func TestAChangeSeenPendingIsNotForgottenByAHungSync(t *testing.T) {
	l := newProxierLab()
	l.clock.Step(time.Second)
	l.pending = l.clock.Now()
	if got := get(t, l.handler, "GET", "/healthz"); got.code != 200 {
		t.Fatal(got.code)
	}
	// A sync takes the change (the tracker has nothing pending) and hangs.
	l.pending = time.Time{}
	l.clock.Step(timeout)
	if got := get(t, l.handler, "GET", "/healthz"); got.code != 503 {
		t.Fatalf("the change has not reached the kernel for %s: %d", timeout, got.code)
	}
}

func TestASilentSyncLoopIsUnhealthy(t *testing.T) {
	l := newProxierLab()
	l.sync(time.Second, time.Time{}, nil, true)
	l.clock.Step(timeout - time.Second)
	if got := get(t, l.handler, "GET", "/livez"); got.code != 200 {
		t.Fatal(got.code)
	}
	l.clock.Step(time.Second)
	if got := get(t, l.handler, "GET", "/livez"); got.code != 503 {
		t.Fatalf("no sync for %s: %d", timeout, got.code)
	}
}

func TestANodeMarkedForDeletionFailsHealthzOnly(t *testing.T) {
	l := newProxierLab()
	l.sync(time.Second, time.Time{}, nil, false)
	now := l.clock.Now()
	wantAnswer(t, "/healthz", get(t, l.handler, "GET", "/healthz"), 503, healthzBody(now, now, false, true, now))
	wantAnswer(t, "/livez", get(t, l.handler, "GET", "/livez"), 200, livezBody(now, now, true, now))
	// Eligibility follows even failed syncs: it is not about the rules.
	// The taint was removed, so the load balancer may send traffic again.
	l.sync(time.Second, time.Time{}, errors.New("boom"), true)
	wantAnswer(t, "/healthz after the taint was removed", get(t, l.handler, "GET", "/healthz"), 200, healthzBody(now, now, true, true, now))
}

func TestHealthAnswersAreCounted(t *testing.T) {
	l := newProxierLab()
	get(t, l.handler, "GET", "/healthz")
	get(t, l.handler, "GET", "/healthz")
	get(t, l.handler, "GET", "/livez")
	l.sync(time.Second, time.Time{}, nil, false)
	get(t, l.handler, "GET", "/healthz")

	page := get(t, l.metrics.Handler(), "GET", "/metrics").body
	for _, want := range []string{
		`kubeproxy_proxy_healthz_total{code="200"} 2`,
		`kubeproxy_proxy_healthz_total{code="503"} 1`,
		`kubeproxy_proxy_livez_total{code="200"} 1`,
	} {
		if !strings.Contains(page, want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}
