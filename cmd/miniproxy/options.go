package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/pflag"
	logsapi "k8s.io/component-base/logs/api/v1"

	"github.com/miniproxy/miniproxy/pkg/config"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// errUsage marks a flag value that cannot be used.
var errUsage = errors.New("invalid flag")

// options holds the command line: every flag of kube-proxy 1.37 with its
// name, type and default (docs/compatibility.md says, flag by flag, what
// each does here), plus miniproxy's own --cleanup-kube-proxy flags. As in
// kube-proxy, most flags write straight into the configuration (cfg), which
// a --config file replaces as a whole.
type options struct {
	// cfg is the effective configuration: the flags' values, or after
	// complete the --config file's.
	cfg *config.Config
	// configFile is --config; writeConfigTo is --write-config-to.
	configFile, writeConfigTo string
	// cleanup is --cleanup; initOnly is --init-only.
	cleanup, initOnly bool
	// master overrides the kubeconfig's server.
	master string
	// hostnameOverride is --hostname-override, which wins over the file.
	hostnameOverride string
	// The flags that cannot be written into cfg directly, as in kube-proxy:
	// they apply only without --config.
	healthzPort, metricsPort  int32
	syncPeriod, minSyncPeriod time.Duration
	clusterCIDR               string
	// version is --version: "true" or "raw" print it and exit.
	version string
	// done says the command line was answered (--help, --version).
	done bool
	// cleanupKubeProxy is --cleanup-kube-proxy (one-shot, then exit).
	cleanupKubeProxy bool
	// cleanupKubeProxyAfterSync is --cleanup-kube-proxy-after-sync.
	cleanupKubeProxyAfterSync bool
	// ipvs holds the flags of the IPVS mode, accepted and ignored.
	ipvs ipvsFlags
}

// ipvsFlags are kube-proxy's IPVS flags: they configure another proxy mode.
type ipvsFlags struct {
	scheduler                       string
	excludeCIDRs                    []string
	strictARP                       bool
	sync, minSync, tcp, tcpFin, udp time.Duration
}

// The flags of other proxy modes, which have no meaning in iptables mode.
var otherModeFlags = []string{"ipvs-exclude-cidrs", "ipvs-min-sync-period", "ipvs-scheduler", "ipvs-strict-arp",
	"ipvs-sync-period", "ipvs-tcp-timeout", "ipvs-tcpfin-timeout", "ipvs-udp-timeout"}

// notYetFlags are kube-proxy flags whose setting miniproxy does not act
// on yet, with what it does instead (docs/compatibility.md).
var notYetFlags = map[string]string{
	"show-hidden-metrics-for-version": "no hidden metrics are shown",
}

// outsideConfig are the flags that a --config file does not replace, as
// in kube-proxy: the ones that are not part of the configuration, and the
// logging flags and --hostname-override, which win over the file.
var outsideConfig = []string{"config", "write-config-to", "cleanup", "init-only", "master", "hostname-override",
	"version", "help", "cleanup-kube-proxy", "cleanup-kube-proxy-after-sync",
	"v", "vmodule", "logging-format", "log-flush-frequency", "log-json-info-buffer-size", "log-json-split-stream",
	"log-text-info-buffer-size", "log-text-split-stream"}

