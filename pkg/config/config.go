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

// Config is what miniproxy takes from a KubeProxyConfiguration: the fields
// that apply to the iptables mode, with kube-proxy's defaults filled in.
// Each field names the file's field it comes from.
type Config struct {
	// Kubeconfig is clientConnection.kubeconfig: the kubeconfig file to use;
	// empty means the in-cluster service account.
	Kubeconfig string
	// HostnameOverride is hostnameOverride: the node's name as in its Node
	// object; empty means the host name. (As with kube-proxy, the flag
	// --hostname-override wins over it.)
	HostnameOverride string
	// BindAddress is bindAddress (default 0.0.0.0). miniproxy finds the
	// node's addresses itself; the family of this address only decides
	// the default healthz and metrics addresses, as in kube-proxy.
	BindAddress netip.Addr
	// HealthzBindAddress is healthzBindAddress as ip:port: the proxier
	// health server (/healthz, /livez). Default 0.0.0.0:10256 ([::]:10256
	// when bindAddress is IPv6); a bare IP gets port 10256.
	HealthzBindAddress string
	// MetricsBindAddress is metricsBindAddress as ip:port: /metrics and
	// /proxyMode. Default 127.0.0.1:10249 ([::1]:10249 when bindAddress is
	// IPv6); a bare IP gets port 10249.
	MetricsBindAddress string
	// EnableProfiling is enableProfiling: /debug/pprof on the metrics address.
	EnableProfiling bool
	// ClusterCIDRs is clusterCIDR (comma separated, at most one range per
	// family): traffic from inside it is the pods'. nil when not set.
	ClusterCIDRs []netip.Prefix
	// NodePortAddresses is nodePortAddresses: the ranges of the local
	// addresses that accept NodePorts; nil means every local address (the
	// default, and the keyword "all").
	NodePortAddresses []netip.Prefix
	// MasqueradeAll is iptables.masqueradeAll.
	MasqueradeAll bool
	// MasqueradeBit is iptables.masqueradeBit (default 14).
	MasqueradeBit int
	// SyncPeriod is iptables.syncPeriod (default 30s).
	SyncPeriod time.Duration
	// MinSyncPeriod is iptables.minSyncPeriod (default 1s).
	MinSyncPeriod time.Duration
	// Conntrack is conntrack: the kernel's connection tracking settings,
	// which kube-proxy sets at start-up (see Conntrack.Sysctls).
	Conntrack Conntrack
	// Verbosity is logging.verbosity (default 0); as with kube-proxy, the
	// flag -v wins over it.
	Verbosity int
}

// Conntrack holds the conntrack settings, after kube-proxy's defaulting: a
// zero value means "leave the kernel's value as it is", as in kube-proxy.
type Conntrack struct {
	// MaxPerCore is conntrack.maxPerCore (default 32768): nf_conntrack_max
	// is raised to this times the number of CPUs, at least Min.
	MaxPerCore int
	// Min is conntrack.min (default 131072).
	Min int
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
// what every Load starts from.
func Default() *Config {
	return &Config{
		BindAddress:        netip.IPv4Unspecified(),
		HealthzBindAddress: fmt.Sprintf("0.0.0.0:%d", DefaultHealthzPort),
		MetricsBindAddress: fmt.Sprintf("127.0.0.1:%d", DefaultMetricsPort),
		MasqueradeBit:      DefaultMasqueradeBit,
		SyncPeriod:         DefaultSyncPeriod,
		MinSyncPeriod:      DefaultMinSyncPeriod,
		Conntrack: Conntrack{
			MaxPerCore:            DefaultConntrackMaxPerCore,
			Min:                   DefaultConntrackMin,
			TCPEstablishedTimeout: DefaultTCPEstablishedTimeout,
			TCPCloseWaitTimeout:   DefaultTCPCloseWaitTimeout,
		},
	}
}

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
	in := &interpreter{vals: vals, c: Default()}
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
	in.ignored()
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
	if v, _ := in.str("mode"); v != "" && v != "iptables" {
		in.fail("mode", "miniproxy implements only the iptables mode, not %q; set mode to \"iptables\" or leave it empty", v)
	}
}

