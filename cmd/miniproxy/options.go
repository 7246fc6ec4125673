package main

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/miniproxy/miniproxy/pkg/config"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// options holds the command line, with kube-proxy's flag names so that an
// operator's muscle memory and existing manifests carry over.
type options struct {
	kubeconfig        string
	master            string
	hostnameOverride  string
	clusterCIDR       string
	masqueradeAll     bool
	masqueradeBit     int
	nodePortAddresses string
	syncPeriod        time.Duration
	minSyncPeriod     time.Duration
	cleanup           bool
	verbosity         int
	health            healthOptions
	// configFile is --config: a kube-proxy configuration file whose
	// settings replace those of the flags in configFlags.
	configFile string
	// cleanupKubeProxy is --cleanup-kube-proxy (one-shot, then exit).
	cleanupKubeProxy bool
	// cleanupKubeProxyAfterSync is --cleanup-kube-proxy-after-sync.
	cleanupKubeProxyAfterSync bool
}

func (o *options) register(fs *flag.FlagSet) {
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "path to a kubeconfig file; in-cluster configuration when empty")
	fs.StringVar(&o.master, "master", "", "address of the API server, overriding the kubeconfig's")
	fs.StringVar(&o.hostnameOverride, "hostname-override", "", "the name of this node, as in its Node object; the host name when empty")
	fs.StringVar(&o.clusterCIDR, "cluster-cidr", "", "the pods' ranges (one per family, comma separated); traffic from outside them to a ClusterIP is masqueraded")
	fs.BoolVar(&o.masqueradeAll, "masquerade-all", false, "masquerade all traffic sent to Service IPs")
	fs.IntVar(&o.masqueradeBit, "iptables-masquerade-bit", rules.DefaultMasqueradeBit, "the fwmark bit (0-31) that marks packets for masquerade")
	fs.StringVar(&o.nodePortAddresses, "nodeport-addresses", "", "ranges (comma separated) of the local addresses that accept NodePorts; all local addresses when empty")
	fs.DurationVar(&o.syncPeriod, "sync-period", 30*time.Second, "the longest time between two syncs of the rules")
	fs.DurationVar(&o.minSyncPeriod, "min-sync-period", time.Second, "the shortest time between two syncs; changes arriving faster are batched")
	fs.BoolVar(&o.cleanup, "cleanup", false, "remove every rule and chain miniproxy added, then exit")
	fs.IntVar(&o.verbosity, "v", 2, "log verbosity; 4 and above logs every sync")
	registerHealthFlags(fs, &o.health)
	fs.StringVar(&o.configFile, "config", "", "path to a kube-proxy configuration file (kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration, such as kubeadm's config.conf); as with kube-proxy, it replaces --kubeconfig, --cluster-cidr, --masquerade-all, --iptables-masquerade-bit, --nodeport-addresses, --sync-period, --min-sync-period, --healthz-bind-address and --metrics-bind-address, while --hostname-override, --master and -v still apply")
	fs.BoolVar(&o.cleanupKubeProxy, "cleanup-kube-proxy", false, "remove the rules and chains upstream kube-proxy (iptables mode) left on this node, and nothing else (not the kubelet's, not miniproxy's), then exit")
	fs.BoolVar(&o.cleanupKubeProxyAfterSync, "cleanup-kube-proxy-after-sync", false, "once the first sync has put miniproxy's rules in, remove the rules upstream kube-proxy (iptables mode) left on this node, as --cleanup-kube-proxy does (for the DaemonSet that replaces kube-proxy)")
}

// configFlags are the flags whose settings a --config file replaces: as
// kube-proxy with --config, miniproxy then ignores them even when given.
var configFlags = []string{"kubeconfig", "cluster-cidr", "masquerade-all", "iptables-masquerade-bit",
	"nodeport-addresses", "sync-period", "min-sync-period", "healthz-bind-address", "metrics-bind-address", "profiling"}

