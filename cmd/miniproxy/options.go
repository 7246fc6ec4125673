package main

import (
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/miniproxy/miniproxy/pkg/config"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// options holds the command line: every flag of kube-proxy 1.37 with its
// name, type and default (docs/compatibility.md says, flag by flag, what
// each does here), plus miniproxy's own --cleanup-kube-proxy flags.
type options struct {
	kubeconfig        string
	master            string
	hostnameOverride  string
	clusterCIDR       string
	masqueradeAll     bool
	masqueradeBit     int32
	nodePortAddresses []string
	// syncPeriod and minSyncPeriod are --iptables-sync-period and
	// --iptables-min-sync-period.
	syncPeriod    time.Duration
	minSyncPeriod time.Duration
	cleanup       bool
	verbosity     int
	health        healthOptions
	// healthzPort and metricsPort are kube-proxy's deprecated port-only
	// flags; when given they replace the port of the bind addresses.
	healthzPort, metricsPort int32
	// configFile is --config: a kube-proxy configuration file whose
	// settings replace those of the flags in configFlags.
	configFile string
	proxyMode  string
	// The API client: --kube-api-qps, --kube-api-burst,
	// --kube-api-content-type; configSyncPeriod is the informers' resync.
	kubeAPIQPS         float32
	kubeAPIBurst       int32
	kubeAPIContentType string
	configSyncPeriod   time.Duration
	oomScoreAdj        int32
	// version is --version: "true" or "raw" print it and exit.
	version string
	// done says the command line was answered (--help, --version).
	done bool
	// cleanupKubeProxy is --cleanup-kube-proxy (one-shot, then exit).
	cleanupKubeProxy bool
	// cleanupKubeProxyAfterSync is --cleanup-kube-proxy-after-sync.
	cleanupKubeProxyAfterSync bool
	// compat holds the flags accepted so that kube-proxy's command lines
	// work, whose settings miniproxy does not use (yet).
	compat compatFlags
}

// compatFlags are kube-proxy flags miniproxy accepts without acting on
// them; a given one is logged at start (compatibilityNotes).
type compatFlags struct {
	bindAddress, showHiddenMetrics, writeConfigTo, detectLocalMode  string
	podBridgeInterface, podInterfaceNamePrefix, vmodule             string
	loggingFormat, logJSONBuffer, logTextBuffer, ipvsScheduler      string
	bindAddressHardFail, initOnly, localhostNodePorts, tcpBeLiberal bool
	ipvsStrictARP, logJSONSplit, logTextSplit                       bool
	conntrackMaxPerCore, conntrackMin                               int32
	tcpEstablished, tcpCloseWait, udpTimeout, udpStreamTimeout      time.Duration
	ipvsSync, ipvsMinSync, ipvsTCP, ipvsTCPFin, ipvsUDP             time.Duration
	logFlushFrequency                                               time.Duration
	ipvsExcludeCIDRs                                                []string
	featureGates                                                    map[string]bool
}

// The flags of other proxy modes, which have no meaning in iptables mode.
var otherModeFlags = []string{"ipvs-exclude-cidrs", "ipvs-min-sync-period", "ipvs-scheduler", "ipvs-strict-arp",
	"ipvs-sync-period", "ipvs-tcp-timeout", "ipvs-tcpfin-timeout", "ipvs-udp-timeout"}

// notYetFlags are kube-proxy flags whose setting miniproxy does not act
// on yet, with what it does instead (docs/compatibility.md).
var notYetFlags = map[string]string{
	"bind-address":                      "the node's addresses are read from its interfaces",
	"conntrack-max-per-core":            "conntrack settings are applied only from a --config file",
	"conntrack-min":                     "conntrack settings are applied only from a --config file",
	"conntrack-tcp-be-liberal":          "conntrack settings are applied only from a --config file",
	"conntrack-tcp-timeout-close-wait":  "conntrack settings are applied only from a --config file",
	"conntrack-tcp-timeout-established": "conntrack settings are applied only from a --config file",
	"conntrack-udp-timeout":             "conntrack settings are applied only from a --config file",
	"conntrack-udp-timeout-stream":      "conntrack settings are applied only from a --config file",
	"detect-local-mode":                 "local traffic is always detected by --cluster-cidr",
	"pod-bridge-interface":              "local traffic is always detected by --cluster-cidr",
	"pod-interface-name-prefix":         "local traffic is always detected by --cluster-cidr",
	"feature-gates":                     "miniproxy behaves as kube-proxy 1.37 with its default gates",
	"init-only":                         "there is no separate initialization step; miniproxy starts normally",
	"iptables-localhost-nodeports":      "NodePorts are never served on localhost",
	"write-config-to":                   "nothing is written; miniproxy starts normally",
	"show-hidden-metrics-for-version":   "no hidden metrics are shown",
	"vmodule":                           "verbosity is per process only",
	"logging-format":                    "logs are text",
	"log-flush-frequency":               "logs are written at once",
	"log-json-info-buffer-size":         "logs are text",
	"log-json-split-stream":             "logs are text",
	"log-text-info-buffer-size":         "logs are not buffered",
	"log-text-split-stream":             "logs go to standard error",
}

func (o *options) register(fs *pflag.FlagSet) {
	c := &o.compat
	fs.StringVar(&o.configFile, "config", "", "The path to the configuration file.")
	fs.StringVar(&c.writeConfigTo, "write-config-to", "", "If set, write the default configuration values to this file and exit.")
	fs.BoolVar(&o.cleanup, "cleanup", false, "If true cleanup iptables and ipvs rules and exit.")
	fs.Var(&mapStringBool{m: &c.featureGates}, "feature-gates", "A set of key=value pairs that describe feature gates for alpha/experimental features.")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "Path to kubeconfig file with authorization information (the master location can be overridden by the master flag).")
	fs.StringVar(&o.master, "master", "", "The address of the Kubernetes API server (overrides any value in kubeconfig)")
	fs.StringVar(&o.kubeAPIContentType, "kube-api-content-type", "application/vnd.kubernetes.protobuf", "Content type of requests sent to apiserver.")
	fs.Int32Var(&o.kubeAPIBurst, "kube-api-burst", 10, "Burst to use while talking with kubernetes apiserver")
	fs.Float32Var(&o.kubeAPIQPS, "kube-api-qps", 5, "QPS to use while talking with kubernetes apiserver")
	fs.StringVar(&o.hostnameOverride, "hostname-override", "", "If non-empty, will be used as the name of the Node that kube-proxy is running on. If unset, the node name is assumed to be the same as the node's hostname.")
	c.bindAddress = "0.0.0.0"
	fs.Var(&namedString{val: &c.bindAddress, typ: "ip", validate: validIP}, "bind-address", "Overrides kube-proxy's idea of what its node's primary IP is. This parameter is ignored if a config file is specified by --config.")
	o.health.healthzBindAddress = fmt.Sprintf("0.0.0.0:%d", defaultHealthzPort)
	fs.Var(&namedString{val: &o.health.healthzBindAddress, typ: "ipport"}, "healthz-bind-address", "The IP address and port for the health check server to serve on, defaulting to \"0.0.0.0:10256\". An empty value disables it. This parameter is ignored if a config file is specified by --config.")
	o.health.metricsBindAddress = fmt.Sprintf("127.0.0.1:%d", defaultMetricsPort)
	fs.Var(&namedString{val: &o.health.metricsBindAddress, typ: "ipport"}, "metrics-bind-address", "The IP address and port for the metrics server to serve on, defaulting to \"127.0.0.1:10249\". (Set to \"0.0.0.0:10249\" / \"[::]:10249\" to bind on all interfaces.) An empty value disables it. This parameter is ignored if a config file is specified by --config.")
	fs.BoolVar(&o.health.bindAddressHardFail, "bind-address-hard-fail", false, "If true kube-proxy will treat failure to bind to a port as fatal and exit")
	fs.BoolVar(&o.health.profiling, "profiling", false, "If true enables profiling via web interface on /debug/pprof handler. This parameter is ignored if a config file is specified by --config.")
	fs.StringVar(&c.showHiddenMetrics, "show-hidden-metrics-for-version", "", "The previous version for which you want to show hidden metrics.")
	fs.BoolVar(&c.initOnly, "init-only", false, "If true, perform any initialization steps that must be done with full root privileges, and then exit.")
	fs.Var(&namedString{val: &o.proxyMode, typ: "ProxyMode"}, "proxy-mode", "Which proxy mode to use: miniproxy implements 'iptables' (the default); any other mode is an error.")
	fs.Int32Var(&o.masqueradeBit, "iptables-masquerade-bit", rules.DefaultMasqueradeBit, "If using the iptables or ipvs proxy mode, the bit of the fwmark space to mark packets requiring SNAT with.  Must be within the range [0, 31].")
	fs.BoolVar(&o.masqueradeAll, "masquerade-all", false, "SNAT all traffic sent via Service cluster IPs. This may be required with some CNI plugins. Only supported on Linux.")
	fs.BoolVar(&c.localhostNodePorts, "iptables-localhost-nodeports", true, "If false, kube-proxy will disable the legacy behavior of allowing NodePort services to be accessed via localhost.")
	fs.DurationVar(&o.syncPeriod, "iptables-sync-period", 30*time.Second, "An interval (e.g. '5s', '1m', '2h22m') indicating how frequently various re-synchronizing and cleanup operations are performed. Must be greater than 0.")
	fs.DurationVar(&o.minSyncPeriod, "iptables-min-sync-period", time.Second, "The minimum period between iptables rule resyncs (e.g. '5s', '1m', '2h22m'). A value of 0 means every Service or EndpointSlice change will result in an immediate iptables resync.")
	fs.DurationVar(&c.ipvsSync, "ipvs-sync-period", 30*time.Second, "Ignored: miniproxy is iptables mode only.")
	fs.DurationVar(&c.ipvsMinSync, "ipvs-min-sync-period", time.Second, "Ignored: miniproxy is iptables mode only.")
	fs.StringVar(&c.ipvsScheduler, "ipvs-scheduler", "", "Ignored: miniproxy is iptables mode only.")
	fs.StringSliceVar(&c.ipvsExcludeCIDRs, "ipvs-exclude-cidrs", nil, "Ignored: miniproxy is iptables mode only.")
	fs.BoolVar(&c.ipvsStrictARP, "ipvs-strict-arp", false, "Ignored: miniproxy is iptables mode only.")
	fs.DurationVar(&c.ipvsTCP, "ipvs-tcp-timeout", 0, "Ignored: miniproxy is iptables mode only.")
	fs.DurationVar(&c.ipvsTCPFin, "ipvs-tcpfin-timeout", 0, "Ignored: miniproxy is iptables mode only.")
	fs.DurationVar(&c.ipvsUDP, "ipvs-udp-timeout", 0, "Ignored: miniproxy is iptables mode only.")
	c.detectLocalMode = ""
	fs.Var(&namedString{val: &c.detectLocalMode, typ: "LocalMode"}, "detect-local-mode", "Mode to use to detect local traffic. This parameter is ignored if a config file is specified by --config.")
	fs.StringVar(&c.podBridgeInterface, "pod-bridge-interface", "", "A bridge interface name. When --detect-local-mode is set to BridgeInterface, kube-proxy will consider traffic to be local if it originates from this bridge.")
	fs.StringVar(&c.podInterfaceNamePrefix, "pod-interface-name-prefix", "", "An interface name prefix. When --detect-local-mode is set to InterfaceNamePrefix, kube-proxy will consider traffic to be local if it originates from any interface whose name begins with this prefix.")
	fs.StringVar(&o.clusterCIDR, "cluster-cidr", "", "The CIDR range of the pods in the cluster. (For dual-stack clusters, this can be a comma-separated dual-stack pair of CIDR ranges.) Traffic from outside it to a ClusterIP is masqueraded. This parameter is ignored if a config file is specified by --config.")
	fs.StringSliceVar(&o.nodePortAddresses, "nodeport-addresses", nil, "A list of CIDR ranges that contain valid node IPs. If set, connections to NodePort services will only be accepted on node IPs in one of the indicated ranges. If unset, NodePort connections will be accepted on all local IPs. This parameter is ignored if a config file is specified by --config.")
	fs.Int32Var(&o.oomScoreAdj, "oom-score-adj", -999, "The oom-score-adj value for kube-proxy process. Values must be within the range [-1000, 1000]. This parameter is ignored if a config file is specified by --config.")
	fs.Int32Var(&c.conntrackMaxPerCore, "conntrack-max-per-core", 32768, "Maximum number of NAT connections to track per CPU core (0 to leave the limit as-is and ignore conntrack-min).")
	fs.Int32Var(&c.conntrackMin, "conntrack-min", 131072, "Minimum number of conntrack entries to allocate, regardless of conntrack-max-per-core (set conntrack-max-per-core=0 to leave the limit as-is).")
	fs.DurationVar(&c.tcpEstablished, "conntrack-tcp-timeout-established", 24*time.Hour, "Idle timeout for established TCP connections (0 to leave as-is)")
	fs.DurationVar(&c.tcpCloseWait, "conntrack-tcp-timeout-close-wait", time.Hour, "NAT timeout for TCP connections in the CLOSE_WAIT state")
	fs.BoolVar(&c.tcpBeLiberal, "conntrack-tcp-be-liberal", false, "Enable liberal mode for tracking TCP packets by setting nf_conntrack_tcp_be_liberal to 1")
	fs.DurationVar(&c.udpTimeout, "conntrack-udp-timeout", 0, "Idle timeout for UNREPLIED UDP connections (0 to leave as-is)")
	fs.DurationVar(&c.udpStreamTimeout, "conntrack-udp-timeout-stream", 0, "Idle timeout for ASSURED UDP connections (0 to leave as-is)")
	fs.DurationVar(&o.configSyncPeriod, "config-sync-period", 15*time.Minute, "How often configuration from the apiserver is refreshed.  Must be greater than 0.")
	fs.Int32Var(&o.healthzPort, "healthz-port", 10256, "The port to bind the health check server. Use 0 to disable.")
	_ = fs.MarkDeprecated("healthz-port", "This flag is deprecated and will be removed in a future release. Please use --healthz-bind-address instead.")
	fs.Int32Var(&o.metricsPort, "metrics-port", 10249, "The port to bind the metrics server. Use 0 to disable.")
	_ = fs.MarkDeprecated("metrics-port", "This flag is deprecated and will be removed in a future release. Please use --metrics-bind-address instead.")
	// Logging, as component-base's logs flags.
	o.verbosity = 0
	fs.VarP(&level{v: &o.verbosity}, "v", "v", "number for the log level verbosity (4 and above logs every sync)")
	fs.Var(&namedString{val: &c.vmodule, typ: "pattern=N,..."}, "vmodule", "comma-separated list of pattern=N settings for file-filtered logging (only works for text log format)")
	fs.StringVar(&c.loggingFormat, "logging-format", "text", "Sets the log format. Permitted formats: \"json\" (gated by LoggingBetaOptions), \"text\".")
	fs.DurationVar(&c.logFlushFrequency, "log-flush-frequency", 5*time.Second, "Maximum number of seconds between log flushes")
	fs.Var(&namedString{val: &c.logJSONBuffer, typ: "quantity"}, "log-json-info-buffer-size", "[Alpha] In JSON format with split output streams, the info messages can be buffered for a while to increase performance.")
	fs.BoolVar(&c.logJSONSplit, "log-json-split-stream", false, "[Alpha] In JSON format, write error messages to stderr and info messages to stdout.")
	fs.Var(&namedString{val: &c.logTextBuffer, typ: "quantity"}, "log-text-info-buffer-size", "[Alpha] In text format with split output streams, the info messages can be buffered for a while to increase performance.")
	fs.BoolVar(&c.logTextSplit, "log-text-split-stream", false, "[Alpha] In text format, write error messages to stderr and info messages to stdout.")
	o.version = "false"
	fs.Var(&versionFlag{v: &o.version}, "version", "--version, --version=raw prints version information and quits")
	fs.Lookup("version").NoOptDefVal = "true"
	// miniproxy's own.
	fs.BoolVar(&o.cleanupKubeProxy, "cleanup-kube-proxy", false, "miniproxy: remove the rules and chains upstream kube-proxy (iptables mode) left on this node, and nothing else (not the kubelet's, not miniproxy's), then exit")
	fs.BoolVar(&o.cleanupKubeProxyAfterSync, "cleanup-kube-proxy-after-sync", false, "miniproxy: once the first sync has put miniproxy's rules in, remove the rules upstream kube-proxy (iptables mode) left on this node, as --cleanup-kube-proxy does (for the DaemonSet that replaces kube-proxy)")
}

