package metrics

import (
	"context"
	"math"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientmetrics "k8s.io/client-go/tools/metrics"
)

// restClientMetrics are the rest_client_* families that kube-proxy exports
// through component-base's hooks into client-go (k8s.io/client-go/tools/metrics):
// the same names, types, label names, buckets and help, fed by the same
// hooks. client-go has one set of hooks per process, so these collectors
// are the one piece of package state here; every Metrics registry serves
// them. Two hooks component-base sets are not served by kube-proxy either
// (it never registers them): DNS resolution latency and exec plugin policy
// calls; they stay client-go's no-ops here.
type restClientMetrics struct {
	requestLatency     *prometheus.HistogramVec
	requestSize        *prometheus.HistogramVec
	responseSize       *prometheus.HistogramVec
	rateLimiterLatency *prometheus.HistogramVec
	requestResult      *prometheus.CounterVec
	requestRetry       *prometheus.CounterVec
	execPluginTTL      prometheus.GaugeFunc
	execCertRotation   prometheus.Histogram
	execPluginCalls    *prometheus.CounterVec
	transportEntries   prometheus.Gauge
	transportCreates   *prometheus.CounterVec
	transportCAReloads *prometheus.CounterVec
	certRotationGC     prometheus.Counter
	transportCacheGC   *prometheus.CounterVec

	mu     sync.Mutex
	expiry *time.Time
}

var (
	latencyBuckets = []float64{0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0}
	sizeBuckets    = []float64{64, 256, 512, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216}
	// rotationBuckets: 10 and 30 minutes, 1 and 4 hours, a day, a week, 1,
	// 3 and 6 months, 1 and 4 years.
	rotationBuckets = []float64{600, 1800, 3600, 14400, 86400, 604800, 2592000, 7776000, 15552000, 31104000, 124416000}
)

var restClient = newRESTClientMetrics()

func newRESTClientMetrics() *restClientMetrics {
	r := &restClientMetrics{
		requestLatency:     histogramVec(alphaOpts("rest_client_request_duration_seconds", "Request latency in seconds. Broken down by verb, and host."), latencyBuckets, "verb", "host"),
		requestSize:        histogramVec(alphaOpts("rest_client_request_size_bytes", "Request size in bytes. Broken down by verb and host."), sizeBuckets, "verb", "host"),
		responseSize:       histogramVec(alphaOpts("rest_client_response_size_bytes", "Response size in bytes. Broken down by verb and host."), sizeBuckets, "verb", "host"),
		rateLimiterLatency: histogramVec(alphaOpts("rest_client_rate_limiter_duration_seconds", "Client side rate limiter latency in seconds. Broken down by verb, and host."), latencyBuckets, "verb", "host"),
		requestResult:      counterVec(alphaOpts("rest_client_requests_total", "Number of HTTP requests, partitioned by status code, method, and host."), "code", "method", "host"),
		requestRetry:       counterVec(alphaOpts("rest_client_request_retries_total", "Number of request retries, partitioned by status code, verb, and host."), "code", "verb", "host"),
		execCertRotation: prometheus.NewHistogram(histogramOpts(alphaOpts("rest_client_exec_plugin_certificate_rotation_age",
			"Histogram of the number of seconds the last auth exec plugin client certificate lived before being rotated. "+
				"If auth exec plugin client certificates are unused, histogram will contain no data."), rotationBuckets)),
		execPluginCalls: counterVec(alphaOpts("rest_client_exec_plugin_call_total",
			"Number of calls to an exec plugin, partitioned by the type of event encountered (no_error, plugin_execution_error, "+
				"plugin_not_found_error, client_internal_error) and an optional exit code. The exit code will be set to 0 if and only if the plugin call was successful."),
			"code", "call_status"),
		transportEntries: prometheus.NewGauge(prometheus.GaugeOpts(alphaOpts("rest_client_transport_cache_entries", "Number of transport entries in the internal cache."))),
		transportCreates: counterVec(alphaOpts("rest_client_transport_create_calls_total",
			"Number of calls to get a new transport, partitioned by the result of the operation hit: obtained from the cache, "+
				"miss: created and added to the cache, miss-gc: recreated and added back to the cache after being garbage collected, uncacheable: created and not cached"),
			"result"),
		transportCAReloads: counterVec(alphaOpts("rest_client_transport_ca_reload_total",
			"Number of times a CA reload is attempted, partitioned by the result and reason for the reload attempt"), "result", "reason"),
		certRotationGC: prometheus.NewCounter(prometheus.CounterOpts(alphaOpts("rest_client_transport_cert_rotation_gc_calls_total",
			"Number of times a cert rotation goroutine cancel func is called via GC cleanup of the associated transport"))),
		transportCacheGC: counterVec(alphaOpts("rest_client_transport_cache_gc_calls_total",
			"Number of times a GC cleanup attempts to delete a transport cache entry, partitioned by the result: deleted, skipped"), "result"),
	}
	r.execPluginTTL = prometheus.NewGaugeFunc(prometheus.GaugeOpts(alphaOpts("rest_client_exec_plugin_ttl_seconds",
		"Gauge of the shortest TTL (time-to-live) of the client certificate(s) managed by the auth exec plugin. "+
			"The value is in seconds until certificate expiry (negative if already expired). "+
			"If auth exec plugins are unused or manage no TLS certificates, the value will be +INF.")), r.ttl)
	return r
}