func (o *options) register(fs *pflag.FlagSet) {
	o.cfg = config.Default()
	c := o.cfg
	fs.StringVar(&o.configFile, "config", "", "The path to the configuration file.")
	fs.StringVar(&o.writeConfigTo, "write-config-to", "", "If set, write the default configuration values to this file and exit.")
	fs.BoolVar(&o.cleanup, "cleanup", false, "If true cleanup iptables and ipvs rules and exit.")
	fs.Var(&mapStringBool{m: &c.FeatureGates}, "feature-gates", "A set of key=value pairs that describe feature gates for alpha/experimental features (kube-proxy 1.37's gates; unknown ones are an error). This parameter is ignored if a config file is specified by --config.")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "Path to kubeconfig file with authorization information (the master location can be overridden by the master flag).")
	fs.StringVar(&o.master, "master", "", "The address of the Kubernetes API server (overrides any value in kubeconfig)")
	fs.StringVar(&c.ContentType, "kube-api-content-type", c.ContentType, "Content type of requests sent to apiserver.")
	fs.Int32Var(&c.Burst, "kube-api-burst", c.Burst, "Burst to use while talking with kubernetes apiserver")
	fs.Float32Var(&c.QPS, "kube-api-qps", c.QPS, "QPS to use while talking with kubernetes apiserver")
	fs.StringVar(&o.hostnameOverride, "hostname-override", "", "If non-empty, will be used as the name of the Node that kube-proxy is running on. If unset, the node name is assumed to be the same as the node's hostname.")
	fs.Var(&ipValue{&c.BindAddress}, "bind-address", "Overrides kube-proxy's idea of what its node's primary IP is (the keyword 'primary' of --nodeport-addresses). This parameter is ignored if a config file is specified by --config.")
	fs.Var(&namedString{val: &c.HealthzBindAddress, typ: "ipport"}, "healthz-bind-address", "The IP address and port for the health check server to serve on, defaulting to \"0.0.0.0:10256\". An empty value disables it. This parameter is ignored if a config file is specified by --config.")
	fs.Var(&namedString{val: &c.MetricsBindAddress, typ: "ipport"}, "metrics-bind-address", "The IP address and port for the metrics server to serve on, defaulting to \"127.0.0.1:10249\". (Set to \"0.0.0.0:10249\" / \"[::]:10249\" to bind on all interfaces.) This parameter is ignored if a config file is specified by --config.")
	fs.BoolVar(&c.BindAddressHardFail, "bind-address-hard-fail", false, "If true kube-proxy will treat failure to bind to a port as fatal and exit")
	fs.BoolVar(&c.EnableProfiling, "profiling", false, "If true enables profiling via web interface on /debug/pprof handler. This parameter is ignored if a config file is specified by --config.")
	fs.StringVar(&c.ShowHiddenMetricsForVersion, "show-hidden-metrics-for-version", "", "The previous version for which you want to show hidden metrics.")
	fs.BoolVar(&o.initOnly, "init-only", false, "If true, perform any initialization steps that must be done with full root privileges (conntrack and route_localnet sysctls), and then exit. After doing this, you can run miniproxy again with only the CAP_NET_ADMIN capability.")
	fs.Var(&namedString{val: &c.Mode, typ: "ProxyMode"}, "proxy-mode", "Which proxy mode to use: miniproxy implements 'iptables' (the default); any other mode is an error.")
	fs.Int32Var(&c.MasqueradeBit, "iptables-masquerade-bit", c.MasqueradeBit, "If using the iptables or ipvs proxy mode, the bit of the fwmark space to mark packets requiring SNAT with.  Must be within the range [0, 31].")
	fs.BoolVar(&c.MasqueradeAll, "masquerade-all", false, "SNAT all traffic sent via Service cluster IPs. This may be required with some CNI plugins. Only supported on Linux.")
	fs.BoolVar(&c.LocalhostNodePorts, "iptables-localhost-nodeports", c.LocalhostNodePorts, "If false, kube-proxy will disable the legacy behavior of allowing NodePort services to be accessed via localhost. (Applies only to iptables mode and IPv4.)")
	fs.DurationVar(&o.syncPeriod, "iptables-sync-period", c.SyncPeriod, "An interval (e.g. '5s', '1m', '2h22m') indicating how frequently various re-synchronizing and cleanup operations are performed. Must be greater than 0.")
	fs.DurationVar(&o.minSyncPeriod, "iptables-min-sync-period", c.MinSyncPeriod, "The minimum period between iptables rule resyncs (e.g. '5s', '1m', '2h22m'). A value of 0 means every Service or EndpointSlice change will result in an immediate iptables resync.")
	v := &o.ipvs
	fs.DurationVar(&v.sync, "ipvs-sync-period", c.SyncPeriod, "Ignored: miniproxy is iptables mode only.")
	fs.DurationVar(&v.minSync, "ipvs-min-sync-period", c.MinSyncPeriod, "Ignored: miniproxy is iptables mode only.")
	fs.StringVar(&v.scheduler, "ipvs-scheduler", "", "Ignored: miniproxy is iptables mode only.")
	fs.StringSliceVar(&v.excludeCIDRs, "ipvs-exclude-cidrs", nil, "Ignored: miniproxy is iptables mode only.")
	fs.BoolVar(&v.strictARP, "ipvs-strict-arp", false, "Ignored: miniproxy is iptables mode only.")
	fs.DurationVar(&v.tcp, "ipvs-tcp-timeout", 0, "Ignored: miniproxy is iptables mode only.")
	fs.DurationVar(&v.tcpFin, "ipvs-tcpfin-timeout", 0, "Ignored: miniproxy is iptables mode only.")
	fs.DurationVar(&v.udp, "ipvs-udp-timeout", 0, "Ignored: miniproxy is iptables mode only.")
	fs.Var(&namedString{val: &c.DetectLocalMode, typ: "LocalMode"}, "detect-local-mode", "Mode to use to detect local traffic (ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix). This parameter is ignored if a config file is specified by --config.")
	fs.StringVar(&c.BridgeInterface, "pod-bridge-interface", "", "A bridge interface name. When --detect-local-mode is set to BridgeInterface, kube-proxy will consider traffic to be local if it originates from this bridge.")
	fs.StringVar(&c.InterfaceNamePrefix, "pod-interface-name-prefix", "", "An interface name prefix. When --detect-local-mode is set to InterfaceNamePrefix, kube-proxy will consider traffic to be local if it originates from any interface whose name begins with this prefix.")
	fs.StringVar(&o.clusterCIDR, "cluster-cidr", "", "The CIDR range of the pods in the cluster. (For dual-stack clusters, this can be a comma-separated dual-stack pair of CIDR ranges.). When --detect-local-mode is set to ClusterCIDR, kube-proxy will consider traffic to be local if its source IP is in this range. (Otherwise it is not used.) This parameter is ignored if a config file is specified by --config.")
	fs.StringSliceVar(&c.NodePortAddresses, "nodeport-addresses", nil, "A list of CIDR ranges and/or keywords that expand to CIDR ranges ('primary', 'localhost', 'all'). NodePort services are only accessible on node IPs covered by the list. If unset, NodePort connections will be accepted on all local IPs. This parameter is ignored if a config file is specified by --config.")
	fs.Int32Var(&c.OOMScoreAdj, "oom-score-adj", c.OOMScoreAdj, "The oom-score-adj value for kube-proxy process. Values must be within the range [-1000, 1000]. This parameter is ignored if a config file is specified by --config.")
	ct := &c.Conntrack
	fs.Int32Var(&ct.MaxPerCore, "conntrack-max-per-core", ct.MaxPerCore, "Maximum number of NAT connections to track per CPU core (0 to leave the limit as-is and ignore conntrack-min).")
	fs.Int32Var(&ct.Min, "conntrack-min", ct.Min, "Minimum number of conntrack entries to allocate, regardless of conntrack-max-per-core (set conntrack-max-per-core=0 to leave the limit as-is).")
	fs.DurationVar(&ct.TCPEstablishedTimeout, "conntrack-tcp-timeout-established", ct.TCPEstablishedTimeout, "Idle timeout for established TCP connections (0 to leave as-is)")
	fs.DurationVar(&ct.TCPCloseWaitTimeout, "conntrack-tcp-timeout-close-wait", ct.TCPCloseWaitTimeout, "NAT timeout for TCP connections in the CLOSE_WAIT state")
	fs.BoolVar(&ct.TCPBeLiberal, "conntrack-tcp-be-liberal", false, "Enable liberal mode for tracking TCP packets by setting nf_conntrack_tcp_be_liberal to 1")
	fs.DurationVar(&ct.UDPTimeout, "conntrack-udp-timeout", 0, "Idle timeout for UNREPLIED UDP connections (0 to leave as-is)")
	fs.DurationVar(&ct.UDPStreamTimeout, "conntrack-udp-timeout-stream", 0, "Idle timeout for ASSURED UDP connections (0 to leave as-is)")
	fs.DurationVar(&c.ConfigSyncPeriod, "config-sync-period", c.ConfigSyncPeriod, "How often configuration from the apiserver is refreshed.  Must be greater than 0.")
	fs.Int32Var(&o.healthzPort, "healthz-port", config.DefaultHealthzPort, "The port to bind the health check server. Use 0 to disable.")
	_ = fs.MarkDeprecated("healthz-port", "This flag is deprecated and will be removed in a future release. Please use --healthz-bind-address instead.")
	fs.Int32Var(&o.metricsPort, "metrics-port", config.DefaultMetricsPort, "The port to bind the metrics server. Use 0 to disable.")
	_ = fs.MarkDeprecated("metrics-port", "This flag is deprecated and will be removed in a future release. Please use --metrics-bind-address instead.")
	// -v, --vmodule, --logging-format and the other flags of
	// component-base's logging, as kube-proxy registers them.
	logsapi.AddFlags(&c.Logging, fs)
	o.version = "false"
	fs.Var(&versionFlag{v: &o.version}, "version", "--version, --version=raw prints version information and quits")
	fs.Lookup("version").NoOptDefVal = "true"
	// miniproxy's own.
	fs.BoolVar(&o.cleanupKubeProxy, "cleanup-kube-proxy", false, "miniproxy: remove the rules and chains upstream kube-proxy (iptables mode) left on this node, and nothing else (not the kubelet's, not miniproxy's), then exit")
	fs.BoolVar(&o.cleanupKubeProxyAfterSync, "cleanup-kube-proxy-after-sync", false, "miniproxy: once the first sync has put miniproxy's rules in, remove the rules upstream kube-proxy (iptables mode) left on this node, as --cleanup-kube-proxy does (for the DaemonSet that replaces kube-proxy)")
}