// validate checks what no later step does.
func (o *options) validate() error {
	if o.oomScoreAdj < -1000 || o.oomScoreAdj > 1000 {
		return fmt.Errorf("%w: --oom-score-adj %d must be within [-1000, 1000]", errUsage, o.oomScoreAdj)
	}
	return nil
}

func validIP(s string) error {
	if _, err := netip.ParseAddr(s); err != nil {
		return fmt.Errorf("%q is not a valid IP address", s)
	}
	return nil
}

// compatibilityNotes says, for each flag given that miniproxy accepts
// without acting on it, what it does instead, so that an operator is
// never surprised silently.
func (o *options) compatibilityNotes(fs *pflag.FlagSet) []string {
	var notes []string
	fs.Visit(func(f *pflag.Flag) {
		switch {
		case slices.Contains(otherModeFlags, f.Name):
			notes = append(notes, fmt.Sprintf("--%s is ignored: it configures another proxy mode; miniproxy is iptables mode", f.Name))
		case notYetFlags[f.Name] != "":
			if f.Name == "detect-local-mode" && f.Value.String() == "ClusterCIDR" {
				return
			}
			notes = append(notes, fmt.Sprintf("--%s is accepted for compatibility with kube-proxy but miniproxy does not act on it: %s (docs/compatibility.md)", f.Name, notYetFlags[f.Name]))
		}
	})
	return notes
}

