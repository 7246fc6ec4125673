// Package config reads the file that configures upstream kube-proxy, a
// kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration (YAML or JSON),
// so that an operator replacing kube-proxy can hand miniproxy the very
// ConfigMap kube-proxy used (kubeadm mounts its key config.conf as a file).
//
// Every field of the upstream type is known. The fields that mean something
// for the iptables mode become a Config, with kube-proxy's defaults; a
// field miniproxy does not implement gives a Warning saying what miniproxy
// does instead, but only when its value asks for something (a kubeadm file
// lists every field with its zero value, and that must stay quiet); an
// unknown field gives a Warning naming it; a value of the wrong type or an
// invalid one is an error naming the field. The mode must be "" or
// "iptables": running miniproxy from an IPVS or nftables configuration
// would silently change how the node forwards traffic.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"sort"
	"strings"
	"time"

	logsapi "k8s.io/component-base/logs/api/v1"
	"sigs.k8s.io/yaml"
)

// The type the file must declare, as kube-proxy's decoder requires.
const (
	APIVersion = "kubeproxy.config.k8s.io/v1alpha1"
	Kind       = "KubeProxyConfiguration"
)

// kube-proxy's defaults (pkg/proxy/apis/config/v1alpha1/defaults.go), which
// a Config starts from.
const (
	DefaultHealthzPort           = 10256
	DefaultMetricsPort           = 10249
	DefaultMasqueradeBit         = 14
	DefaultSyncPeriod            = 30 * time.Second
	DefaultMinSyncPeriod         = time.Second
	DefaultConntrackMaxPerCore   = 32 * 1024
	DefaultConntrackMin          = 128 * 1024
	DefaultTCPEstablishedTimeout = 24 * time.Hour
	DefaultTCPCloseWaitTimeout   = time.Hour
	defaultConfigSyncPeriod      = 15 * time.Minute
	defaultOOMScoreAdj           = -999
	defaultContentType           = "application/vnd.kubernetes.protobuf"
	defaultQPS                   = 5
	defaultBurst                 = 10
)

// Config is kube-proxy's configuration as miniproxy uses it: the fields of
// a KubeProxyConfiguration that mean something in the iptables mode, with
// kube-proxy's defaults filled in. The file (Load) and the command line
// (cmd/miniproxy binds kube-proxy's flags to these fields) both fill it, so
// that one Validate checks both and --write-config-to and /configz show
// what is in effect. Each field names the file's field it comes from.
type Config struct {
	// Kubeconfig is clientConnection.kubeconfig: the kubeconfig file to use;
	// empty means the in-cluster service account.
	Kubeconfig string
	// ContentType, QPS and Burst are clientConnection's: how the API client
	// talks to the API server (defaults protobuf, 5, 10).
	ContentType string
	QPS         float32
	Burst       int32
	// HostnameOverride is hostnameOverride: the node's name as in its Node
	// object; empty means the host name. (As with kube-proxy, the flag
	// --hostname-override wins over it.)
	HostnameOverride string
	// BindAddress is bindAddress (default 0.0.0.0): when not unspecified,
	// the node's primary IP (the keyword "primary" of nodePortAddresses, and
	// the family of the default healthz and metrics addresses).
	BindAddress netip.Addr
	// HealthzBindAddress is healthzBindAddress as ip:port: the proxier
	// health server (/healthz, /livez). Default 0.0.0.0:10256 ([::]:10256
	// when bindAddress is IPv6); a bare IP gets port 10256; empty disables.
	HealthzBindAddress string
	// MetricsBindAddress is metricsBindAddress as ip:port: /metrics,
	// /proxyMode and /configz. Default 127.0.0.1:10249 ([::1]:10249 when
	// bindAddress is IPv6); a bare IP gets port 10249.
	MetricsBindAddress string
	// BindAddressHardFail is bindAddressHardFail: a health or metrics port
	// that cannot be opened ends the process instead of being retried.
	BindAddressHardFail bool
	// EnableProfiling is enableProfiling: /debug/pprof on the metrics address.
	EnableProfiling bool
	// ShowHiddenMetricsForVersion is showHiddenMetricsForVersion.
	ShowHiddenMetricsForVersion string
	// Mode is mode: "iptables", or "" until cmd/miniproxy applies the
	// platform's default (iptables), as kube-proxy; nothing else is accepted.
	Mode string
	// DetectLocalMode is detectLocalMode: how traffic from this node's pods
	// is told apart (ClusterCIDR, NodeCIDR, BridgeInterface,
	// InterfaceNamePrefix); "" is ClusterCIDR, which cmd/miniproxy fills in
	// as kube-proxy's platform default.
	DetectLocalMode string
	// ClusterCIDRs is clusterCIDR (comma separated, at most one range per
	// family): the pods' ranges for ClusterCIDR mode. nil when not set.
	ClusterCIDRs []netip.Prefix
	// BridgeInterface and InterfaceNamePrefix are detectLocal's, for the
	// modes of those names.
	BridgeInterface     string
	InterfaceNamePrefix string
	// NodePortAddresses is nodePortAddresses as written: CIDRs and the
	// keywords primary, localhost and all (NodePortRanges resolves them);
	// nil means every local address.
	NodePortAddresses []string
	// MasqueradeAll is iptables.masqueradeAll.
	MasqueradeAll bool
	// MasqueradeBit is iptables.masqueradeBit (default 14).
	MasqueradeBit int32
	// LocalhostNodePorts is iptables.localhostNodePorts (default true):
	// NodePorts also answer on 127.0.0.0/8.
	LocalhostNodePorts bool
	// SyncPeriod is iptables.syncPeriod (default 30s).
	SyncPeriod time.Duration
	// MinSyncPeriod is iptables.minSyncPeriod (default 1s).
	MinSyncPeriod time.Duration
	// ConfigSyncPeriod is configSyncPeriod (default 15m): the informers'
	// resync.
	ConfigSyncPeriod time.Duration
	// OOMScoreAdj is oomScoreAdj (default -999).
	OOMScoreAdj int32
	// FeatureGates is featureGates; Validate checks the names against
	// kube-proxy's (pkg/features).
	FeatureGates map[string]bool
	// Conntrack is conntrack: the kernel's connection tracking settings,
	// which kube-proxy sets at start-up (see Conntrack.Sysctls).
	Conntrack Conntrack
	// Logging is logging: format, verbosity, vmodule and the rest, as
	// component-base defines them.
	Logging logsapi.LoggingConfiguration
}