// applyConfigFile loads --config and puts its settings into the options,
// as kube-proxy does: the file decides everything it can express and those
// flags are ignored even when given (each one given is reported);
// --hostname-override and -v given on the command line still win, and
// --master still overrides the kubeconfig's server. It returns lines to log
// as warnings (the file's own first) and the file's conntrack settings,
// which kube-proxy applies at start-up. Call it right after fs.Parse.
func (o *options) applyConfigFile(fs *flag.FlagSet) ([]string, config.Conntrack, error) {
	c, warns, err := config.Load(o.configFile)
	if err != nil {
		return nil, config.Conntrack{}, fmt.Errorf("%w: --config: %v", errUsage, err)
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var notes []string
	for _, w := range warns {
		notes = append(notes, "config file "+o.configFile+": "+w.String())
	}
	for _, name := range configFlags {
		if given[name] {
			notes = append(notes, fmt.Sprintf("--%s is ignored: --config %s decides it, as with kube-proxy", name, o.configFile))
		}
	}
	o.kubeconfig = c.Kubeconfig
	if !given["hostname-override"] {
		o.hostnameOverride = c.HostnameOverride
	}
	if !given["v"] {
		o.verbosity = c.Verbosity
	}
	o.clusterCIDR = joinPrefixes(c.ClusterCIDRs)
	o.nodePortAddresses = joinPrefixes(c.NodePortAddresses)
	o.masqueradeAll = c.MasqueradeAll
	o.masqueradeBit = c.MasqueradeBit
	o.syncPeriod = c.SyncPeriod
	o.minSyncPeriod = c.MinSyncPeriod
	o.health.healthzBindAddress = c.HealthzBindAddress
	o.health.metricsBindAddress = c.MetricsBindAddress
	o.health.profiling = c.EnableProfiling
	return notes, c.Conntrack, nil
}

// joinPrefixes writes ranges as a flag value ("" for none).
func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func (o *options) nodeName() (string, error) {
	name := o.hostnameOverride
	if name == "" {
		h, err := os.Hostname()
		if err != nil {
			return "", fmt.Errorf("find the node name: %w", err)
		}
		name = h
	}
	return strings.ToLower(strings.TrimSpace(name)), nil
}

func (o *options) proxyOptions() (proxy.Options, error) {
	p := proxy.Options{
		MasqueradeAll:  o.masqueradeAll,
		MasqueradeBit:  o.masqueradeBit,
		SyncPeriod:     o.syncPeriod,
		MinSyncPeriod:  o.minSyncPeriod,
		FullSyncPeriod: time.Hour,
	}
	if o.masqueradeBit < 0 || o.masqueradeBit > 31 {
		return p, fmt.Errorf("%w: --iptables-masquerade-bit %d is not in 0..31", errUsage, o.masqueradeBit)
	}
	if err := durationAtLeast("sync-period", o.syncPeriod, time.Second); err != nil {
		return p, err
	}
	if o.minSyncPeriod < 0 || o.minSyncPeriod > o.syncPeriod {
		return p, fmt.Errorf("%w: --min-sync-period %s must be between 0 and --sync-period %s", errUsage, o.minSyncPeriod, o.syncPeriod)
	}
	seen := map[bool]bool{}
	for _, s := range splitList(o.clusterCIDR) {
		c, err := netip.ParsePrefix(s)
		if err != nil {
			return p, fmt.Errorf("%w: --cluster-cidr %q: %v", errUsage, s, err)
		}
		if seen[c.Addr().Is4()] {
			return p, fmt.Errorf("%w: --cluster-cidr has more than one range of a family", errUsage)
		}
		seen[c.Addr().Is4()] = true
		p.ClusterCIDRs = append(p.ClusterCIDRs, c.Masked())
	}
	if o.nodePortAddresses != "" {
		p.NodePortAddresses = []netip.Prefix{}
		for _, s := range splitList(o.nodePortAddresses) {
			c, err := netip.ParsePrefix(s)
			if err != nil {
				return p, fmt.Errorf("%w: --nodeport-addresses %q: %v", errUsage, s, err)
			}
			p.NodePortAddresses = append(p.NodePortAddresses, c.Masked())
		}
	}
	return p, nil
}
