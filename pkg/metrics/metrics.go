// Package metrics exports what the sync loop does in Prometheus format, under
// kube-proxy's metric names, so that dashboards and alerts written for
// kube-proxy work unchanged on miniproxy. It also serves the metrics port's
// other answers (/proxyMode, /healthz).
//
// Every value comes from something that happened: a SyncResult handed to
// OnSync (which carries what the loop measured around each apply), a
// probe answered by the health server, or the change tracker's counters
// read at scrape time. Nothing here reaches into the loop or the
// dataplane: the metrics only read what they are given. Each
// Metrics has its own registry; the one package-level state is the
// rest_client_* collectors, because client-go takes one set of metric hooks
// per process (HookClientGo), and every registry serves them.
package metrics

import (
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// ProxyMode is what /proxyMode answers: the kube-proxy mode miniproxy
// replaces, which is what scripts that check a node's proxy mode expect.
const ProxyMode = "iptables"

// The label values of kubeproxy_sync_proxy_rules_no_local_endpoints_total,
// as kube-proxy spells them.
const (
	PolicyInternal = "internal"
	PolicyExternal = "external"
)

// ipFamily is the label kube-proxy puts on the metrics of each proxier
// ("IPv4", "IPv6").
const ipFamily = "ip_family"

// syncBuckets are kube-proxy's buckets for sync durations: 1 ms doubling up
// to about 16 s.
var syncBuckets = prometheus.ExponentialBuckets(0.001, 2, 15)

// networkProgrammingBuckets are kube-proxy's buckets for
// network_programming_duration_seconds: 0 (kept from its bucket merge
// helper), 0.25 s, 0.5 s, every second to 59 s, every 5 s to 115 s, every
// 30 s to 5 min.
var networkProgrammingBuckets = func() []float64 {
	b := []float64{0}
	b = append(b, prometheus.LinearBuckets(0.25, 0.25, 2)...)
	b = append(b, prometheus.LinearBuckets(1, 1, 59)...)
	b = append(b, prometheus.LinearBuckets(60, 5, 12)...)
	b = append(b, prometheus.LinearBuckets(120, 30, 7)...)
	return b
}()

// ChangeCounter is what the metrics read from the change tracker when they
// are scraped; *endpoints.Tracker implements it. It is an interface so that
// the metrics need not own the tracker.
type ChangeCounter interface {
	ServiceChangesTotal() int64
	EndpointChangesTotal() int64
	PendingChanges() (services, endpoints int)
}

var _ ChangeCounter = (*endpoints.Tracker)(nil)

// alpha is how kube-proxy's metrics framework (component-base) starts the
// help of an ALPHA metric; BETA ones start with beta.
const (
	alpha = "[ALPHA] "
	beta  = "[BETA] "
)

// alphaOpts names one of kube-proxy's ALPHA families with its full name
// and help, the help marked as component-base marks it, so that each
// declaration reads as kube-proxy's does.
func alphaOpts(name, help string) prometheus.Opts {
	return prometheus.Opts{Name: name, Help: alpha + help}
}

// ownOpts names one of miniproxy's own families (miniproxy_*), which have
// no stability mark.
func ownOpts(name, help string) prometheus.Opts {
	return prometheus.Opts{Namespace: "miniproxy", Name: name, Help: help}
}

// histogramOpts are o with buckets.
func histogramOpts(o prometheus.Opts, buckets []float64) prometheus.HistogramOpts {
	return prometheus.HistogramOpts{Namespace: o.Namespace, Subsystem: o.Subsystem, Name: o.Name, Help: o.Help, ConstLabels: o.ConstLabels, Buckets: buckets}
}

// histogramVec, gaugeVec and counterVec make a family from its options and
// label names, so that a declaration is one line.
func histogramVec(o prometheus.Opts, buckets []float64, labels ...string) *prometheus.HistogramVec {
	return prometheus.NewHistogramVec(histogramOpts(o, buckets), labels)
}

func gaugeVec(o prometheus.Opts, labels ...string) *prometheus.GaugeVec {
	return prometheus.NewGaugeVec(prometheus.GaugeOpts(o), labels)
}

func counterVec(o prometheus.Opts, labels ...string) *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts(o), labels)
}