// Conntrack holds the conntrack settings, after kube-proxy's defaulting: a
// zero value means "leave the kernel's value as it is", as in kube-proxy.
type Conntrack struct {
	// MaxPerCore is conntrack.maxPerCore (default 32768): nf_conntrack_max
	// is raised to this times the number of CPUs, at least Min.
	MaxPerCore int32
	// Min is conntrack.min (default 131072).
	Min int32
	// TCPEstablishedTimeout is conntrack.tcpEstablishedTimeout (default 24h).
	TCPEstablishedTimeout time.Duration
	// TCPCloseWaitTimeout is conntrack.tcpCloseWaitTimeout (default 1h).
	TCPCloseWaitTimeout time.Duration
	// TCPBeLiberal is conntrack.tcpBeLiberal (default false).
	TCPBeLiberal bool
	// UDPTimeout is conntrack.udpTimeout (default 0: as is).
	UDPTimeout time.Duration
	// UDPStreamTimeout is conntrack.udpStreamTimeout (default 0: as is).
	UDPStreamTimeout time.Duration
}

// Default returns the Config of a file that sets nothing, which is also
// what every Load starts from and what the flags default to.
func Default() *Config {
	c := &Config{
		ContentType:        defaultContentType,
		QPS:                defaultQPS,
		Burst:              defaultBurst,
		BindAddress:        netip.IPv4Unspecified(),
		HealthzBindAddress: fmt.Sprintf("0.0.0.0:%d", DefaultHealthzPort),
		MetricsBindAddress: fmt.Sprintf("127.0.0.1:%d", DefaultMetricsPort),
		MasqueradeBit:      DefaultMasqueradeBit,
		LocalhostNodePorts: true,
		SyncPeriod:         DefaultSyncPeriod,
		MinSyncPeriod:      DefaultMinSyncPeriod,
		ConfigSyncPeriod:   defaultConfigSyncPeriod,
		OOMScoreAdj:        defaultOOMScoreAdj,
		Conntrack: Conntrack{
			MaxPerCore:            DefaultConntrackMaxPerCore,
			Min:                   DefaultConntrackMin,
			TCPEstablishedTimeout: DefaultTCPEstablishedTimeout,
			TCPCloseWaitTimeout:   DefaultTCPCloseWaitTimeout,
		},
	}
	logsapi.SetRecommendedLoggingConfiguration(&c.Logging)
	return c
}

// The modes of detectLocalMode.
const (
	LocalModeClusterCIDR         = "ClusterCIDR"
	LocalModeNodeCIDR            = "NodeCIDR"
	LocalModeBridgeInterface     = "BridgeInterface"
	LocalModeInterfaceNamePrefix = "InterfaceNamePrefix"
)

