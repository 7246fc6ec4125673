package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestConfigFileReplacesFlags checks --config as kube-proxy has it: the
// file's settings replace the flags it can express (each such flag given
// is reported), while --hostname-override and -v still win.
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
  localhostNodePorts: true
conntrack:
  maxPerCore: 0
logging:
  verbosity: 5
`
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	var o options
	fs := newFlagSet(&o)
	err := fs.Parse([]string{"--config", path, "--cluster-cidr", "10.99.0.0/16", "--iptables-sync-period", "5s",
		"--hostname-override", "Node-1", "-v", "2"})
	if err != nil {
		t.Fatal(err)
	}
	notes, ct, err := o.applyConfigFile(fs)
	if err != nil {
		t.Fatalf("applyConfigFile: %v", err)
	}
	for _, want := range []string{"iptables.localhostNodePorts", "--cluster-cidr is ignored", "--iptables-sync-period is ignored"} {
		if !strings.Contains(strings.Join(notes, "\n"), want) {
			t.Errorf("notes %q do not mention %q", notes, want)
		}
	}
	if len(notes) != 3 {
		t.Errorf("notes = %q, want exactly the three above", notes)
	}
	if o.kubeconfig != "/var/lib/kube-proxy/kubeconfig.conf" || o.clusterCIDR != "10.244.0.0/16,fd00:244::/56" ||
		strings.Join(o.nodePortAddresses, ",") != "10.240.0.0/24" || !o.masqueradeAll || o.masqueradeBit != 15 ||
		o.syncPeriod != time.Minute || o.minSyncPeriod != 2*time.Second {
		t.Errorf("options after --config: %+v", o)
	}
	if o.health.healthzBindAddress != "10.240.0.3:10256" || o.health.metricsBindAddress != "0.0.0.0:10249" {
		t.Errorf("health addresses %q, %q; want the file's", o.health.healthzBindAddress, o.health.metricsBindAddress)
	}
	if name, _ := o.nodeName(); name != "node-1" || o.verbosity != 2 {
		t.Errorf("node name %q, verbosity %d; want the command line's node-1 and 2", name, o.verbosity)
	}
	if ct.MaxPerCore != 0 || ct.TCPEstablishedTimeout != 24*time.Hour {
		t.Errorf("conntrack settings %+v, want maxPerCore 0 and the default established timeout", ct)
	}
	if _, err := o.proxyOptions(); err != nil {
		t.Errorf("proxyOptions after --config: %v", err)
	}

	// A file miniproxy cannot use is a usage error naming the field.
	bad := filepath.Join(t.TempDir(), "bad.conf")
	os.WriteFile(bad, []byte("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\n"), 0o600)
	o2 := options{configFile: bad}
	if _, _, err := o2.applyConfigFile(newFlagSet(&options{})); err == nil || !strings.Contains(err.Error(), "mode:") {
		t.Errorf("applyConfigFile of an IPVS configuration: %v, want an error naming mode", err)
	}
}
