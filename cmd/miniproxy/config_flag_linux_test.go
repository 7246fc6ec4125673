package main

import (
	"bytes"
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	logsapi "k8s.io/component-base/logs/api/v1"

	"github.com/miniproxy/miniproxy/pkg/config"
)

// TestConfigFileReplacesFlags checks --config as kube-proxy 1.37 has it:
// the file replaces the whole configuration the flags had built (each such
// flag given is reported), while --hostname-override and the logging flags
// given on the command line still win.
func TestConfigFileReplacesFlags(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.conf")
	conf := `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
hostnameOverride: from-file
clusterCIDR: 10.244.0.0/16,fd00:244::/56
nodePortAddresses: [10.240.0.0/24]
healthzBindAddress: 10.240.0.3
metricsBindAddress: 0.0.0.0:10249
iptables:
  masqueradeAll: true
  masqueradeBit: 15
  syncPeriod: 1m
  minSyncPeriod: 2s
conntrack:
  maxPerCore: 0
logging:
  verbosity: 5
  vmodule:
  - filePattern: proxier.go
    verbosity: 6
`
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	o, notes, err := commandLine([]string{"--config", path, "--cluster-cidr", "10.99.0.0/16", "--iptables-sync-period", "5s",
		"--conntrack-max-per-core", "100", "--hostname-override", "Node-1", "-v", "2", "--vmodule", "main.go=3"}, &bytes.Buffer{})
	if err != nil {
		t.Fatalf("commandLine: %v", err)
	}
	for _, want := range []string{"--cluster-cidr is ignored", "--iptables-sync-period is ignored", "--conntrack-max-per-core is ignored"} {
		if !strings.Contains(strings.Join(notes, "\n"), want) {
			t.Errorf("notes %q do not mention %q", notes, want)
		}
	}
	if len(notes) != 3 {
		t.Errorf("notes = %q, want exactly the three above", notes)
	}
	c := o.cfg
	if c.Kubeconfig != "/var/lib/kube-proxy/kubeconfig.conf" || len(c.ClusterCIDRs) != 2 || c.ClusterCIDRs[0] != netip.MustParsePrefix("10.244.0.0/16") ||
		strings.Join(c.NodePortAddresses, ",") != "10.240.0.0/24" || !c.MasqueradeAll || c.MasqueradeBit != 15 ||
		c.SyncPeriod != time.Minute || c.MinSyncPeriod != 2*time.Second || c.Conntrack.MaxPerCore != 0 {
		t.Errorf("configuration after --config: %+v", c)
	}
	if c.HealthzBindAddress != "10.240.0.3:10256" || c.MetricsBindAddress != "0.0.0.0:10249" {
		t.Errorf("health addresses %q, %q; want the file's", c.HealthzBindAddress, c.MetricsBindAddress)
	}
	if name, _ := o.nodeName(); name != "node-1" || c.Logging.Verbosity != 2 {
		t.Errorf("node name %q, verbosity %d; want the command line's node-1 and 2", name, c.Logging.Verbosity)
	}
	if got := logsapi.VModuleConfigurationPflag(&c.Logging.VModule).String(); got != "main.go=3,proxier.go=6" {
		t.Errorf("vmodule %q, want the command line's patterns first, then the file's", got)
	}
	if c.Mode != "iptables" || c.DetectLocalMode != config.LocalModeClusterCIDR {
		t.Errorf("mode %q, detect-local-mode %q: want kube-proxy's platform defaults", c.Mode, c.DetectLocalMode)
	}

	// A file miniproxy cannot use is a usage error naming the field.
	bad := filepath.Join(t.TempDir(), "bad.conf")
	os.WriteFile(bad, []byte("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\n"), 0o600)
	if _, _, err := commandLine([]string{"--config", bad}, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "mode:") {
		t.Errorf("an IPVS configuration: %v, want an error naming mode", err)
	}
}

// Without --config, the flags that are not plain fields of the
// configuration apply as in kube-proxy: the deprecated port flags, the
// iptables sync periods and --cluster-cidr.
func TestFlagsWithoutConfigFile(t *testing.T) {
	o, notes, err := commandLine([]string{"--iptables-sync-period", "45s", "--iptables-min-sync-period", "0",
		"--cluster-cidr", "10.244.0.0/16", "--healthz-port", "20256", "--metrics-port", "0",
		"--conntrack-max-per-core", "0", "--conntrack-tcp-timeout-established", "2h", "--ipvs-scheduler", "rr"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	c := o.cfg
	if c.SyncPeriod != 45*time.Second || c.MinSyncPeriod != 0 || len(c.ClusterCIDRs) != 1 ||
		c.HealthzBindAddress != "0.0.0.0:20256" || c.MetricsBindAddress != "" ||
		c.Conntrack.MaxPerCore != 0 || c.Conntrack.TCPEstablishedTimeout != 2*time.Hour {
		t.Errorf("configuration from flags: %+v", c)
	}
	if len(notes) != 1 || !strings.Contains(notes[0], "--ipvs-scheduler is ignored") {
		t.Errorf("notes %q, want one about --ipvs-scheduler", notes)
	}
}

// --write-config-to writes the effective configuration as kube-proxy's
// file type: read back, it is the same configuration.
func TestWriteConfigTo(t *testing.T) {
	path := filepath.Join(t.TempDir(), "out.yaml")
	args := []string{"--write-config-to", path, "--cluster-cidr", "10.244.0.0/16", "--iptables-masquerade-bit", "9",
		"--detect-local-mode", "InterfaceNamePrefix", "--pod-interface-name-prefix", "veth", "--nodeport-addresses", "primary",
		"--feature-gates", "AllowServiceExternalIPs=false", "--conntrack-udp-timeout", "30s", "--kube-api-qps", "20"}
	if err := run(args, &bytes.Buffer{}); err != nil {
		t.Fatalf("run: %v", err)
	}
	back, warns, err := config.Load(path)
	if err != nil || len(warns) > 0 {
		t.Fatalf("reading %s back: %v %v", path, err, warns)
	}
	o, _, err := commandLine(args[2:], &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	var a, b bytes.Buffer
	back.WriteYAML(&a)
	o.cfg.WriteYAML(&b)
	if a.String() != b.String() {
		t.Errorf("written and read back:\n%s\nwant:\n%s", a.String(), b.String())
	}
	for _, want := range []string{"masqueradeBit: 9", "detectLocalMode: InterfaceNamePrefix", "interfaceNamePrefix: veth",
		"- primary", "AllowServiceExternalIPs: false", "udpTimeout: 30s", "qps: 20", "clusterCIDR: 10.244.0.0/16", "mode: iptables"} {
		if !strings.Contains(a.String(), want) {
			t.Errorf("written configuration lacks %q:\n%s", want, a.String())
		}
	}
}

// A --config file that changes ends miniproxy, as kube-proxy, so that the
// DaemonSet starts it again with the new configuration; a file that stays
// does not.
func TestConfigFileChangeEndsMiniproxy(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.conf")
	os.WriteFile(path, []byte("a: 1\n"), 0o600)
	ended := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watchConfigFile(ctx, path, 20*time.Millisecond, func(err error) { ended <- err })
	select {
	case err := <-ended:
		t.Fatalf("ended although the file did not change: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	// A ConfigMap update: the mounted file is replaced.
	next := path + ".new"
	os.WriteFile(next, []byte("a: 2\n"), 0o600)
	os.Rename(next, path)
	select {
	case err := <-ended:
		if !strings.Contains(err.Error(), "configuration file") {
			t.Errorf("cause %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a replaced configuration file did not end miniproxy")
	}
}
