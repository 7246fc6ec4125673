// Package healthcheck answers the questions load balancers, kubelet probes
// and operators ask a kube-proxy: the per-Service healthCheckNodePort
// ("does this node have a local endpoint of this Service?") and the
// proxier's own /healthz and /livez ("are this node's rules up to date?").
// The answers and their bodies are kube-proxy's, so that cloud load
// balancers and probes written for kube-proxy work unchanged.
//
// Both are driven by proxy.SyncResults: they follow what is in the kernel,
// never what the API server says, so that nobody is told "send here" before
// the rules are in.
package healthcheck

import (
	"encoding/json"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// Observer counts the proxier health answers by status code, for
// kubeproxy_proxy_healthz_total and kubeproxy_proxy_livez_total;
// *metrics.Metrics implements it.
type Observer interface {
	ObserveHealthz(code int)
	ObserveLivez(code int)
}

// ProxierHealthOptions configure NewProxierHealth.
type ProxierHealthOptions struct {
	// Timeout is how long a change may wait for its sync before the proxy
	// is unhealthy; kube-proxy uses twice the sync period.
	Timeout time.Duration
	// Pending says since when changes have been waiting that no sync has
	// taken yet (zero when none); the daemon passes the tracker's
	// OldestPending. May be nil.
	Pending func() time.Time
	// Now is the clock (time.Now when nil); tests inject their own.
	Now func() time.Time
	// Observer counts the answers; may be nil.
	Observer Observer
}

// ProxierHealth is the state behind the healthz port (kube-proxy's 10256):
// whether every change reached the kernel in time, and whether this node is
// still eligible for load balancer traffic. Feed it every SyncResult with
// OnSync and serve Handler. It is safe for concurrent use.
//
// The proxy is healthy unless one of these has lasted Timeout or longer:
//   - a change is waiting that no sync has taken yet (Pending), or that a
//     health request saw waiting and no successful sync started after;
//   - a sync failed and no sync has succeeded since (counted from the
//     oldest change it carried, or from its start when it carried none: a
//     failed apply leaves the rules in an unknown state);
//   - after the first sync, no sync has finished at all (the loop syncs at
//     least once per sync period, so silence means it is stuck, possibly
//     in a sync that took the pending changes with it).
//
// A node is not eligible once its Node object has a deletion timestamp or
// the ToBeDeletedByClusterAutoscaler taint (endpoints.Node.Eligible, taken
// from every SyncResult's snapshot); only /healthz looks at it.
type ProxierHealth struct {
	timeout time.Duration
	pending func() time.Time
	now     func() time.Time
	obs     Observer

	mu sync.Mutex
	// lastUpdated is when the last successful sync ended (when the health
	// started, before the first one), as kube-proxy reports it.
	lastUpdated time.Time
	// lastResult is when the last sync, successful or not, ended.
	lastResult time.Time
	// unsynced is the oldest change known not to be in the kernel: seen
	// pending by a request, or carried by a failed sync.
	unsynced     time.Time
	nodeEligible bool
	// families are the IP families the last sync programmed ("IPv4",
	// "IPv6"), for the per-family status of the answers.
	families []string
}

// NewProxierHealth starts healthy and eligible, as kube-proxy does while it
// starts up.
func NewProxierHealth(o ProxierHealthOptions) *ProxierHealth {
	h := &ProxierHealth{
		timeout:      o.Timeout,
		pending:      o.Pending,
		now:          o.Now,
		obs:          o.Observer,
		nodeEligible: true,
	}
	if h.now == nil {
		h.now = time.Now
	}
	if h.pending == nil {
		h.pending = func() time.Time { return time.Time{} }
	}
	h.lastUpdated = h.now()
	return h
}

// OnSync records one sync; register it with proxy.Proxier.OnSync.
func (h *ProxierHealth) OnSync(res proxy.SyncResult) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastResult = res.End
	if res.Snapshot != nil {
		h.nodeEligible = res.Snapshot.Node.Eligible
	}
	var families []string
	for _, r := range res.Results {
		if f := r.Family.String(); !slices.Contains(families, f) {
			families = append(families, f)
		}
	}
	if len(families) > 0 {
		h.families = families
	}
	if res.Err == nil {
		h.lastUpdated = res.End
		// The sync took every change that had arrived when it started.
		if !h.unsynced.IsZero() && h.unsynced.Before(res.Start) {
			h.unsynced = time.Time{}
		}
		return
	}
	since := res.QueuedSince
	if since.IsZero() {
		since = res.Start
	}
	h.unsynced = earliest(h.unsynced, since)
}

