// Command miniproxy is the node daemon: it replaces kube-proxy's iptables
// mode, watching Services, EndpointSlices and its own Node and keeping the
// node's iptables in step.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/miniproxy/miniproxy/pkg/config"
	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/features"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "miniproxy:", err)
		os.Exit(1)
	}
}

// run is miniproxy: --help and --version write to out and return nil; the
// one-shot modes (--write-config-to, --cleanup, --cleanup-kube-proxy,
// --init-only) do their one thing; `miniproxy explain ...` explains one
// packet (its own flags, none added to the daemon's); otherwise it serves
// until signalled.
func run(args []string, out io.Writer) error {
	if len(args) > 0 && args[0] == explainCommand {
		return runExplain(args[1:], out)
	}
	opts, notes, err := commandLine(args, out)
	if err != nil || opts.done {
		return err
	}
	cfg := opts.cfg
	log, err := setupLogging(cfg)
	if err != nil {
		return err
	}
	for _, n := range notes {
		log.Warn(n)
	}
	if opts.writeConfigTo != "" {
		return writeConfig(cfg, opts.writeConfigTo, log)
	}
	applyOOMScoreAdj(cfg.OOMScoreAdj, log)
	runner := dataplane.NewRunner()
	switch {
	case opts.cleanupKubeProxy:
		return removeKubeProxyRules(runner, log)
	case opts.cleanup:
		return removeOwnRules(runner, log)
	}
	// The start-up work that needs full privileges, as kube-proxy's: the
	// conntrack parameters (a node that refuses them is an error).
	if err := applyConntrack(cfg.Conntrack, log); err != nil {
		return err
	}
	if opts.initOnly {
		return initNode(cfg, log)
	}
	return serve(opts, runner, log)
}

// serve is the daemon. Its data flow, wired here in order: informers ->
// tracker -> proxier -> each family's dataplane; every sync -> events,
// health servers, metrics. It returns when a signal (nil) or a change that
// needs a new start (its cause) ends it, or when the start fails.
func serve(opts *options, runner dataplane.Runner, log *slog.Logger) error {
	cfg := opts.cfg
	nodeName, err := opts.nodeName()
	if err != nil {
		return err
	}
	client, err := connect(cfg, opts.master)
	if err != nil {
		return err
	}
	signalled, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// A change of the Node or of the --config file that needs a new start
	// ends ctx with its cause.
	ctx, fail := context.WithCancelCause(signalled)
	defer fail(nil)
	if opts.configFile != "" {
		watchConfigFile(ctx, opts.configFile, configFilePoll, fail)
	}
	popts, err := proxySettings(ctx, opts, client, nodeName, fail, log)
	if err != nil {
		return err
	}
	families, planes, err := setUpDataplanes(runner, log)
	if err != nil {
		return err
	}
	popts.RandomFully = hasRandomFully(runner, log)
	popts.UnsupportedProtocols = unsupportedProtocols(runner, families, log)
	if ct := openConntrack(log); ct != nil {
		defer ct.Close()
		popts.Conntrack = ct
	}

	events := newEventSink(ctx, client, nodeName, log)
	tracker := newTracker(cfg, nodeName, events.invalidObject, log)
	proxier := proxy.New(popts, tracker, planes, localAddresses, log)
	tracker.SetOnChange(proxier.Changed)
	proxier.OnSync(events.refusedServices)
	if opts.cleanupKubeProxyAfterSync {
		afterFirstSync(proxier, func() { cleanupKubeProxy(runner, log) })
	}
	afterFirstSync(proxier, returnStartupMemory(log))
	// Health and metrics servers come up before the informers sync, so that
	// no sync result is missed.
	m := metrics.New(metrics.Options{Log: log, Build: buildInfo(), Families: families})
	m.TrackChanges(tracker)
	proxier.OnChange(m.ChangeQueued)
	servers, err := startHealth(ctx, newHealthOptions(cfg, popts.NodePortAddresses, localAddresses, runner), m, tracker.OldestPending, events.recorder, log)
	if err != nil {
		if hf := (*hardFailure)(nil); errors.As(err, &hf) {
			events.nodeWarningNow(ctx, hf.reason, hf.err.Error())
		}
		return err
	}
	proxier.OnSync(servers.onSync)

	events.starting()
	log.Info("starting miniproxy", "node", nodeName, "families", fmt.Sprint(families),
		"localTraffic", popts.DetectLocal.Mode, "podRanges", fmt.Sprint(popts.DetectLocal.CIDRs), "iptablesSyncPeriod", popts.SyncPeriod, "iptablesMinSyncPeriod", popts.MinSyncPeriod)
	return watchAndSync(ctx, client, tracker, proxier, cfg.ConfigSyncPeriod, log)
}

