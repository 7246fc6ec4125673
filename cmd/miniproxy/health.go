package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"strconv"
	"time"

	"k8s.io/client-go/tools/record"

	"github.com/miniproxy/miniproxy/pkg/config"
	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/healthcheck"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// The kube-proxy ports the two servers default to.
const (
	defaultHealthzPort = 10256
	defaultMetricsPort = 10249
)

// healthOptions are the settings of the healthz and metrics servers, with
// kube-proxy's names and defaults, and what else startHealth needs to know
// of the node.
type healthOptions struct {
	healthzBindAddress string
	metricsBindAddress string
	// profiling is --profiling: /debug/pprof on the metrics address.
	profiling bool
	// config is the effective configuration, for /configz (none when nil).
	config *config.Config
	// syncPeriod is --iptables-sync-period; the proxy is unhealthy when a
	// change waits twice as long.
	syncPeriod time.Duration
	// nodePortAddresses is --nodeport-addresses resolved (nil: every
	// address), where healthCheckNodePorts listen.
	nodePortAddresses []netip.Prefix
	// localAddresses lists the node's addresses of one family; required
	// with nodePortAddresses.
	localAddresses proxy.AddrLister
	// retry is how often a server port that cannot be opened is tried
	// again (kube-proxy's 5 s when zero).
	retry time.Duration
	// bindAddressHardFail is --bind-address-hard-fail: a server port that
	// cannot be opened is fatal instead of retried.
	bindAddressHardFail bool
	// runner reads the kernel's rules for the /debug/ endpoints of the
	// metrics server; nil serves none.
	runner dataplane.Runner
}

// newHealthOptions takes the servers' settings from the effective
// configuration; nodePortAddresses and localAddresses are the node's, as
// in healthOptions.
func newHealthOptions(c *config.Config, nodePortAddresses []netip.Prefix, localAddresses proxy.AddrLister, runner dataplane.Runner) healthOptions {
	return healthOptions{
		healthzBindAddress:  c.HealthzBindAddress,
		metricsBindAddress:  c.MetricsBindAddress,
		profiling:           c.EnableProfiling,
		config:              c,
		syncPeriod:          c.SyncPeriod,
		nodePortAddresses:   nodePortAddresses,
		localAddresses:      localAddresses,
		bindAddressHardFail: c.BindAddressHardFail,
		runner:              runner,
	}
}

// healthServers are the health checks startHealth serves; onSync feeds
// them, and the metrics, one sync.
type healthServers struct {
	proxier  *healthcheck.ProxierHealth
	services *healthcheck.ServiceHealth
	metrics  *metrics.Metrics
	debug    *debugServer // nil without a runner
}

// onSync hands res to the proxier's health first, so that the Service
// answers of this very sync see it; then to the Service ports; then to
// the numbers. Register it with proxy.Proxier.OnSync.
func (s *healthServers) onSync(res proxy.SyncResult) {
	s.proxier.OnSync(res)
	s.services.OnSync(res)
	s.metrics.OnSync(res)
	if s.debug != nil {
		s.debug.onSync(res)
	}
}

// startHealth starts the healthz server, the metrics server (serving m)
// and the healthCheckNodePort listeners, which follow the syncs handed to
// the returned servers' onSync. It returns an error when a setting is
// invalid, and, with --bind-address-hard-fail, when the healthz or metrics
// port cannot be opened (naming the address and the error; the daemon
// exits 1). Without that flag, such a port is logged and retried every 5
// s, as kube-proxy does (proxying matters more than probes). A Service's
// healthCheckNodePort that cannot be opened is reported on the Service and
// retried at every sync. Everything stops when ctx ends.
//
// pending is the tracker's OldestPending; recorder receives Warning events
// on Services whose port is taken.
func startHealth(ctx context.Context, o healthOptions, m *metrics.Metrics, pending func() time.Time,
	recorder record.EventRecorder, log *slog.Logger) (*healthServers, error) {
	if o.syncPeriod <= 0 {
		return nil, fmt.Errorf("start health servers: the sync period is not set")
	}
	healthzAddr, err := bindAddress("healthz-bind-address", o.healthzBindAddress, defaultHealthzPort)
	if err != nil {
		return nil, err
	}
	metricsAddr, err := bindAddress("metrics-bind-address", o.metricsBindAddress, defaultMetricsPort)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}

	s := &healthServers{metrics: m}
	s.proxier = healthcheck.NewProxierHealth(healthcheck.ProxierHealthOptions{
		Timeout:  2 * o.syncPeriod,
		Pending:  pending,
		Observer: m,
	})
	s.services = healthcheck.NewServiceHealth(healthcheck.ServiceHealthOptions{
		NodePortAddresses: o.nodePortAddresses,
		LocalAddresses:    bothFamilies(o.localAddresses),
		ProxyHealthy:      s.proxier.IsHealthy,
		Recorder:          recorder,
		Log:               log,
	})

	retry := o.retry
	if retry <= 0 {
		retry = 5 * time.Second
	}
	listen := func(name, addr string, h http.Handler) error {
		if addr == "" {
			return nil
		}
		if !o.bindAddressHardFail {
			healthcheck.KeepServing(ctx, name, addr, h, retry, log)
			return nil
		}
		if _, err := healthcheck.Serve(ctx, name, addr, h, log); err != nil {
			return &hardFailure{reason: hardFailReasons[name], err: err}
		}
		return nil
	}
	if err := listen("healthz", healthzAddr, s.proxier.Handler()); err != nil {
		return nil, err
	}
	metricsHandler := withConfigz(withProfiling(m.Handler(), o.profiling), o.config)
	if o.runner != nil {
		s.debug = &debugServer{runner: o.runner, addrs: bothFamilies(o.localAddresses)}
		metricsHandler = s.debug.handler(metricsHandler)
	}
	if err := listen("metrics", metricsAddr, metricsHandler); err != nil {
		return nil, err
	}
	go func() {
		<-ctx.Done()
		s.services.Close()
	}()
	return s, nil
}