// complete turns the parsed flags into the effective configuration, as
// kube-proxy 1.37's Options.Complete does: without --config the deprecated
// port flags and the flags that are not plain fields (--iptables-sync-period,
// --iptables-min-sync-period, --cluster-cidr) apply; with --config the file
// replaces the whole configuration, except that the logging flags given
// win; then the platform's defaults (mode iptables, detect-local-mode
// ClusterCIDR) and --hostname-override. It returns lines to log as
// warnings.
func (o *options) complete(fs *pflag.FlagSet) ([]string, error) {
	var notes []string
	if o.configFile == "" {
		if o.writeConfigTo == "" {
			o.applyDeprecatedPorts(fs)
		}
		if fs.Changed("iptables-sync-period") {
			o.cfg.SyncPeriod = o.syncPeriod
		}
		if fs.Changed("iptables-min-sync-period") {
			o.cfg.MinSyncPeriod = o.minSyncPeriod
		}
		if fs.Changed("cluster-cidr") {
			cidrs, err := config.ParseClusterCIDRs(o.clusterCIDR)
			if err != nil {
				return nil, fmt.Errorf("%w: --cluster-cidr: %v", errUsage, err)
			}
			o.cfg.ClusterCIDRs = cidrs
		}
	} else {
		c, warns, err := config.Load(o.configFile)
		if err != nil {
			return nil, fmt.Errorf("%w: --config: %v", errUsage, err)
		}
		for _, w := range warns {
			notes = append(notes, "config file "+o.configFile+": "+w.String())
		}
		if err := copyLoggingFlags(fs, &c.Logging); err != nil {
			return nil, err
		}
		fs.Visit(func(f *pflag.Flag) {
			if !slices.Contains(outsideConfig, f.Name) {
				notes = append(notes, fmt.Sprintf("--%s is ignored: --config %s decides it, as with kube-proxy", f.Name, o.configFile))
			}
		})
		o.cfg = c
	}
	if o.cfg.Mode == "" {
		o.cfg.Mode = "iptables"
	}
	if o.cfg.DetectLocalMode == "" {
		o.cfg.DetectLocalMode = config.LocalModeClusterCIDR
	}
	if o.hostnameOverride != "" {
		name := strings.TrimSpace(o.hostnameOverride)
		if name == "" {
			return nil, fmt.Errorf("%w: --hostname-override: an empty name is invalid", errUsage)
		}
		o.cfg.HostnameOverride = strings.ToLower(name)
	}
	fs.Visit(func(f *pflag.Flag) {
		switch {
		case slices.Contains(otherModeFlags, f.Name):
			notes = append(notes, fmt.Sprintf("--%s is ignored: it configures another proxy mode; miniproxy is iptables mode", f.Name))
		case notYetFlags[f.Name] != "":
			notes = append(notes, fmt.Sprintf("--%s is accepted for compatibility with kube-proxy but miniproxy does not act on it: %s (docs/compatibility.md)", f.Name, notYetFlags[f.Name]))
		}
	})
	return notes, nil
}