// removeKubeProxyRules is --cleanup-kube-proxy: it removes what upstream
// kube-proxy (iptables mode) left on the node, and nothing else.
func removeKubeProxyRules(runner dataplane.Runner, log *slog.Logger) error {
	removed, err := dataplane.CleanupKubeProxy(runner, iptablesFamilies(runner, log)...)
	logRemoved(log, "upstream kube-proxy (iptables mode)", removed)
	if err != nil {
		return fmt.Errorf("remove kube-proxy's rules: %w", err)
	}
	return nil
}

// removeOwnRules is --cleanup: it removes every chain and rule miniproxy
// added, and nothing else.
func removeOwnRules(runner dataplane.Runner, log *slog.Logger) error {
	removed, err := dataplane.Cleanup(runner, rules.Prefix)
	logRemoved(log, "miniproxy", removed)
	if err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	return nil
}

// initNode is the rest of --init-only after the conntrack parameters:
// route_localnet, which localhost NodePorts need (kube-proxy's iptables
// proxier sets it here too); "primary" never names a loopback address, so
// the Node need not be read for this.
func initNode(cfg *config.Config, log *slog.Logger) error {
	ranges, _ := config.NodePortRanges(cfg.NodePortAddresses, nil)
	if rules.LocalhostNodePorts(cfg.LocalhostNodePorts, iptables.IPv4, ranges) {
		if _, err := (proxy.ProcSysctl{}).Ensure(proxy.RouteLocalnet, 1); err != nil {
			return fmt.Errorf("set route_localnet for localhost NodePorts: %w", err)
		}
		log.Info("set route_localnet=1 to serve NodePorts on localhost; to avoid it, set --iptables-localhost-nodeports=false or --nodeport-addresses without 127.0.0.0/8")
	}
	log.Info("the node is initialized and --init-only was given; exiting")
	return nil
}

// connect makes the API client, after client-go's metrics hooks so that
// every request is counted in rest_client_*.
func connect(cfg *config.Config, master string) (kubernetes.Interface, error) {
	metrics.HookClientGo()
	return newClient(cfg, master)
}

// proxySettings gives the proxy's settings once the Node has told what
// they need of it (nodeSettings), and watches the Node so that a change of
// either ends ctx through fail.
func proxySettings(ctx context.Context, opts *options, client kubernetes.Interface, nodeName string, fail func(error), log *slog.Logger) (proxy.Options, error) {
	popts, facts, err := nodeSettings(ctx, opts, client, nodeName, log)
	if err != nil {
		return proxy.Options{}, err
	}
	cfg := opts.cfg
	watchNode(ctx, client, nodeName, facts, cfg.DetectLocalMode == config.LocalModeNodeCIDR, slices.Contains(cfg.NodePortAddresses, config.NodePortsPrimary), fail)
	return popts, nil
}

// nodeSettings gives the proxy's settings from the options and what they
// need of the Node (its pod CIDRs in NodeCIDR mode, its addresses for
// --nodeport-addresses primary), waiting for them as kube-proxy does.
func nodeSettings(ctx context.Context, opts *options, client kubernetes.Interface, nodeName string, log *slog.Logger) (proxy.Options, nodeFacts, error) {
	cfg := opts.cfg
	needPodCIDRs := cfg.DetectLocalMode == config.LocalModeNodeCIDR
	usesPrimary := slices.Contains(cfg.NodePortAddresses, config.NodePortsPrimary)
	facts, err := readNode(ctx, client, nodeName, needPodCIDRs, usesPrimary, kubeProxyNodeWaits, log)
	if err != nil {
		return proxy.Options{}, facts, err
	}
	nodePorts, err := config.NodePortRanges(cfg.NodePortAddresses, primaryNodeIPs(facts, cfg, nodeName, log))
	if err != nil {
		return proxy.Options{}, facts, err
	}
	popts, err := opts.proxyOptions(nodePorts, facts.podCIDRs)
	return popts, facts, err
}

// setUpDataplanes gives the IP families this node programs and a dataplane
// for each.
func setUpDataplanes(runner dataplane.Runner, log *slog.Logger) ([]iptables.Family, map[iptables.Family]proxy.Applier, error) {
	families, err := detectFamilies(runner, log)
	if err != nil {
		return nil, nil, err
	}
	planes := map[iptables.Family]proxy.Applier{}
	for _, fam := range families {
		dp, err := dataplane.New(runner, fam, rules.Prefix)
		if err != nil {
			return nil, nil, fmt.Errorf("set up %s dataplane: %w", fam, err)
		}
		planes[fam] = dp
	}
	return families, planes, nil
}

// openConntrack opens the node's conntrack table, so that stale UDP and
// SCTP entries are deleted when endpoints go; nil (logged) when it cannot.
func openConntrack(log *slog.Logger) *conntrack.Kernel {
	ct, err := conntrack.OpenKernel()
	if err != nil {
		log.Warn("stale UDP/SCTP conntrack entries will not be deleted", "err", err)
		return nil
	}
	return ct
}