// The keywords of nodePortAddresses.
const (
	NodePortsPrimary   = "primary"
	NodePortsLocalhost = "localhost"
	NodePortsAll       = "all"
)

// Warning is something in the file that miniproxy ignores: an unknown
// field, or a known one it does not implement. It names the field so that
// the operator can find it, and says what miniproxy does instead.
type Warning struct {
	// Field is the field's dotted path, e.g. "iptables.localhostNodePorts".
	Field string
	// Message says why the field is ignored and what happens instead.
	Message string
}

// String gives "field: message", the form miniproxy logs.
func (w Warning) String() string { return w.Field + ": " + w.Message }

// FieldError is a value miniproxy cannot use: of the wrong type, out of
// range or invalid. Load returns all of them at once, joined.
type FieldError struct {
	// Field is the field's dotted path, with an index for list elements,
	// e.g. "nodePortAddresses[1]"; "" for the file as a whole.
	Field string
	// Message says what is wrong and what is expected.
	Message string
}

// Error gives "field: message".
func (e *FieldError) Error() string {
	if e.Field == "" {
		return e.Message
	}
	return e.Field + ": " + e.Message
}

// Load reads the KubeProxyConfiguration at path. It returns the Config, the
// warnings in field order, and an error that wraps a *FieldError for every
// field miniproxy cannot use (errors.As finds the first one). On error the
// Config is nil.
func Load(path string) (*Config, []Warning, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read kube-proxy configuration: %w", err)
	}
	c, warns, err := Parse(data)
	if err != nil {
		return nil, warns, fmt.Errorf("kube-proxy configuration %s: %w", path, err)
	}
	return c, warns, nil
}

// documentSep splits a multi-document YAML stream.
var documentSep = regexp.MustCompile(`(?m)^---[ \t]*(#.*)?$`)

// Parse is Load for the file's contents. A YAML stream of several
// documents (a kubeadm configuration file) is accepted when exactly one of
// them is a KubeProxyConfiguration.
func Parse(data []byte) (*Config, []Warning, error) {
	docs := documentSep.Split(string(data), -1)
	var chosen []map[string]any
	var firstErr error
	nonEmpty := 0
	for _, doc := range docs {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		nonEmpty++
		m, err := decode([]byte(doc))
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		if len(docs) == 1 || m["kind"] == Kind {
			chosen = append(chosen, m)
		}
	}
	switch {
	case nonEmpty == 1 && firstErr != nil:
		return nil, nil, firstErr
	case nonEmpty == 0:
		return nil, nil, &FieldError{Message: "the file is empty; want a " + Kind}
	case len(chosen) == 0 && firstErr != nil:
		return nil, nil, firstErr
	case len(chosen) == 0:
		return nil, nil, &FieldError{Field: "kind", Message: fmt.Sprintf("none of the %d documents is a %s", nonEmpty, Kind)}
	case len(chosen) > 1:
		return nil, nil, &FieldError{Field: "kind", Message: fmt.Sprintf("%d documents are a %s; want exactly one", len(chosen), Kind)}
	}
	return interpret(chosen[0])
}

// stripComments drops YAML comment lines, so that a document holding only
// comments counts as empty.
func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l)
			b.WriteByte('\n')
		}
	}
	return b.String()
}

// decode turns one YAML or JSON document into generic values, numbers kept
// as json.Number so that 14 and 14.5 can be told apart. A duplicated key is
// an error, since which of the two values counts would be a guess.
func decode(doc []byte) (map[string]any, error) {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, &FieldError{Message: fmt.Sprintf("not valid YAML or JSON: %v", err)}
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, &FieldError{Message: fmt.Sprintf("not valid YAML or JSON: %v", err)}
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, &FieldError{Message: fmt.Sprintf("want a %s object, got %s", Kind, describe(v))}
	}
	return m, nil
}

// interpret checks a decoded document against the schema and turns what it
// set into a Config.
func interpret(doc map[string]any) (*Config, []Warning, error) {
	var errs []error
	var warns []Warning
	vals := values{}
	walk("", doc, schema, vals, &errs, &warns)
	in := &interpreter{vals: vals, raw: doc, c: Default()}
	in.run()
	errs = append(errs, in.errs...)
	warns = append(warns, in.warns...)
	sort.SliceStable(warns, func(i, j int) bool { return warns[i].Field < warns[j].Field })
	sort.SliceStable(errs, func(i, j int) bool { return fieldOf(errs[i]) < fieldOf(errs[j]) })
	if len(errs) > 0 {
		return nil, warns, errors.Join(errs...)
	}
	return in.c, warns, nil
}