func (in *interpreter) client() {
	in.c.Kubeconfig, _ = in.str("clientConnection.kubeconfig")
	in.c.HostnameOverride, _ = in.str("hostnameOverride")
	if v, _ := in.str("clientConnection.contentType"); v != "" && v != defaultContentType {
		in.warn("clientConnection.contentType", "miniproxy's API client chooses its own content type; %q is ignored", v)
	}
	if v, _ := in.str("clientConnection.acceptContentTypes"); v != "" {
		in.warn("clientConnection.acceptContentTypes", "miniproxy's API client chooses its own content types; %q is ignored", v)
	}
	if v, ok := in.vals["clientConnection.qps"].(float64); ok && v != 0 && v != defaultQPS {
		in.warn("clientConnection.qps", "miniproxy's API client has its own rate limit; %v is ignored", v)
	}
	if v, ok := in.integer("clientConnection.burst"); ok && v != 0 && v != defaultBurst {
		in.warn("clientConnection.burst", "miniproxy's API client has its own burst limit; %d is ignored", v)
	}
}

func (in *interpreter) addresses() {
	if v, _ := in.str("bindAddress"); v != "" {
		a, err := netip.ParseAddr(v)
		if err != nil {
			in.fail("bindAddress", "%q is not an IP address", v)
		} else {
			in.c.BindAddress = a.Unmap()
			if !a.IsUnspecified() {
				in.warn("bindAddress", "miniproxy takes the node's addresses from its interfaces; %s only decides the family of the default healthz and metrics addresses", v)
			}
		}
	}
	healthzHost, metricsHost := "0.0.0.0", "127.0.0.1"
	if in.c.BindAddress.Is6() {
		healthzHost, metricsHost = "::", "::1"
	}
	in.c.HealthzBindAddress = in.hostPort("healthzBindAddress", healthzHost, DefaultHealthzPort)
	in.c.MetricsBindAddress = in.hostPort("metricsBindAddress", metricsHost, DefaultMetricsPort)
	in.c.EnableProfiling, _ = in.boolean("enableProfiling")
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
		if v < 0 || v > 31 {
			in.fail("iptables.masqueradeBit", "%d is not in 0..31", v)
		} else {
			in.c.MasqueradeBit = int(v)
		}
	}
	if v, ok := in.boolean("iptables.localhostNodePorts"); ok && v {
		in.warn("iptables.localhostNodePorts", "miniproxy never serves NodePorts on localhost (it would need route_localnet=1, CVE-2020-8558; see docs/decisions.md); NodePorts answer on the node's other addresses")
	}
	// Zero means the default, as in kube-proxy's defaulting.
	if v, ok := in.duration("iptables.syncPeriod"); ok && v != 0 {
		if v < 0 {
			in.fail("iptables.syncPeriod", "%s must be greater than 0", v)
		} else {
			in.c.SyncPeriod = v
		}
	}
	if v, ok := in.duration("iptables.minSyncPeriod"); ok && v != 0 {
		if v < 0 {
			in.fail("iptables.minSyncPeriod", "%s must not be negative", v)
		} else {
			in.c.MinSyncPeriod = v
		}
	}
	if in.c.MinSyncPeriod > in.c.SyncPeriod {
		in.fail("iptables.minSyncPeriod", "%s is longer than iptables.syncPeriod %s", in.c.MinSyncPeriod, in.c.SyncPeriod)
	}
}

func (in *interpreter) detectLocal() {
	v, _ := in.str("clusterCIDR")
	families := map[bool]bool{}
	var list []netip.Prefix
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			in.fail("clusterCIDR", "%q is not a CIDR (e.g. 10.244.0.0/16)", s)
			continue
		}
		if families[p.Addr().Is4()] {
			in.fail("clusterCIDR", "%q has more than one range of a family; want one range, or an IPv4 and an IPv6 range", v)
			continue
		}
		families[p.Addr().Is4()] = true
		list = append(list, p.Masked())
	}
	in.c.ClusterCIDRs = list

	mode, _ := in.str("detectLocalMode")
	switch mode {
	case "", "ClusterCIDR":
	case "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix":
		what := "without clusterCIDR no traffic counts as the pods' (ClusterIP traffic is not masqueraded and Local-policy Services treat pods like outside clients)"
		if len(list) > 0 {
			what = "here: " + v
		}
		in.warn("detectLocalMode", "%q is not supported; miniproxy tells the pods' traffic by clusterCIDR only (%s)", mode, what)
	default:
		in.fail("detectLocalMode", "%q is not one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix", mode)
	}
}