// Metrics holds miniproxy's metrics and the registry that serves them. Its
// methods are safe for concurrent use: OnSync runs in the sync loop, the
// Observe methods in HTTP handlers, scrapes in the metrics server.
//
// kube-proxy runs one proxier per IP family and labels its sync metrics
// with ip_family ("IPv4", "IPv6"); miniproxy's one loop programs every
// family, and records each sync once for each family it applied.
type Metrics struct {
	reg *prometheus.Registry
	now func() time.Time
	log *slog.Logger

	syncDuration           *prometheus.HistogramVec
	syncFullDuration       *prometheus.HistogramVec
	syncPartialDuration    *prometheus.HistogramVec
	networkProgramming     *prometheus.HistogramVec
	lastSync               *prometheus.GaugeVec
	lastQueued             *prometheus.GaugeVec
	restoreFailures        *prometheus.CounterVec
	partialRestoreFailures *prometheus.CounterVec
	rulesTotal             *prometheus.GaugeVec
	rulesLast              *prometheus.GaugeVec
	noLocalEndpoints       *prometheus.GaugeVec
	conntrackDuration      *prometheus.HistogramVec
	conntrackDeleted       *prometheus.CounterVec
	healthz                *prometheus.CounterVec
	livez                  *prometheus.CounterVec

	restoreBytes    *prometheus.GaugeVec
	rulesWritten    *prometheus.GaugeVec
	chainsWritten   *prometheus.GaugeVec
	restoreDuration *prometheus.HistogramVec
	applyCPU        *prometheus.HistogramVec
	refused         prometheus.Gauge

	mu             sync.Mutex
	lastQueuedTime time.Time
	// families are the IP families this node programs, from
	// Options.Families and from the syncs' results.
	families map[iptables.Family]bool
	// tables remembers, per family, the tables whose rule count was set, so
	// that a table that disappears from the ruleset drops to 0.
	tables  map[string]map[string]bool
	tracked bool
}

// Options tune New; the zero value is the daemon's setting.
type Options struct {
	// Now is the clock (time.Now when nil); tests inject their own.
	Now func() time.Time
	// Log receives errors met while serving /metrics (discarded when nil).
	Log *slog.Logger
	// NoProcessMetrics leaves out the process_* and go_* metrics that
	// kube-proxy also exports; tests use it to keep their output small.
	NoProcessMetrics bool
	// Build is what kubernetes_build_info says of this binary; its Go
	// version, compiler and platform are the running ones when empty.
	Build BuildInfo
	// Families are the IP families this node programs, known before the
	// first sync, so that their last-queued timestamps are exported from
	// the start, as kube-proxy's proxier of each family exports its own.
	Families []iptables.Family
}