// newTracker makes the tracker of the API server's Services and
// EndpointSlices, telling onInvalid (the daemon's Warning events; nil for
// none) of invalid objects, and without spec.externalIPs when the feature
// gate AllowServiceExternalIPs is off.
func newTracker(cfg *config.Config, nodeName string, onInvalid endpoints.InvalidFunc, log *slog.Logger) *endpoints.Tracker {
	tracker := endpoints.NewTracker(nodeName, log, onInvalid)
	if !features.Effective(cfg.FeatureGates).Enabled(features.AllowServiceExternalIPs) {
		tracker.DropExternalIPs()
		log.Info("spec.externalIPs of Services are ignored: the feature gate AllowServiceExternalIPs is off")
	}
	return tracker
}

// watchAndSync starts the informers into tracker, waits for their first
// sync, then runs the loop until ctx ends. It returns nil on a signal, the
// cause of a change that needs a new start, or why the watch failed.
func watchAndSync(ctx context.Context, client kubernetes.Interface, tracker *endpoints.Tracker, proxier *proxy.Proxier, resync time.Duration, log *slog.Logger) error {
	if err := endpoints.Watch(ctx, client, tracker, resync); err != nil {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
			return cause
		}
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("watch the API server: %w", err)
	}
	proxier.Run(ctx)
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		log.Error("stopping; rules are left in place", "err", err)
		return err
	}
	log.Info("stopping; rules are left in place so that traffic keeps flowing (use --cleanup to remove them)")
	return nil
}

// detectFamilies programs IPv4 always and IPv6 when the node has an IPv6
// address that is not link-local and ip6tables works, as a dual-stack node.
func detectFamilies(r dataplane.Runner, log *slog.Logger) ([]iptables.Family, error) {
	if _, err := r.Save(iptables.IPv4, "nat"); err != nil {
		return nil, fmt.Errorf("iptables does not work on this node: %w", err)
	}
	families := []iptables.Family{iptables.IPv4}
	v6, err := localAddresses(iptables.IPv6)
	if err != nil || len(v6) == 0 {
		return families, nil
	}
	if _, err := r.Save(iptables.IPv6, "nat"); err != nil {
		log.Warn("the node has IPv6 addresses but ip6tables does not work; IPv6 Services are not proxied", "err", err)
		return families, nil
	}
	return append(families, iptables.IPv6), nil
}

// afterFirstSync runs f once, in the background, after the first sync that
// put every rule in: the moment kube-proxy's leftovers can go without the
// node ever lacking Service rules, and the start-up's memory is no longer
// needed.
func afterFirstSync(p *proxy.Proxier, f func()) {
	var once sync.Once
	p.OnSync(func(res proxy.SyncResult) {
		if res.Err == nil {
			once.Do(func() { go f() })
		}
	})
}

// cleanupKubeProxy removes upstream kube-proxy's rules (miniproxy's jumps
// come first, so after its first sync they no longer matter). It runs in the
// background: deleting tens of thousands of chains takes a while on
// nf_tables, and the sync loop must not wait for it.
func cleanupKubeProxy(runner dataplane.Runner, log *slog.Logger) {
	if err := removeKubeProxyRules(runner, log); err != nil {
		log.Error("could not remove all of upstream kube-proxy's rules; run miniproxy --cleanup-kube-proxy on this node", "err", err)
	}
}

// logRemoved says what a cleanup removed, a line per family and table, and
// the totals, so that the operator knows what changed on the node (nothing
// but owner's chains and the jumps to them is ever touched).
func logRemoved(log *slog.Logger, owner string, removed dataplane.Removed) {
	for _, r := range removed {
		log.Info("removed chains and rules of "+owner, "family", r.Family.String(), "table", r.Table, "chains", r.Chains, "rules", r.Rules)
	}
	chains, rules := removed.Total()
	log.Info("cleanup done: removed the chains of "+owner+" and the rules in and to them; nothing else was touched", "chains", chains, "rules", rules)
}

// returnStartupMemory hands the memory of start-up back to the system: the
// initial lists of every Service and EndpointSlice and the first full
// restore are transient, but the Go runtime would keep most of those pages
// for a long while, and a node pays for resident memory. It costs one
// garbage collection, once.
func returnStartupMemory(log *slog.Logger) func() {
	return func() {
		debug.FreeOSMemory()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		log.Info("returned start-up memory to the system", "heapInUseMB", m.HeapInuse>>20)
	}
}

// iptablesFamilies lists IPv4, and IPv6 when ip6tables works here: a node
// without IPv6 has no ip6tables rules to clean, and removing kube-proxy's
// rules (--cleanup-kube-proxy, --cleanup-kube-proxy-after-sync) must not
// fail there.
func iptablesFamilies(r dataplane.Runner, log *slog.Logger) []iptables.Family {
	families := []iptables.Family{iptables.IPv4}
	if _, err := r.Save(iptables.IPv6, ""); err != nil {
		log.Info("ip6tables does not work on this node; only IPv4 is looked at", "err", err)
		return families
	}
	return append(families, iptables.IPv6)
}