// copyLoggingFlags puts the logging flags given on the command line into a
// configuration read from a file, so that `--config f -v 4` logs at 4, as
// in kube-proxy (a vmodule flag's patterns come first).
func copyLoggingFlags(from *pflag.FlagSet, to *logsapi.LoggingConfiguration) error {
	fileVModule := to.VModule
	to.VModule = nil
	var names pflag.FlagSet
	logsapi.AddFlags(to, &names)
	var err error
	names.VisitAll(func(f *pflag.Flag) {
		given := from.Lookup(f.Name)
		if err != nil || given == nil || !given.Changed {
			return
		}
		if e := f.Value.Set(given.Value.String()); e != nil {
			err = fmt.Errorf("%w: --%s: %v", errUsage, f.Name, e)
		}
	})
	to.VModule = append(to.VModule, fileVModule...)
	return err
}

// flagOfField names the flag that sets a configuration field, for errors
// about a value that came from the command line.
var flagOfField = map[string]string{
	"mode": "proxy-mode", "iptables.masqueradeBit": "iptables-masquerade-bit",
	"iptables.syncPeriod": "iptables-sync-period", "iptables.minSyncPeriod": "iptables-min-sync-period",
	"configSyncPeriod": "config-sync-period", "oomScoreAdj": "oom-score-adj", "clientConnection.burst": "kube-api-burst",
	"conntrack.maxPerCore": "conntrack-max-per-core", "conntrack.min": "conntrack-min",
	"conntrack.tcpEstablishedTimeout": "conntrack-tcp-timeout-established",
	"conntrack.tcpCloseWaitTimeout":   "conntrack-tcp-timeout-close-wait",
	"conntrack.udpTimeout":            "conntrack-udp-timeout", "conntrack.udpStreamTimeout": "conntrack-udp-timeout-stream",
	"metricsBindAddress": "metrics-bind-address", "detectLocalMode": "detect-local-mode",
	"detectLocal.bridgeInterface": "pod-bridge-interface", "detectLocal.interfaceNamePrefix": "pod-interface-name-prefix",
	"featureGates": "feature-gates", "logging.format": "logging-format", "logging.verbosity": "v", "logging.vmodule": "vmodule",
}