// IsHealthy says whether the rules are up to date, ignoring the Node's
// eligibility: this is the serviceProxyHealthy of the healthCheckNodePort
// answers, as in kube-proxy.
func (h *ProxierHealth) IsHealthy() bool {
	healthy, _, _, _ := h.state()
	return healthy
}

func (h *ProxierHealth) state() (healthy bool, lastUpdated, now time.Time, eligible bool) {
	pending := h.pending()
	now = h.now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if !pending.IsZero() {
		// Remember it: the sync that takes it may never finish.
		h.unsynced = earliest(h.unsynced, pending)
	}
	healthy = true
	if !h.unsynced.IsZero() && now.Sub(h.unsynced) >= h.timeout {
		healthy = false
	}
	if !h.lastResult.IsZero() && now.Sub(h.lastResult) >= h.timeout {
		healthy = false
	}
	return healthy, h.lastUpdated, now, h.nodeEligible
}

// familyHealth is one IP family's part of an answer.
type familyHealth struct {
	LastUpdated time.Time `json:"lastUpdated"`
	Healthy     bool      `json:"healthy"`
}

// healthBody is kube-proxy 1.37's answer of /healthz and /livez, field
// for field (its JSON encoding included).
type healthBody struct {
	LastUpdated  time.Time               `json:"lastUpdated"`
	CurrentTime  time.Time               `json:"currentTime"`
	NodeEligible *bool                   `json:"nodeEligible,omitempty"`
	Healthy      bool                    `json:"healthy"`
	Status       map[string]familyHealth `json:"status,omitempty"`
}

// body is the answer for the current state; eligible is nil for /livez.
func (h *ProxierHealth) body(healthy bool, last, now time.Time, eligible *bool) healthBody {
	h.mu.Lock()
	families := slices.Clone(h.families)
	h.mu.Unlock()
	b := healthBody{LastUpdated: last, CurrentTime: now, NodeEligible: eligible, Healthy: healthy}
	// One sync loop programs every family, so each family's status is
	// the loop's (kube-proxy runs a loop per family).
	for _, f := range families {
		if b.Status == nil {
			b.Status = map[string]familyHealth{}
		}
		b.Status[f] = familyHealth{LastUpdated: last, Healthy: healthy}
	}
	if healthy && (eligible == nil || *eligible) {
		// kube-proxy's compatibility rule: while healthy, the top-level
		// lastUpdated is the current time (old clients compare the two).
		b.LastUpdated = now
	}
	return b
}

// Handler serves /healthz and /livez (other paths: 404), as kube-proxy
// 1.37's healthz server does.
//
// /healthz answers 200 when the proxy is healthy and the node eligible, 503
// otherwise, with kube-proxy 1.37's JSON: lastUpdated, currentTime,
// nodeEligible, healthy, and per IP family lastUpdated and healthy. /livez
// ignores eligibility and leaves nodeEligible out. While healthy, the
// top-level lastUpdated is the current time, as kube-proxy keeps it for old
// clients that compare the two. Both set Content-Type application/json and
// X-Content-Type-Options nosniff.
func (h *ProxierHealth) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		healthy, last, now, eligible := h.state()
		code := writeHealthHeader(w, healthy && eligible)
		out, _ := json.Marshal(h.body(healthy, last, now, &eligible))
		w.Write(out)
		if h.obs != nil {
			h.obs.ObserveHealthz(code)
		}
	})
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) {
		healthy, last, now, _ := h.state()
		code := writeHealthHeader(w, healthy)
		out, _ := json.Marshal(h.body(healthy, last, now, nil))
		w.Write(out)
		if h.obs != nil {
			h.obs.ObserveLivez(code)
		}
	})
	return mux
}

func writeHealthHeader(w http.ResponseWriter, ok bool) int {
	code := http.StatusOK
	if !ok {
		code = http.StatusServiceUnavailable
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	return code
}

// earliest returns the earlier of two times, treating zero as "none".
func earliest(a, b time.Time) time.Time {
	switch {
	case a.IsZero():
		return b
	case b.IsZero() || a.Before(b):
		return a
	default:
		return b
	}
}