// New creates the metrics with their registry. The last-queued timestamp
// starts at the creation time, as kube-proxy sets it when its loop starts;
// it is exported for each family once the family is known.
func New(o Options) *Metrics {
	now := o.Now
	if now == nil {
		now = time.Now
	}
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Metrics{
		reg:      prometheus.NewRegistry(),
		now:      now,
		log:      log,
		families: map[iptables.Family]bool{},
		tables:   map[string]map[string]bool{},

		syncDuration:           histogramVec(alphaOpts("kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds"), syncBuckets, ipFamily),
		syncFullDuration:       histogramVec(alphaOpts("kubeproxy_sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs"), syncBuckets, ipFamily),
		syncPartialDuration:    histogramVec(alphaOpts("kubeproxy_sync_partial_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for partial resyncs"), syncBuckets, ipFamily),
		networkProgramming:     histogramVec(alphaOpts("kubeproxy_network_programming_duration_seconds", "In Cluster Network Programming Latency in seconds"), networkProgrammingBuckets, ipFamily),
		lastSync:               gaugeVec(alphaOpts("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced"), ipFamily),
		lastQueued:             gaugeVec(alphaOpts("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "The last time a sync of proxy rules was queued"), ipFamily),
		restoreFailures:        counterVec(alphaOpts("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", "Cumulative proxy iptables restore failures"), ipFamily),
		partialRestoreFailures: counterVec(alphaOpts("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", "Cumulative proxy iptables partial restore failures"), ipFamily),
		rulesTotal:             gaugeVec(alphaOpts("kubeproxy_sync_proxy_rules_iptables_total", "Total number of iptables rules owned by kube-proxy"), "table", ipFamily),
		rulesLast:              gaugeVec(alphaOpts("kubeproxy_sync_proxy_rules_iptables_last", "Number of iptables rules written by kube-proxy in last sync"), "table", ipFamily),
		noLocalEndpoints:       gaugeVec(alphaOpts("kubeproxy_sync_proxy_rules_no_local_endpoints_total", "Number of services with a Local traffic policy and no endpoints"), "traffic_policy", ipFamily),
		conntrackDuration:      histogramVec(alphaOpts("kubeproxy_conntrack_reconciler_sync_duration_seconds", "ReconcileConntrackFlowsLatency latency in seconds"), syncBuckets, ipFamily),
		conntrackDeleted:       counterVec(alphaOpts("kubeproxy_conntrack_reconciler_deleted_entries_total", "Cumulative conntrack flows deleted by conntrack reconciler"), ipFamily),
		healthz:                counterVec(alphaOpts("kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status"), "code"),
		livez:                  counterVec(alphaOpts("kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status"), "code"),

		restoreBytes:    gaugeVec(ownOpts("sync_restore_bytes", "Size of the iptables-restore input of the last sync (0 when nothing had changed)"), ipFamily),
		rulesWritten:    gaugeVec(ownOpts("sync_rules_written", "Rules in the iptables-restore input of the last sync"), ipFamily),
		chainsWritten:   gaugeVec(ownOpts("sync_chains_written", "Chains written by the iptables-restore input of the last sync"), ipFamily),
		restoreDuration: histogramVec(ownOpts("sync_restore_duration_seconds", "Time iptables-restore took, per sync that ran it"), syncBuckets, ipFamily),
		applyCPU:        histogramVec(ownOpts("sync_apply_cpu_seconds", "CPU time (user+system, this process and its iptables children) consumed while applying one family's rules"), syncBuckets, ipFamily),
		refused:         prometheus.NewGauge(prometheus.GaugeOpts(ownOpts("refused_services", "Services whose latest rules the kernel refuses; they keep their last accepted rules (none if they never had any) while every other Service is programmed"))),
	}
	m.reg.MustRegister(
		m.syncDuration, m.syncFullDuration, m.syncPartialDuration, m.networkProgramming,
		m.lastSync, m.lastQueued, m.restoreFailures, m.partialRestoreFailures,
		m.rulesTotal, m.rulesLast, m.noLocalEndpoints, m.conntrackDuration, m.conntrackDeleted,
		m.healthz, m.livez,
		m.restoreBytes, m.rulesWritten, m.chainsWritten, m.restoreDuration, m.applyCPU, m.refused,
		o.Build.collector(),
	)
	m.reg.MustRegister(restClient.collectors()...)
	if !o.NoProcessMetrics {
		m.reg.MustRegister(
			collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
			collectors.NewGoCollector(),
		)
	}
	m.setLastQueued(now())
	for _, fam := range o.Families {
		m.learnFamily(fam)
	}
	return m
}

// TrackChanges exports the tracker's event counters and pending changes
// (kubeproxy_sync_proxy_rules_{service,endpoint}_changes_{total,pending}),
// read at every scrape. Call it once; later calls do nothing.
func (m *Metrics) TrackChanges(c ChangeCounter) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.tracked {
		return
	}
	m.tracked = true
	m.reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts(alphaOpts("kubeproxy_sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes")),
			func() float64 { return float64(c.ServiceChangesTotal()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts(alphaOpts("kubeproxy_sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes")),
			func() float64 { return float64(c.EndpointChangesTotal()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts(alphaOpts("kubeproxy_sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes")),
			func() float64 { s, _ := c.PendingChanges(); return float64(s) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts(alphaOpts("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes")),
			func() float64 { _, e := c.PendingChanges(); return float64(e) }),
	)
}

// ChangeQueued records that a change arrived and a sync was asked for
// (kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds, for every
// family: one loop syncs them all). It never blocks for long, so it may be
// called from an informer handler.
func (m *Metrics) ChangeQueued() { m.setLastQueued(m.now()) }

func (m *Metrics) setLastQueued(t time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if t.After(m.lastQueuedTime) {
		m.lastQueuedTime = t
		for fam := range m.families {
			m.lastQueued.WithLabelValues(fam.String()).Set(seconds(t))
		}
	}
}

// learnFamily notes that this node programs fam; its last-queued timestamp
// starts at the latest change (or the creation time), as kube-proxy's
// proxier of that family sets it when its loop starts.
func (m *Metrics) learnFamily(fam iptables.Family) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.families[fam] {
		return
	}
	m.families[fam] = true
	m.lastQueued.WithLabelValues(fam.String()).Set(seconds(m.lastQueuedTime))
}

// syncFamilies gives the families a sync applied, in order, and whether
// each was written in full; a sync that failed before applying anything
// counts for every family known.
func (m *Metrics) syncFamilies(res proxy.SyncResult) ([]iptables.Family, map[iptables.Family]bool) {
	full := map[iptables.Family]bool{}
	var fams []iptables.Family
	for _, r := range res.Results {
		if _, seen := full[r.Family]; !seen {
			fams = append(fams, r.Family)
		}
		full[r.Family] = full[r.Family] || r.Full
		m.learnFamily(r.Family)
	}
	if len(fams) == 0 {
		m.mu.Lock()
		for fam := range m.families {
			fams = append(fams, fam)
			full[fam] = false
		}
		m.mu.Unlock()
		slices.Sort(fams)
	}
	return fams, full
}

// OnSync records one sync; register it with proxy.Proxier.OnSync.
//
// Every sync, failed or not, is timed once for each family it applied (as
// kube-proxy times every run of each family's proxier), start to end of the
// whole sync: full for a family written in full, partial otherwise. Every
// failed apply of a family counts as a restore failure, those that led to
// finding a refused Service included, and as a partial restore failure when
// the apply was partial. Only a successful sync moves the last-sync
// timestamps, observes the network programming latency (from the oldest
// change it carried to its end, once for each family whose rules it wrote,
// or for every family when it wrote none) and recounts the Services without
// local endpoints. Every sync sets the count of refused Services. Every
// apply's CPU time is observed, and every successful apply sets the rule
// count of each table it counted.
func (m *Metrics) OnSync(res proxy.SyncResult) {
	d := res.End.Sub(res.Start).Seconds()
	fams, full := m.syncFamilies(res)
	for _, fam := range fams {
		f := fam.String()
		m.syncDuration.WithLabelValues(f).Observe(d)
		if full[fam] {
			m.syncFullDuration.WithLabelValues(f).Observe(d)
		} else {
			m.syncPartialDuration.WithLabelValues(f).Observe(d)
		}
	}
	if !res.QueuedSince.IsZero() {
		m.setLastQueued(res.QueuedSince)
	}
	wrote := map[iptables.Family]bool{}
	for _, r := range res.Results {
		fam := r.Family.String()
		m.applyCPU.WithLabelValues(fam).Observe(r.CPU.Seconds())
		if !r.Failed && r.TableRules != nil {
			m.setRuleCounts(r.Family, r.TableRules)
		}
		m.restoreBytes.WithLabelValues(fam).Set(float64(r.Bytes))
		m.rulesWritten.WithLabelValues(fam).Set(float64(r.RulesWritten))
		m.chainsWritten.WithLabelValues(fam).Set(float64(r.ChainsWritten))
		for table, n := range r.TableRulesWritten {
			m.rulesLast.WithLabelValues(table, fam).Set(float64(n))
		}
		if r.Bytes > 0 {
			m.restoreDuration.WithLabelValues(fam).Observe(r.RestoreDuration.Seconds())
			if !r.Failed {
				wrote[r.Family] = true
			}
		}
		if r.Failed {
			m.restoreFailures.WithLabelValues(fam).Inc()
			if !r.Full {
				m.partialRestoreFailures.WithLabelValues(fam).Inc()
			}
		}
	}
	for _, c := range res.Conntrack {
		m.conntrackDuration.WithLabelValues(c.Family.String()).Observe(c.Duration.Seconds())
		m.conntrackDeleted.WithLabelValues(c.Family.String()).Add(float64(c.Deleted))
	}
	m.refused.Set(float64(len(res.Refusals)))
	if res.Err != nil {
		return
	}
	for _, fam := range fams {
		m.lastSync.WithLabelValues(fam.String()).Set(seconds(res.End))
		if !res.QueuedSince.IsZero() && (wrote[fam] || len(wrote) == 0) {
			m.networkProgramming.WithLabelValues(fam.String()).Observe(max(res.End.Sub(res.QueuedSince).Seconds(), 0))
		}
	}
	if res.Snapshot != nil {
		counts := NoLocalEndpoints(res.Snapshot)
		for _, fam := range fams {
			c := counts[fam]
			m.noLocalEndpoints.WithLabelValues(PolicyInternal, fam.String()).Set(float64(c.Internal))
			m.noLocalEndpoints.WithLabelValues(PolicyExternal, fam.String()).Set(float64(c.External))
		}
	}
}

// setRuleCounts sets the rule count of every table an apply counted, and 0
// for tables of an earlier apply that this one no longer has
// (kubeproxy_sync_proxy_rules_iptables_total).
func (m *Metrics) setRuleCounts(fam iptables.Family, counts map[string]int) {
	f := fam.String()
	m.mu.Lock()
	defer m.mu.Unlock()
	seen := m.tables[f]
	if seen == nil {
		seen = map[string]bool{}
		m.tables[f] = seen
	}
	for t := range seen {
		if _, ok := counts[t]; !ok {
			m.rulesTotal.WithLabelValues(t, f).Set(0)
		}
	}
	for t, n := range counts {
		seen[t] = true
		m.rulesTotal.WithLabelValues(t, f).Set(float64(n))
	}
}

// ObserveHealthz counts one answer of the proxier's /healthz
// (kubeproxy_proxy_healthz_total{code}).
func (m *Metrics) ObserveHealthz(code int) {
	m.healthz.WithLabelValues(fmt.Sprint(code)).Inc()
}

// ObserveLivez counts one answer of the proxier's /livez
// (kubeproxy_proxy_livez_total{code}).
func (m *Metrics) ObserveLivez(code int) {
	m.livez.WithLabelValues(fmt.Sprint(code)).Inc()
}

// Registry gives the registry, for tests and for whoever wants to add a
// metric of their own.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the metrics port as kube-proxy does: /metrics in
// Prometheus format, /proxyMode answering "iptables", /healthz answering
// "ok" (the metrics server is up; the proxier's health is on the healthz
// port).
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorLog:      slogPrinter{m.log},
		ErrorHandling: promhttp.ContinueOnError,
	}))
	mux.HandleFunc("/proxyMode", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		fmt.Fprint(w, ProxyMode)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		fmt.Fprint(w, "ok")
	})
	return mux
}

