package config

import (
	"bytes"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/api/resource"
	logsapi "k8s.io/component-base/logs/api/v1"
)

// header is the type every test file starts with.
const header = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"

// want returns Default() changed by edit.
func want(edit func(c *Config)) *Config {
	c := Default()
	if edit != nil {
		edit(c)
	}
	return c
}

func prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range s {
		out = append(out, netip.MustParsePrefix(p))
	}
	return out
}

// fields lists the warnings' fields, for comparisons.
func fields(ws []Warning) []string {
	var out []string
	for _, w := range ws {
		out = append(out, w.Field)
	}
	return out
}

// A file that sets nothing, with the platform's defaults kube-proxy fills
// in (mode iptables, detectLocalMode ClusterCIDR), is written out byte for
// byte as kube-proxy v1.37.2's --write-config-to wrote its defaults.
func TestDefaultsAreKubeProxys(t *testing.T) {
	c, warns, err := Parse([]byte(header))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if len(warns) != 0 {
		t.Errorf("warnings for a file that sets nothing: %v", warns)
	}
	c.Mode, c.DetectLocalMode = "iptables", LocalModeClusterCIDR
	var got bytes.Buffer
	if err := c.WriteYAML(&got); err != nil {
		t.Fatal(err)
	}
	upstream, err := os.ReadFile(filepath.Join("testdata", "write-config-to.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(upstream), got.String()); diff != "" {
		t.Errorf("defaults written out (-kube-proxy's +miniproxy's):\n%s", diff)
	}
}

// TestWhatKubeProxyWrites reads real kube-proxy files: what `kube-proxy
// --write-config-to` printed (v1.37.2: every default spelled out) and the
// config.conf of the ConfigMap kubeadm writes (every field, zero values).
func TestWhatKubeProxyWrites(t *testing.T) {
	tests := []struct {
		file      string
		want      *Config
		wantWarns []string
	}{
		{
			file: "write-config-to.yaml",
			want: want(func(c *Config) { c.Mode, c.DetectLocalMode = "iptables", "ClusterCIDR" }),
		},
		{
			file: "kubeadm-config.conf",
			want: want(func(c *Config) {
				c.Kubeconfig = "/var/lib/kube-proxy/kubeconfig.conf"
				c.ClusterCIDRs = prefixes("10.244.0.0/16")
			}),
		},
		{
			file: "kubeadm-init.yaml",
			want: want(func(c *Config) {
				c.ClusterCIDRs = prefixes("10.244.0.0/16")
				c.SyncPeriod = time.Minute
				c.Mode = "iptables"
			}),
		},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			c, warns, err := Load(filepath.Join("testdata", tc.file))
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if diff := cmp.Diff(tc.want, c, addrCmp); diff != "" {
				t.Errorf("config (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.wantWarns, fields(warns)); diff != "" {
				t.Errorf("warnings %v (-want +got fields):\n%s", warns, diff)
			}
		})
	}
}

// addrCmp compares netip values by value (cmp cannot look inside them).
var addrCmp = cmp.Options{
	cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
	cmp.Comparer(func(a, b resource.QuantityValue) bool { return a.Cmp(b.Quantity) == 0 }),
}