// configFlags are the flags whose settings a --config file replaces: as
// kube-proxy with --config, miniproxy then ignores them even when given.
var configFlags = []string{"kubeconfig", "cluster-cidr", "masquerade-all", "iptables-masquerade-bit",
	"nodeport-addresses", "iptables-sync-period", "iptables-min-sync-period", "healthz-bind-address", "metrics-bind-address", "profiling"}

// applyConfigFile loads --config and puts its settings into the options,
// as kube-proxy does: the file decides everything it can express and those
// flags are ignored even when given (each one given is reported);
// --hostname-override and -v given on the command line still win, and
// --master still overrides the kubeconfig's server. It returns lines to log
// as warnings (the file's own first) and the file's conntrack settings,
// which kube-proxy applies at start-up. Call it right after fs.Parse.
func (o *options) applyConfigFile(fs *pflag.FlagSet) ([]string, config.Conntrack, error) {
	c, warns, err := config.Load(o.configFile)
	if err != nil {
		return nil, config.Conntrack{}, fmt.Errorf("%w: --config: %v", errUsage, err)
	}
	given := map[string]bool{}
	fs.Visit(func(f *pflag.Flag) { given[f.Name] = true })
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
	o.nodePortAddresses = nil
	if len(c.NodePortAddresses) > 0 {
		o.nodePortAddresses = strings.Split(joinPrefixes(c.NodePortAddresses), ",")
	}
	o.masqueradeAll = c.MasqueradeAll
	o.masqueradeBit = int32(c.MasqueradeBit)
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
		MasqueradeBit:  int(o.masqueradeBit),
		SyncPeriod:     o.syncPeriod,
		MinSyncPeriod:  o.minSyncPeriod,
		FullSyncPeriod: time.Hour,
	}
	if o.masqueradeBit < 0 || o.masqueradeBit > 31 {
		return p, fmt.Errorf("%w: --iptables-masquerade-bit %d is not in 0..31", errUsage, o.masqueradeBit)
	}
	if err := durationAtLeast("iptables-sync-period", o.syncPeriod, time.Second); err != nil {
		return p, err
	}
	if o.minSyncPeriod < 0 || o.minSyncPeriod > o.syncPeriod {
		return p, fmt.Errorf("%w: --iptables-min-sync-period %s must be between 0 and --iptables-sync-period %s", errUsage, o.minSyncPeriod, o.syncPeriod)
	}
	if o.proxyMode != "" && o.proxyMode != "iptables" {
		return p, fmt.Errorf("%w: --proxy-mode %q: miniproxy implements the iptables mode only", errUsage, o.proxyMode)
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
	if len(o.nodePortAddresses) > 0 {
		p.NodePortAddresses = []netip.Prefix{}
		for _, s := range o.nodePortAddresses {
			c, err := netip.ParsePrefix(s)
			if err != nil {
				return p, fmt.Errorf("%w: --nodeport-addresses %q: %v", errUsage, s, err)
			}
			p.NodePortAddresses = append(p.NodePortAddresses, c.Masked())
		}
	}
	return p, nil
}