func (r *restClientMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{
		r.requestLatency, r.requestSize, r.responseSize, r.rateLimiterLatency, r.requestResult, r.requestRetry,
		r.execPluginTTL, r.execCertRotation, r.execPluginCalls,
		r.transportEntries, r.transportCreates, r.transportCAReloads, r.certRotationGC, r.transportCacheGC,
	}
}

func (r *restClientMetrics) ttl() float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.expiry == nil {
		return math.Inf(1)
	}
	return time.Until(*r.expiry).Seconds()
}

var hookOnce sync.Once

// HookClientGo points client-go's metric hooks at the rest_client_*
// families. Call it before the first API client is made, so that no request
// goes uncounted; client-go accepts one set of hooks per process, and later
// calls do nothing.
func HookClientGo() {
	hookOnce.Do(func() {
		r := restClient
		clientmetrics.Register(clientmetrics.RegisterOpts{
			ClientCertExpiry:             expiryHook{r},
			ClientCertRotationAge:        durationHook{r.execCertRotation},
			RequestLatency:               latencyHook{r.requestLatency},
			RequestSize:                  sizeHook{r.requestSize},
			ResponseSize:                 sizeHook{r.responseSize},
			RateLimiterLatency:           latencyHook{r.rateLimiterLatency},
			RequestResult:                resultHook{r.requestResult},
			RequestRetry:                 resultHook{r.requestRetry},
			ExecPluginCalls:              execCallsHook{r.execPluginCalls},
			TransportCacheEntries:        cacheEntriesHook{r.transportEntries},
			TransportCreateCalls:         labelHook{r.transportCreates},
			TransportCAReloads:           caReloadHook{r.transportCAReloads},
			TransportCertRotationGCCalls: counterHook{r.certRotationGC},
			TransportCacheGCCalls:        labelHook{r.transportCacheGC},
		})
	})
}

type expiryHook struct{ r *restClientMetrics }

func (h expiryHook) Set(expiry *time.Time) {
	h.r.mu.Lock()
	defer h.r.mu.Unlock()
	h.r.expiry = expiry
}

type durationHook struct{ h prometheus.Histogram }

func (h durationHook) Observe(d time.Duration) { h.h.Observe(d.Seconds()) }

type latencyHook struct{ h *prometheus.HistogramVec }

func (h latencyHook) Observe(_ context.Context, verb string, u url.URL, d time.Duration) {
	h.h.WithLabelValues(verb, u.Host).Observe(d.Seconds())
}

type sizeHook struct{ h *prometheus.HistogramVec }

func (h sizeHook) Observe(_ context.Context, verb, host string, size float64) {
	h.h.WithLabelValues(verb, host).Observe(size)
}

// resultHook counts requests (code, method, host) and retries (code,
// verb, host: client-go passes the method, as component-base labels it).
type resultHook struct{ c *prometheus.CounterVec }

func (h resultHook) Increment(_ context.Context, code, method, host string) {
	h.c.WithLabelValues(code, method, host).Inc()
}

func (h resultHook) IncrementRetry(ctx context.Context, code, method, host string) {
	h.Increment(ctx, code, method, host)
}

type execCallsHook struct{ c *prometheus.CounterVec }

func (h execCallsHook) Increment(exitCode int, callStatus string) {
	h.c.WithLabelValues(strconv.Itoa(exitCode), callStatus).Inc()
}

type cacheEntriesHook struct{ g prometheus.Gauge }

func (h cacheEntriesHook) Observe(n int) { h.g.Set(float64(n)) }

type labelHook struct{ c *prometheus.CounterVec }

func (h labelHook) Increment(result string) { h.c.WithLabelValues(result).Inc() }

type caReloadHook struct{ c *prometheus.CounterVec }

func (h caReloadHook) Increment(result, reason string) { h.c.WithLabelValues(result, reason).Inc() }

type counterHook struct{ c prometheus.Counter }

func (h counterHook) Increment() { h.c.Inc() }
