package main

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

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