// TestSupportedFields sets each field that means something for the
// iptables mode and checks what it becomes.
func TestSupportedFields(t *testing.T) {
	tests := []struct {
		name      string
		yaml      string
		want      *Config
		wantWarns []string
	}{
		{"clientConnection.kubeconfig", "clientConnection:\n  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\n",
			want(func(c *Config) { c.Kubeconfig = "/var/lib/kube-proxy/kubeconfig.conf" }), nil},
		{"hostnameOverride", "hostnameOverride: node-1\n",
			want(func(c *Config) { c.HostnameOverride = "node-1" }), nil},
		{"bindAddress 0.0.0.0 changes nothing", "bindAddress: 0.0.0.0\n", Default(), nil},
		{"bindAddress :: moves the default servers to IPv6", "bindAddress: '::'\n",
			want(func(c *Config) {
				c.BindAddress = netip.IPv6Unspecified()
				c.HealthzBindAddress, c.MetricsBindAddress = "[::]:10256", "[::1]:10249"
			}), nil},
		{"bindAddress of a node address is its primary IP", "bindAddress: 10.240.0.3\n",
			want(func(c *Config) { c.BindAddress = netip.MustParseAddr("10.240.0.3") }), nil},
		{"bindAddressHardFail", "bindAddressHardFail: true\n",
			want(func(c *Config) { c.BindAddressHardFail = true }), nil},
		{"healthzBindAddress ip:port", "healthzBindAddress: 10.240.0.3:10256\n",
			want(func(c *Config) { c.HealthzBindAddress = "10.240.0.3:10256" }), nil},
		{"healthzBindAddress bare IP gets port 10256", "healthzBindAddress: 10.240.0.3\n",
			want(func(c *Config) { c.HealthzBindAddress = "10.240.0.3:10256" }), nil},
		{"healthzBindAddress IPv6", "healthzBindAddress: '[::]:20256'\n",
			want(func(c *Config) { c.HealthzBindAddress = "[::]:20256" }), nil},
		{"metricsBindAddress ip:port", "metricsBindAddress: 0.0.0.0:10249\n",
			want(func(c *Config) { c.MetricsBindAddress = "0.0.0.0:10249" }), nil},
		{"metricsBindAddress bare IPv6 gets port 10249", "metricsBindAddress: '::'\n",
			want(func(c *Config) { c.MetricsBindAddress = "[::]:10249" }), nil},
		{"enableProfiling", "enableProfiling: true\n",
			want(func(c *Config) { c.EnableProfiling = true }), nil},
		{"clusterCIDR", "clusterCIDR: 10.244.0.0/16\n",
			want(func(c *Config) { c.ClusterCIDRs = prefixes("10.244.0.0/16") }), nil},
		{"clusterCIDR dual-stack, with blanks, host bits masked", "clusterCIDR: '10.244.0.0/16, fd00:244::1/56'\n",
			want(func(c *Config) { c.ClusterCIDRs = prefixes("10.244.0.0/16", "fd00:244::/56") }), nil},
		{"detectLocalMode ClusterCIDR", "detectLocalMode: ClusterCIDR\nclusterCIDR: 10.244.0.0/16\n",
			want(func(c *Config) { c.ClusterCIDRs, c.DetectLocalMode = prefixes("10.244.0.0/16"), "ClusterCIDR" }), nil},
		{"detectLocalMode NodeCIDR", "detectLocalMode: NodeCIDR\n",
			want(func(c *Config) { c.DetectLocalMode = "NodeCIDR" }), nil},
		{"detectLocalMode BridgeInterface", "detectLocalMode: BridgeInterface\ndetectLocal:\n  bridgeInterface: cbr0\n",
			want(func(c *Config) { c.DetectLocalMode, c.BridgeInterface = "BridgeInterface", "cbr0" }), nil},
		{"detectLocalMode InterfaceNamePrefix", "detectLocalMode: InterfaceNamePrefix\ndetectLocal:\n  interfaceNamePrefix: veth\n",
			want(func(c *Config) { c.DetectLocalMode, c.InterfaceNamePrefix = "InterfaceNamePrefix", "veth" }), nil},
		{"nodePortAddresses CIDRs", "nodePortAddresses: [10.240.0.0/24, 'fd00:240::/64']\n",
			want(func(c *Config) { c.NodePortAddresses = []string{"10.240.0.0/24", "fd00:240::/64"} }), nil},
		{"nodePortAddresses keywords", "nodePortAddresses: [primary, localhost, all]\n",
			want(func(c *Config) { c.NodePortAddresses = []string{"primary", "localhost", "all"} }), nil},
		{"nodePortAddresses empty list means every address", "nodePortAddresses: []\n", Default(), nil},
		{"iptables.masqueradeAll", "iptables:\n  masqueradeAll: true\n",
			want(func(c *Config) { c.MasqueradeAll = true }), nil},
		{"iptables.masqueradeBit", "iptables:\n  masqueradeBit: 15\n",
			want(func(c *Config) { c.MasqueradeBit = 15 }), nil},
		{"iptables.masqueradeBit 0 is a bit, not the default", "iptables:\n  masqueradeBit: 0\n",
			want(func(c *Config) { c.MasqueradeBit = 0 }), nil},
		{"iptables.syncPeriod", "iptables:\n  syncPeriod: 1m30s\n",
			want(func(c *Config) { c.SyncPeriod = 90 * time.Second }), nil},
		{"iptables.syncPeriod 0s means the default", "iptables:\n  syncPeriod: 0s\n", Default(), nil},
		{"iptables.minSyncPeriod", "iptables:\n  minSyncPeriod: 10s\n",
			want(func(c *Config) { c.MinSyncPeriod = 10 * time.Second }), nil},
		{"iptables.minSyncPeriod 0s means the default", "iptables:\n  minSyncPeriod: 0s\n", Default(), nil},
		{"iptables.localhostNodePorts false", "iptables:\n  localhostNodePorts: false\n",
			want(func(c *Config) { c.LocalhostNodePorts = false }), nil},
		{"conntrack.maxPerCore", "conntrack:\n  maxPerCore: 65536\n",
			want(func(c *Config) { c.Conntrack.MaxPerCore = 65536 }), nil},
		{"conntrack.maxPerCore 0 leaves the limit alone", "conntrack:\n  maxPerCore: 0\n",
			want(func(c *Config) { c.Conntrack.MaxPerCore = 0 }), nil},
		{"conntrack.min", "conntrack:\n  min: 262144\n",
			want(func(c *Config) { c.Conntrack.Min = 262144 }), nil},
		{"conntrack.tcpEstablishedTimeout", "conntrack:\n  tcpEstablishedTimeout: 2h\n",
			want(func(c *Config) { c.Conntrack.TCPEstablishedTimeout = 2 * time.Hour }), nil},
		{"conntrack.tcpEstablishedTimeout 0s leaves it alone", "conntrack:\n  tcpEstablishedTimeout: 0s\n",
			want(func(c *Config) { c.Conntrack.TCPEstablishedTimeout = 0 }), nil},
		{"conntrack.tcpCloseWaitTimeout", "conntrack:\n  tcpCloseWaitTimeout: 30m\n",
			want(func(c *Config) { c.Conntrack.TCPCloseWaitTimeout = 30 * time.Minute }), nil},
		{"conntrack.tcpBeLiberal", "conntrack:\n  tcpBeLiberal: true\n",
			want(func(c *Config) { c.Conntrack.TCPBeLiberal = true }), nil},
		{"conntrack.udpTimeout", "conntrack:\n  udpTimeout: 30s\n",
			want(func(c *Config) { c.Conntrack.UDPTimeout = 30 * time.Second }), nil},
		{"conntrack.udpStreamTimeout", "conntrack:\n  udpStreamTimeout: 2m\n",
			want(func(c *Config) { c.Conntrack.UDPStreamTimeout = 2 * time.Minute }), nil},
		{"logging.verbosity", "logging:\n  verbosity: 4\n",
			want(func(c *Config) { c.Logging.Verbosity = 4 }), nil},
		{"logging.format json", "logging:\n  format: json\n",
			want(func(c *Config) { c.Logging.Format = "json" }), nil},
		{"logging.vmodule", "logging:\n  vmodule:\n  - filePattern: proxier.go\n    verbosity: 5\n",
			want(func(c *Config) {
				c.Logging.VModule = logsapi.VModuleConfiguration{{FilePattern: "proxier.go", Verbosity: 5}}
			}), nil},
		{"mode iptables", "mode: iptables\n", want(func(c *Config) { c.Mode = "iptables" }), nil},
		{"featureGates", "featureGates:\n  AllowServiceExternalIPs: false\n",
			want(func(c *Config) { c.FeatureGates = map[string]bool{"AllowServiceExternalIPs": false} }), nil},
		{"showHiddenMetricsForVersion", "showHiddenMetricsForVersion: '1.36'\n",
			want(func(c *Config) { c.ShowHiddenMetricsForVersion = "1.36" }), nil},
		{"oomScoreAdj", "oomScoreAdj: -500\n", want(func(c *Config) { c.OOMScoreAdj = -500 }), nil},
		{"configSyncPeriod", "configSyncPeriod: 5m\n", want(func(c *Config) { c.ConfigSyncPeriod = 5 * time.Minute }), nil},
		{"clientConnection", "clientConnection:\n  qps: 50\n  burst: 100\n  contentType: application/json\n",
			want(func(c *Config) { c.QPS, c.Burst, c.ContentType = 50, 100, "application/json" }), nil},
		{"null is as if absent", "iptables:\n  syncPeriod: null\n  masqueradeBit: null\nclusterCIDR: null\n", Default(), nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, warns, err := Parse([]byte(header + tc.yaml))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if diff := cmp.Diff(tc.want, c, addrCmp); diff != "" {
				t.Errorf("config (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.wantWarns, fields(warns)); diff != "" {
				t.Errorf("warnings %v (-want +got fields):\n%s", warns, diff)
			}
		})
	}
}