func fieldOf(err error) string {
	var fe *FieldError
	if errors.As(err, &fe) {
		return fe.Field
	}
	return ""
}

// interpreter turns checked values into a Config, collecting warnings and
// errors.
type interpreter struct {
	vals  values
	raw   map[string]any
	c     *Config
	errs  []error
	warns []Warning
}

func (in *interpreter) fail(field, format string, args ...any) {
	in.errs = append(in.errs, &FieldError{Field: field, Message: fmt.Sprintf(format, args...)})
}

func (in *interpreter) warn(field, format string, args ...any) {
	in.warns = append(in.warns, Warning{Field: field, Message: fmt.Sprintf(format, args...)})
}

func (in *interpreter) str(field string) (string, bool) {
	v, ok := in.vals[field].(string)
	return v, ok
}

func (in *interpreter) boolean(field string) (bool, bool) {
	v, ok := in.vals[field].(bool)
	return v, ok
}

func (in *interpreter) integer(field string) (int64, bool) {
	v, ok := in.vals[field].(int64)
	return v, ok
}

func (in *interpreter) duration(field string) (time.Duration, bool) {
	v, ok := in.vals[field].(time.Duration)
	return v, ok
}

func (in *interpreter) run() {
	in.typeMeta()
	in.mode()
	in.client()
	in.addresses()
	in.iptables()
	in.detectLocal()
	in.nodePorts()
	in.conntrack()
	in.logging()
	in.rest()
	if in.errs == nil {
		in.errs = in.c.Validate()
	}
}

func (in *interpreter) typeMeta() {
	switch v, ok := in.str("apiVersion"); {
	case !ok:
		in.fail("apiVersion", "missing; want %s", APIVersion)
	case v != APIVersion:
		in.fail("apiVersion", "want %s, got %q", APIVersion, v)
	}
	switch v, ok := in.str("kind"); {
	case !ok:
		in.fail("kind", "missing; want %s", Kind)
	case v != Kind:
		in.fail("kind", "want %s, got %q", Kind, v)
	}
}

func (in *interpreter) mode() {
	if v, _ := in.str("mode"); v != "" {
		in.c.Mode = v
	}
}

func (in *interpreter) client() {
	in.c.Kubeconfig, _ = in.str("clientConnection.kubeconfig")
	in.c.HostnameOverride, _ = in.str("hostnameOverride")
	// Zero values are kube-proxy's defaults, as its defaulting does.
	if v, _ := in.str("clientConnection.contentType"); v != "" {
		in.c.ContentType = v
	}
	if v, _ := in.str("clientConnection.acceptContentTypes"); v != "" {
		in.warn("clientConnection.acceptContentTypes", "miniproxy's API client chooses its own accepted content types; %q is ignored", v)
	}
	if v, ok := in.vals["clientConnection.qps"].(float64); ok && v != 0 {
		in.c.QPS = float32(v)
	}
	if v, ok := in.integer("clientConnection.burst"); ok && v != 0 {
		in.c.Burst = int32(v)
	}
}

func (in *interpreter) addresses() {
	if v, _ := in.str("bindAddress"); v != "" {
		a, err := netip.ParseAddr(v)
		if err != nil {
			in.fail("bindAddress", "%q is not an IP address", v)
		} else {
			in.c.BindAddress = a.Unmap()
		}
	}
	healthzHost, metricsHost := "0.0.0.0", "127.0.0.1"
	if in.c.BindAddress.Is6() {
		healthzHost, metricsHost = "::", "::1"
	}
	in.c.HealthzBindAddress = in.hostPort("healthzBindAddress", healthzHost, DefaultHealthzPort)
	in.c.MetricsBindAddress = in.hostPort("metricsBindAddress", metricsHost, DefaultMetricsPort)
	in.c.EnableProfiling, _ = in.boolean("enableProfiling")
	in.c.BindAddressHardFail, _ = in.boolean("bindAddressHardFail")
}

// hostPort reads a bind address as kube-proxy does: empty means the default
// host and port, a bare IP gets the default port, otherwise it must be
// ip:port with a port in 1..65535.
func (in *interpreter) hostPort(field, defaultHost string, defaultPort int) string {
	v, _ := in.str(field)
	if v == "" {
		return netip.AddrPortFrom(netip.MustParseAddr(defaultHost), uint16(defaultPort)).String()
	}
	if a, err := netip.ParseAddr(v); err == nil {
		return netip.AddrPortFrom(a.Unmap(), uint16(defaultPort)).String()
	}
	ap, err := netip.ParseAddrPort(v)
	if err != nil || ap.Port() == 0 {
		in.fail(field, "%q is not ip:port (e.g. \"0.0.0.0:%d\", \"[::]:%d\") with a port in 1..65535, nor a bare IP", v, defaultPort, defaultPort)
		return ""
	}
	return ap.String()
}