func (in *interpreter) nodePorts() {
	list, ok := in.vals["nodePortAddresses"].([]string)
	if !ok || len(list) == 0 {
		return
	}
	all, localhost := false, false
	var out []netip.Prefix
	for i, s := range list {
		field := fmt.Sprintf("nodePortAddresses[%d]", i)
		switch s {
		case "all":
			all = true
		case "localhost":
			localhost = true
			in.warn(field, "miniproxy never serves NodePorts on localhost (see docs/decisions.md); the keyword is ignored")
		case "primary":
			in.fail(field, "the keyword \"primary\" is not supported: miniproxy does not read the Node object's addresses for this; list the CIDRs of the node network instead (e.g. 10.240.0.0/24)")
		default:
			p, err := netip.ParsePrefix(s)
			if err != nil {
				in.fail(field, "%q is neither a CIDR nor one of the keywords all, localhost, primary", s)
				continue
			}
			out = append(out, p.Masked())
		}
	}
	switch {
	case all:
		in.c.NodePortAddresses = nil
	case len(out) > 0:
		in.c.NodePortAddresses = out
	case localhost:
		in.fail("nodePortAddresses", "names only localhost, where miniproxy never serves NodePorts; remove the field to serve them on every local address, or list CIDRs")
	}
}

func (in *interpreter) conntrack() {
	ct := &in.c.Conntrack
	for _, f := range []struct {
		name string
		dst  *int
	}{{"conntrack.maxPerCore", &ct.MaxPerCore}, {"conntrack.min", &ct.Min}} {
		if v, ok := in.integer(f.name); ok {
			if v < 0 {
				in.fail(f.name, "%d must not be negative (0 leaves the kernel's value as it is)", v)
			} else {
				*f.dst = int(v)
			}
		}
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
			if v < 0 {
				in.fail(f.name, "%s must not be negative (0 leaves the kernel's value as it is)", v)
			} else {
				*f.dst = v
			}
		}
	}
	ct.TCPBeLiberal, _ = in.boolean("conntrack.tcpBeLiberal")
}

func (in *interpreter) logging() {
	if v, ok := in.integer("logging.verbosity"); ok {
		in.c.Verbosity = int(v)
	}
	if v, _ := in.str("logging.format"); v != "" && v != "text" {
		in.warn("logging.format", "miniproxy logs text (key=value) only; %q is ignored", v)
	}
	if v, ok := in.vals["logging.vmodule"].([]any); ok && len(v) > 0 {
		in.warn("logging.vmodule", "miniproxy has no per-file verbosity; ignored (use logging.verbosity)")
	}
}

// ignored warns about the known fields miniproxy does not implement, when
// their value asks for something (zero values and kube-proxy's defaults
// stay quiet). The IPVS, nftables and Windows sections only matter in
// those modes, which mode already refuses, so they are ignored as
// kube-proxy's iptables mode ignores them.
func (in *interpreter) ignored() {
	if v, ok := in.vals["featureGates"].(map[string]bool); ok && len(v) > 0 {
		var gates []string
		for _, k := range sortedKeys(v) {
			gates = append(gates, fmt.Sprintf("%s=%v", k, v[k]))
		}
		in.warn("featureGates", "miniproxy has no feature gates; %s ignored", strings.Join(gates, ","))
	}
	if v, _ := in.str("showHiddenMetricsForVersion"); v != "" {
		in.warn("showHiddenMetricsForVersion", "miniproxy has no hidden metrics; ignored")
	}
	if v, ok := in.integer("oomScoreAdj"); ok && v != defaultOOMScoreAdj {
		in.warn("oomScoreAdj", "miniproxy does not change its OOM score (the kubelet sets it from the pod's priority class and resources); %d is ignored", v)
	}
	if v, ok := in.duration("configSyncPeriod"); ok && v != 0 && v != defaultConfigSyncPeriod {
		in.warn("configSyncPeriod", "miniproxy's informers never relist on a timer (iptables.syncPeriod is its periodic resync of the rules); %s is ignored", v)
	}
	if v, _ := in.str("portRange"); v != "" {
		in.warn("portRange", "it applied to kube-proxy's userspace mode, which no longer exists; ignored")
	}
}