// validate checks the effective configuration with kube-proxy's rules; an
// error names the flag (or, with --config, the file and its field).
func (o *options) validate() error {
	var msgs []string
	for _, e := range config.FieldErrors(errors.Join(o.cfg.Validate()...)) {
		switch name := flagOfField[strings.Split(e.Field, "[")[0]]; {
		case o.configFile != "":
			msgs = append(msgs, fmt.Sprintf("--config %s: %s", o.configFile, e.Error()))
		case name != "":
			msgs = append(msgs, fmt.Sprintf("--%s: %s", name, e.Message))
		case strings.HasPrefix(e.Field, "nodePortAddresses"):
			msgs = append(msgs, "--nodeport-addresses: "+e.Message)
		default:
			msgs = append(msgs, e.Error())
		}
	}
	if len(msgs) > 0 {
		return fmt.Errorf("%w: %s", errUsage, strings.Join(msgs, "; "))
	}
	return nil
}

func (o *options) nodeName() (string, error) {
	name := o.cfg.HostnameOverride
	if name == "" {
		h, err := os.Hostname()
		if err != nil {
			return "", fmt.Errorf("find the node name: %w", err)
		}
		name = h
	}
	return strings.ToLower(strings.TrimSpace(name)), nil
}

// proxyOptions gives the proxy's settings; nodePortRanges is
// --nodeport-addresses resolved (config.NodePortRanges), podCIDRs the
// Node's (for --detect-local-mode NodeCIDR).
func (o *options) proxyOptions(nodePortRanges, podCIDRs []netip.Prefix) (proxy.Options, error) {
	c := o.cfg
	detect := rules.DetectLocal{Mode: c.DetectLocalMode, BridgeInterface: c.BridgeInterface, InterfaceNamePrefix: c.InterfaceNamePrefix}
	switch c.DetectLocalMode {
	case "", config.LocalModeClusterCIDR:
		detect.Mode, detect.CIDRs = rules.DetectClusterCIDR, c.ClusterCIDRs
	case config.LocalModeNodeCIDR:
		detect.CIDRs = podCIDRs
	}
	if err := detect.Validate(); err != nil {
		return proxy.Options{}, fmt.Errorf("%w: --detect-local-mode %s: %v", errUsage, detect.Mode, err)
	}
	return proxy.Options{
		DetectLocal:        detect,
		MasqueradeAll:      c.MasqueradeAll,
		MasqueradeBit:      int(c.MasqueradeBit),
		SyncPeriod:         c.SyncPeriod,
		MinSyncPeriod:      c.MinSyncPeriod,
		FullSyncPeriod:     time.Hour,
		NodePortAddresses:  nodePortRanges,
		LocalhostNodePorts: c.LocalhostNodePorts,
		Sysctl:             proxy.ProcSysctl{},
	}, nil
}