// bothFamilies lists the node's addresses of both families through list
// (nil when list is).
func bothFamilies(list proxy.AddrLister) func() ([]netip.Addr, error) {
	if list == nil {
		return nil
	}
	return func() ([]netip.Addr, error) {
		var all []netip.Addr
		for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
			a, err := list(fam)
			if err != nil {
				return nil, err
			}
			all = append(all, a...)
		}
		return all, nil
	}
}

// hardFailReasons are the reasons of kube-proxy's Warning event on its Node
// when --bind-address-hard-fail stops it, by server.
var hardFailReasons = map[string]string{
	"healthz": "FailedToStartProxierHealthcheck",
	"metrics": "FailedToStartMetricServer",
}

// hardFailure is a healthz or metrics port that could not be opened under
// --bind-address-hard-fail: the daemon reports it on its Node, as
// kube-proxy does, and exits 1.
type hardFailure struct {
	reason string // the Node event's reason
	err    error
}

func (e *hardFailure) Error() string {
	return e.err.Error() + " (--bind-address-hard-fail makes this fatal)"
}

func (e *hardFailure) Unwrap() error { return e.err }

// bindAddress checks a bind address flag and gives the address to listen
// on: "" stays "" (disabled), a bare IP gets the default port, ip:port and
// [ipv6]:port are kept, ":port" means every address. Port 0 is refused
// (use an empty value to disable a server).
func bindAddress(flagName, v string, defaultPort int) (string, error) {
	if v == "" {
		return "", nil
	}
	if ip, err := netip.ParseAddr(v); err == nil {
		return netip.AddrPortFrom(ip, uint16(defaultPort)).String(), nil
	}
	host, port, err := net.SplitHostPort(v)
	if err != nil {
		return "", fmt.Errorf("%w: --%s %q: want ip:port or ip", errUsage, flagName, v)
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil {
			return "", fmt.Errorf("%w: --%s %q: %q is not an IP address", errUsage, flagName, v, host)
		}
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("%w: --%s %q: port must be 1..65535 (an empty value disables the server)", errUsage, flagName, v)
	}
	return net.JoinHostPort(host, port), nil
}

// withConfigz serves /configz as kube-proxy does: the effective
// configuration as a KubeProxyConfiguration under the key of its API
// group, so that an operator sees what flags and file made of it.
func withConfigz(h http.Handler, c *config.Config) http.Handler {
	if c == nil {
		return h
	}
	body, err := json.Marshal(map[string]any{"kubeproxy.config.k8s.io": c.KubeProxyConfiguration()})
	if err != nil {
		body = []byte(fmt.Sprintf(`{"error": %q}`, err.Error()))
	}
	mux := http.NewServeMux()
	mux.Handle("/", h)
	mux.HandleFunc("/configz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Write(body)
	})
	return mux
}

// withProfiling adds Go's profiling handlers to the metrics server when
// asked, as kube-proxy does, so that an operator can see where a node's
// proxy spends memory or CPU (the metrics address is loopback by default).
func withProfiling(h http.Handler, on bool) http.Handler {
	if !on {
		return h
	}
	mux := http.NewServeMux()
	mux.Handle("/", h)
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}