// TestJSON reads the same settings written as JSON, which kube-proxy
// accepts too.
func TestJSON(t *testing.T) {
	in := `{"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
		"clusterCIDR": "10.244.0.0/16", "iptables": {"masqueradeBit": 15, "syncPeriod": "10s"},
		"conntrack": {"maxPerCore": 0}}`
	c, warns, err := Parse([]byte(in))
	if err != nil || len(warns) != 0 {
		t.Fatalf("Parse: %v, warnings %v", err, warns)
	}
	expected := want(func(c *Config) {
		c.ClusterCIDRs = prefixes("10.244.0.0/16")
		c.MasqueradeBit = 15
		c.SyncPeriod = 10 * time.Second
		c.Conntrack.MaxPerCore = 0
	})
	if diff := cmp.Diff(expected, c, addrCmp); diff != "" {
		t.Errorf("config (-want +got):\n%s", diff)
	}
}

// TestUnsupportedFields sets fields miniproxy does not implement: the file
// still loads, and each gives one warning naming the field and saying
// what miniproxy does instead.
func TestUnsupportedFields(t *testing.T) {
	tests := []struct {
		yaml      string
		wantField string
		wantText  string
		want      *Config
	}{
		{"portRange: 30000-32767\n", "portRange", "userspace mode", nil},
		{"clientConnection:\n  acceptContentTypes: application/json\n", "clientConnection.acceptContentTypes", "own accepted content types", nil},
	}
	for _, tc := range tests {
		t.Run(tc.wantField, func(t *testing.T) {
			c, warns, err := Parse([]byte(header + tc.yaml))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if len(warns) != 1 || warns[0].Field != tc.wantField || !strings.Contains(warns[0].Message, tc.wantText) {
				t.Errorf("warnings = %v, want one on %s saying %q", warns, tc.wantField, tc.wantText)
			}
			if !strings.HasPrefix(warns[0].String(), tc.wantField+": ") {
				t.Errorf("Warning.String() = %q, want it to start with the field", warns[0].String())
			}
			if tc.want == nil {
				tc.want = Default()
			}
			if diff := cmp.Diff(tc.want, c, addrCmp); diff != "" {
				t.Errorf("config (-want +got):\n%s", diff)
			}
		})
	}
}