func (in *interpreter) iptables() {
	in.c.MasqueradeAll, _ = in.boolean("iptables.masqueradeAll")
	if v, ok := in.integer("iptables.masqueradeBit"); ok {
		in.c.MasqueradeBit = int32(v)
	}
	if v, ok := in.boolean("iptables.localhostNodePorts"); ok {
		in.c.LocalhostNodePorts = v
	}
	// Zero means the default, as in kube-proxy's defaulting.
	if v, ok := in.duration("iptables.syncPeriod"); ok && v != 0 {
		in.c.SyncPeriod = v
	}
	if v, ok := in.duration("iptables.minSyncPeriod"); ok && v != 0 {
		in.c.MinSyncPeriod = v
	}
}

func (in *interpreter) detectLocal() {
	v, _ := in.str("clusterCIDR")
	list, err := ParseClusterCIDRs(v)
	if err != nil {
		in.fail("clusterCIDR", "%v", err)
	}
	in.c.ClusterCIDRs = list
	if mode, _ := in.str("detectLocalMode"); mode != "" {
		in.c.DetectLocalMode = mode
	}
	in.c.BridgeInterface, _ = in.str("detectLocal.bridgeInterface")
	in.c.InterfaceNamePrefix, _ = in.str("detectLocal.interfaceNamePrefix")
}

// ParseClusterCIDRs reads a clusterCIDR value (--cluster-cidr): comma
// separated ranges, at most one per family.
func ParseClusterCIDRs(v string) ([]netip.Prefix, error) {
	families := map[bool]bool{}
	var list []netip.Prefix
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR (e.g. 10.244.0.0/16)", s)
		}
		if families[p.Addr().Is4()] {
			return nil, fmt.Errorf("%q has more than one range of a family; want one range, or an IPv4 and an IPv6 range", v)
		}
		families[p.Addr().Is4()] = true
		list = append(list, p.Masked())
	}
	return list, nil
}

func (in *interpreter) nodePorts() {
	if list, ok := in.vals["nodePortAddresses"].([]string); ok && len(list) > 0 {
		in.c.NodePortAddresses = list
	}
}

func (in *interpreter) conntrack() {
	ct := &in.c.Conntrack
	if v, ok := in.integer("conntrack.maxPerCore"); ok {
		ct.MaxPerCore = int32(v)
	}
	if v, ok := in.integer("conntrack.min"); ok {
		ct.Min = int32(v)
	}
	for _, f := range []struct {
		name string
		dst  *time.Duration
	}{
		{"conntrack.tcpEstablishedTimeout", &ct.TCPEstablishedTimeout},
		{"conntrack.tcpCloseWaitTimeout", &ct.TCPCloseWaitTimeout},
		{"conntrack.udpTimeout", &ct.UDPTimeout},
		{"conntrack.udpStreamTimeout", &ct.UDPStreamTimeout},
	} {
		if v, ok := in.duration(f.name); ok {
			*f.dst = v
		}
	}
	ct.TCPBeLiberal, _ = in.boolean("conntrack.tcpBeLiberal")
}

func (in *interpreter) logging() {
	raw, ok := in.raw["logging"]
	if !ok {
		return
	}
	// component-base's own type reads its section, so that every logging
	// setting means what it means in kube-proxy.
	j, err := json.Marshal(raw)
	if err == nil {
		err = json.Unmarshal(j, &in.c.Logging)
	}
	if err != nil {
		in.fail("logging", "%v", err)
	}
	// kube-proxy's defaulting: an empty format is text, a zero flush
	// frequency 5s.
	logsapi.SetRecommendedLoggingConfiguration(&in.c.Logging)
}

// rest reads the fields that need no interpretation.
func (in *interpreter) rest() {
	if v, ok := in.vals["featureGates"].(map[string]bool); ok && len(v) > 0 {
		in.c.FeatureGates = v
	}
	in.c.ShowHiddenMetricsForVersion, _ = in.str("showHiddenMetricsForVersion")
	if v, ok := in.integer("oomScoreAdj"); ok {
		in.c.OOMScoreAdj = int32(v)
	}
	if v, ok := in.duration("configSyncPeriod"); ok && v != 0 {
		in.c.ConfigSyncPeriod = v
	}
	if v, _ := in.str("portRange"); v != "" {
		in.warn("portRange", "it applied to kube-proxy's userspace mode, which no longer exists; ignored")
	}
}
