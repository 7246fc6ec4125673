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
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/miniproxy/miniproxy/pkg/config"
	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
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

// newFlagSet is the command line: kube-proxy's flags and miniproxy's own.
func newFlagSet(opts *options) *pflag.FlagSet {
	fs := pflag.NewFlagSet("miniproxy", pflag.ContinueOnError)
	fs.SortFlags = true
	// Errors are returned once, by main, with the flag's name.
	fs.SetOutput(io.Discard)
	opts.register(fs)
	return fs
}

// parseCommandLine reads args into opts. --help and --version write to
// out and set opts.done; a flag error or a stray argument is one error
// naming it.
func parseCommandLine(fs *pflag.FlagSet, opts *options, args []string, out io.Writer) error {
	switch err := fs.Parse(args); {
	case errors.Is(err, pflag.ErrHelp):
		fmt.Fprintf(out, "miniproxy replaces kube-proxy's iptables mode; it takes kube-proxy's flags (docs/compatibility.md).\n\nUsage:\n  miniproxy [flags]\n\nFlags:\n%s", fs.FlagUsagesWrapped(0))
		opts.done = true
		return nil
	case err != nil:
		return fmt.Errorf("%w: %v", errUsage, err)
	case fs.NArg() > 0:
		return fmt.Errorf("%w: unexpected argument %q: miniproxy takes flags only", errUsage, fs.Arg(0))
	}
	if opts.version != "false" {
		fmt.Fprintln(out, versionText(opts.version == "raw"))
		opts.done = true
	}
	return nil
}

// commandLine reads and checks args; opts.done says --help or --version
// was answered on out.
func commandLine(args []string, out io.Writer) (*options, *pflag.FlagSet, error) {
	opts := &options{}
	fs := newFlagSet(opts)
	if err := parseCommandLine(fs, opts, args, out); err != nil || opts.done {
		return opts, fs, err
	}
	return opts, fs, opts.validate()
}

// run is the daemon; --help and --version write to out and return nil.
func run(args []string, out io.Writer) error {
	opts, fs, err := commandLine(args, out)
	if err != nil || opts.done {
		return err
	}
	opts.applyDeprecatedPorts(fs)
	notes := opts.compatibilityNotes(fs)
	var conntrackSettings *config.Conntrack
	if opts.configFile != "" {
		n, ct, err := opts.applyConfigFile(fs)
		if err != nil {
			return err
		}
		notes, conntrackSettings = append(n, notes...), &ct
	}
	log := newLogger(opts.verbosity)
	for _, n := range notes {
		log.Warn(n)
	}
	applyOOMScoreAdj(opts.oomScoreAdj, log)
	runner := dataplane.NewRunner()
	opts.health.build = buildInfo()

	if opts.cleanupKubeProxy {
		families := iptablesFamilies(runner, log)
		if err := dataplane.CleanupKubeProxy(runner, families...); err != nil {
			return fmt.Errorf("remove kube-proxy's rules: %w", err)
		}
		log.Info("removed the rules and chains upstream kube-proxy (iptables mode) had left; nothing else was touched", "families", fmt.Sprint(families))
		return nil
	}

	if opts.cleanup {
		if err := dataplane.Cleanup(runner, rules.Prefix); err != nil {
			return fmt.Errorf("cleanup: %w", err)
		}
		log.Info("removed every rule and chain miniproxy had added")
		return nil
	}

	popts, err := opts.proxyOptions()
	if err != nil {
		return err
	}
	nodeName, err := opts.nodeName()
	if err != nil {
		return err
	}
	// client-go's metrics hooks before the first client, so that every
	// request is counted in rest_client_*.
	metrics.HookClientGo()
	client, err := newClient(opts.kubeconfig, opts.master, opts.clientSettings())
	if err != nil {
		return err
	}

	// As kube-proxy: the configuration file's conntrack settings are applied
	// before the proxy starts, and a node that refuses them is an error.
	if conntrackSettings != nil {
		changed, err := config.ApplySysctls("/", conntrackSettings.Sysctls(runtime.NumCPU()))
		for _, c := range changed {
			log.Info("set a conntrack parameter from the configuration file", "change", c)
		}
		if err != nil {
			return fmt.Errorf("apply the configuration file's conntrack settings: %w", err)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	families, err := detectFamilies(runner, log)
	if err != nil {
		return err
	}
	planes := map[iptables.Family]proxy.Applier{}
	for _, fam := range families {
		dp, err := dataplane.New(runner, fam, rules.Prefix)
		if err != nil {
			return fmt.Errorf("set up %s dataplane: %w", fam, err)
		}
		planes[fam] = opts.health.wrapApplier(fam, dp, log)
	}
	popts.RandomFully = hasRandomFully(log)
	popts.UnsupportedProtocols = unsupportedProtocols(runner, families, log)
	popts.DeleteStaleFlows = conntrack.Delete

	events := newEventSink(ctx, client, nodeName, log)
	tracker := endpoints.NewTracker(nodeName, log, events.invalidObject)
	proxier := proxy.New(popts, tracker, planes, localAddresses, log)
	proxier.OnSync(events.refusedServices)
	if opts.cleanupKubeProxyAfterSync {
		afterFirstSync(proxier, func() { cleanupKubeProxy(runner, log) })
	}
	afterFirstSync(proxier, returnStartupMemory(log))
	// Health and metrics servers come up before the informers sync, so that
	// no sync result is missed.
	opts.health.syncPeriod = popts.SyncPeriod
	if err := startHealth(ctx, opts.health, proxier, tracker, popts.NodePortAddresses, events.recorder, log); err != nil {
		if hf := (*hardFailure)(nil); errors.As(err, &hf) {
			events.nodeWarningNow(ctx, hf.reason, hf.err.Error())
		}
		return err
	}

	log.Info("starting miniproxy", "node", nodeName, "families", fmt.Sprint(families),
		"clusterCIDRs", fmt.Sprint(popts.ClusterCIDRs), "iptablesSyncPeriod", popts.SyncPeriod, "iptablesMinSyncPeriod", popts.MinSyncPeriod)
	if err := endpoints.Watch(ctx, client, tracker, opts.configSyncPeriod); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("watch the API server: %w", err)
	}
	proxier.Run(ctx)
	log.Info("stopping; rules are left in place so that traffic keeps flowing (use --cleanup to remove them)")
	return nil
}

func newLogger(v int) *slog.Logger {
	level := slog.LevelInfo
	if v >= 4 {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
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
	families := iptablesFamilies(runner, log)
	if err := dataplane.CleanupKubeProxy(runner, families...); err != nil {
		log.Error("could not remove all of upstream kube-proxy's rules; run miniproxy --cleanup-kube-proxy on this node", "err", err)
		return
	}
	log.Info("removed the rules upstream kube-proxy (iptables mode) had left, if any", "families", fmt.Sprint(families))
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

// errUsage marks a flag value that cannot be used.
var errUsage = errors.New("invalid flag")

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// durationAtLeast refuses periods that would make the loop spin.
func durationAtLeast(name string, d, least time.Duration) error {
	if d < least {
		return fmt.Errorf("%w: --%s %s is shorter than %s", errUsage, name, d, least)
	}
	return nil
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