// LocalPolicyCounts are the service ports of one family whose Local
// traffic policy finds no endpoint on this node.
type LocalPolicyCounts struct{ Internal, External int }

// NoLocalEndpoints counts, per IP family, the service ports whose internal
// or external traffic policy is Local while this node has no endpoint of
// that family that traffic may use, as kube-proxy's proxier of each family
// counts no_local_endpoints_total: the local ready endpoints, or, when none
// is ready, the local serving-and-terminating ones (the same fallback the
// rules use). A service port counts in the families of its ClusterIPs (a
// dual-stack Service in both, as in both of kube-proxy's proxiers). The
// external policy only counts for ports reachable from outside.
func NoLocalEndpoints(snap *endpoints.Snapshot) map[iptables.Family]LocalPolicyCounts {
	out := map[iptables.Family]LocalPolicyCounts{}
	for name, svc := range snap.Services {
		extLocal := svc.ExternalPolicyLocal && svc.ExternallyAccessible()
		if !svc.InternalPolicyLocal && !extLocal {
			continue
		}
		for _, ip := range svc.ClusterIPs {
			fam := iptables.FamilyOf(ip)
			if hasLocalEndpoint(snap.Endpoints[name], fam) {
				continue
			}
			c := out[fam]
			if svc.InternalPolicyLocal {
				c.Internal++
			}
			if extLocal {
				c.External++
			}
			out[fam] = c
		}
	}
	return out
}

func hasLocalEndpoint(eps []endpoints.Endpoint, fam iptables.Family) bool {
	for _, ep := range eps {
		if ep.Local && iptables.FamilyOf(ep.IP) == fam && ep.Usable() {
			return true
		}
	}
	return false
}

func seconds(t time.Time) float64 {
	return float64(t.UnixNano()) / 1e9
}

// slogPrinter lets promhttp report scrape errors through slog.
type slogPrinter struct{ log *slog.Logger }

func (p slogPrinter) Println(v ...any) {
	p.log.Error("serving metrics", "err", fmt.Sprint(v...))
}