// TestQuietFields sets fields miniproxy ignores to values that ask for
// nothing (their zero value or kube-proxy's default), and the sections of
// other modes, which kube-proxy's iptables mode ignores as well: no
// warning.
func TestQuietFields(t *testing.T) {
	in := header + `
bindAddressHardFail: true
clientConnection: {qps: 5, burst: 10, contentType: application/vnd.kubernetes.protobuf}
configSyncPeriod: 15m
oomScoreAdj: -999
featureGates: {}
logging: {format: text, flushFrequency: 5s, options: {json: {infoBufferSize: "0"}}}
ipvs: {scheduler: rr, strictARP: true, syncPeriod: 5s, excludeCIDRs: [10.0.0.0/8]}
nftables: {masqueradeAll: true, masqueradeBit: 3}
winkernel: {networkName: vxlan0, enableDSR: true}
windowsRunAsService: true
`
	c, warns, err := Parse([]byte(in))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if len(warns) != 0 {
		t.Errorf("warnings = %v, want none", warns)
	}
	if diff := cmp.Diff(want(func(c *Config) { c.BindAddressHardFail = true }), c, addrCmp); diff != "" {
		t.Errorf("config (-want +got):\n%s", diff)
	}
}

func TestUnknownFields(t *testing.T) {
	in := header + `
udpIdleTimeout: 250ms
resourceContainer: /kube-proxy
iptables:
  SyncPeriod: 10s
  syncPeriod: 20s
conntrack:
  maxPerCpu: 1
`
	c, warns, err := Parse([]byte(in))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	wantFields := []string{"conntrack.maxPerCpu", "iptables.SyncPeriod", "resourceContainer", "udpIdleTimeout"}
	if diff := cmp.Diff(wantFields, fields(warns)); diff != "" {
		t.Fatalf("warnings %v (-want +got fields):\n%s", warns, diff)
	}
	for _, w := range warns {
		if !strings.Contains(w.Message, "unknown field") || !strings.Contains(w.Message, "ignored") {
			t.Errorf("warning %q does not say the field is unknown and ignored", w)
		}
	}
	if !strings.Contains(warns[1].Message, `did you mean "syncPeriod"`) {
		t.Errorf("warning %q does not point at syncPeriod", warns[1])
	}
	if c.SyncPeriod != 20*time.Second {
		t.Errorf("SyncPeriod = %s, want 20s from the well-spelt field", c.SyncPeriod)
	}
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name string
		in   string // the whole file; header is not added
		want []string
	}{
		{"duration that does not parse", header + "iptables:\n  syncPeriod: abc\n",
			[]string{`iptables.syncPeriod: cannot parse "abc" as a duration`}},
		{"duration given as a number", header + "iptables:\n  minSyncPeriod: 30\n",
			[]string{`iptables.minSyncPeriod: want a duration such as "30s" or "1m", got the number 30`}},
		{"integer given as a string", header + "iptables:\n  masqueradeBit: \"14\"\n",
			[]string{`iptables.masqueradeBit: want a whole number, got the string "14"`}},
		{"integer with a fraction", header + "iptables:\n  masqueradeBit: 14.5\n",
			[]string{`iptables.masqueradeBit: want a whole number, got 14.5`}},
		{"masquerade bit out of range", header + "iptables:\n  masqueradeBit: 32\n",
			[]string{`iptables.masqueradeBit: 32 must be within the range [0, 31]`}},
		{"boolean given as a string", header + "iptables:\n  masqueradeAll: \"true\"\n",
			[]string{`iptables.masqueradeAll: want true or false, got the string "true"`}},
		{"object given as a string", header + "iptables: fast\n",
			[]string{`iptables: want an object, got the string "fast"`}},
		{"int32 overflow", header + "conntrack:\n  min: 4294967296\n",
			[]string{`conntrack.min: 4294967296 is out of range`}},
		{"negative conntrack setting", header + "conntrack:\n  maxPerCore: -1\n  udpTimeout: -5s\n",
			[]string{`conntrack.maxPerCore: -1 must be greater than or equal to 0`, `conntrack.udpTimeout: -5s must be greater than or equal to 0`}},
		{"negative sync period", header + "iptables:\n  syncPeriod: -1s\n",
			[]string{`iptables.syncPeriod: -1s must be greater than 0`}},
		{"min sync period longer than sync period", header + "iptables:\n  syncPeriod: 10s\n  minSyncPeriod: 1m\n",
			[]string{`iptables.minSyncPeriod: 1m0s is longer than iptables.syncPeriod 10s`}},
		{"mode ipvs", header + "mode: ipvs\n",
			[]string{`mode: miniproxy implements only the iptables mode, not "ipvs"`}},
		{"mode nftables", header + "mode: nftables\n",
			[]string{`mode: miniproxy implements only the iptables mode, not "nftables"`}},
		{"wrong apiVersion", "apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n",
			[]string{`apiVersion: want kubeproxy.config.k8s.io/v1alpha1, got "kubeproxy.config.k8s.io/v1beta1"`}},
		{"wrong kind", "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n",
			[]string{`kind: want KubeProxyConfiguration, got "KubeletConfiguration"`}},
		{"no type at all", "clusterCIDR: 10.244.0.0/16\n",
			[]string{`apiVersion: missing`, `kind: missing`}},
		{"bindAddress not an IP", header + "bindAddress: node-1\n",
			[]string{`bindAddress: "node-1" is not an IP address`}},
		{"healthzBindAddress with a host name", header + "healthzBindAddress: localhost:10256\n",
			[]string{`healthzBindAddress: "localhost:10256" is not ip:port`}},
		{"metricsBindAddress with port 0", header + "metricsBindAddress: 127.0.0.1:0\n",
			[]string{`metricsBindAddress: "127.0.0.1:0" is not ip:port`}},
		{"clusterCIDR not a CIDR", header + "clusterCIDR: 10.244.0.0/33\n",
			[]string{`clusterCIDR: "10.244.0.0/33" is not a CIDR`}},
		{"clusterCIDR with two IPv4 ranges", header + "clusterCIDR: 10.244.0.0/16,10.245.0.0/16\n",
			[]string{`clusterCIDR: "10.244.0.0/16,10.245.0.0/16" has more than one range of a family`}},
		{"detectLocalMode unknown", header + "detectLocalMode: PodCIDR\n",
			[]string{`detectLocalMode: "PodCIDR" is not one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix`}},
		{"nodePortAddresses entry not a CIDR", header + "nodePortAddresses: [10.240.0.0/24, 10.240.0.3]\n",
			[]string{`nodePortAddresses[1]: "10.240.0.3" must be a valid CIDR or one of the keywords 'primary', 'localhost', 'all'`}},
		{"nodePortAddresses entry not a string", header + "nodePortAddresses: [10.240.0.0/24, 7]\n",
			[]string{`nodePortAddresses[1]: want a string, got the number 7`}},
		{"nodePortAddresses keyword twice", header + "nodePortAddresses: [primary, primary]\n",
			[]string{`nodePortAddresses[1]: the keyword "primary" is given twice`}},
		{"featureGates unknown gate", header + "featureGates:\n  SomeGate: true\n",
			[]string{`featureGates: unrecognized feature gate: SomeGate`}},
		{"featureGates locked gate", header + "featureGates:\n  PreferSameTrafficDistribution: false\n",
			[]string{`featureGates: cannot set feature gate PreferSameTrafficDistribution to false, feature is locked to true`}},
		{"detectLocalMode BridgeInterface without a bridge", header + "detectLocalMode: BridgeInterface\n",
			[]string{`detectLocal.bridgeInterface: must be set with detectLocalMode BridgeInterface`}},
		{"logging format unknown", header + "logging:\n  format: xml\n",
			[]string{`logging.format: Invalid value: "xml": Unsupported log format`}},
		{"oomScoreAdj out of range", header + "oomScoreAdj: -1001\n",
			[]string{`oomScoreAdj: -1001 must be within the range [-1000, 1000]`}},
		{"featureGates value not a boolean", header + "featureGates:\n  SomeGate: enabled\n",
			[]string{`featureGates.SomeGate: want true or false, got the string "enabled"`}},
		{"duplicated key", header + "clusterCIDR: 10.244.0.0/16\nclusterCIDR: 10.245.0.0/16\n",
			[]string{`not valid YAML or JSON`, `clusterCIDR`}},
		{"not YAML", "apiVersion: [\n", []string{`not valid YAML or JSON`}},
		{"empty", "# nothing here\n", []string{`the file is empty`}},
		{"a list instead of an object", "- a\n- b\n", []string{`want a KubeProxyConfiguration object, got a list`}},
		{"several documents, none a KubeProxyConfiguration", "kind: A\n---\nkind: B\n",
			[]string{`kind: none of the 2 documents is a KubeProxyConfiguration`}},
		{"several KubeProxyConfigurations", header + "---\n" + header,
			[]string{`kind: 2 documents are a KubeProxyConfiguration; want exactly one`}},
		{"every error at once, in field order", header + "mode: ipvs\niptables:\n  syncPeriod: abc\nclusterCIDR: x\n",
			[]string{`clusterCIDR: "x" is not a CIDR`, `iptables.syncPeriod: cannot parse "abc"`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, _, err := Parse([]byte(tc.in))
			if err == nil {
				t.Fatalf("Parse succeeded with %+v, want an error saying %q", c, tc.want)
			}
			if c != nil {
				t.Errorf("Parse returned a config with its error")
			}
			msg := err.Error()
			last := -1
			for _, w := range tc.want {
				i := strings.Index(msg, w)
				if i < 0 {
					t.Errorf("error %q does not say %q", msg, w)
					continue
				}
				if i < last {
					t.Errorf("error %q: %q comes out of field order", msg, w)
				}
				last = i
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Errorf("error %q is not a *FieldError", msg)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.conf")
	if err := os.WriteFile(path, []byte(header+"iptables:\n  syncPeriod: abc\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err := Load(path)
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), `iptables.syncPeriod: cannot parse "abc" as a duration`) {
		t.Errorf("Load error = %v, want one naming the file and the field", err)
	}
	_, _, err = Load(filepath.Join(dir, "missing.conf"))
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load of a missing file: %v, want an error wrapping os.ErrNotExist", err)
	}
}
