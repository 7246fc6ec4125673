package config

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	componentbaseconfig "k8s.io/component-base/config/v1alpha1"
	"k8s.io/kube-proxy/config/v1alpha1"
	"sigs.k8s.io/yaml"
)

// KubeProxyConfiguration gives c as the file type kube-proxy reads, so that
// what miniproxy has in effect can be written (--write-config-to) and shown
// (/configz) in kube-proxy's own terms, and read back by either program.
// The IPVS, nftables and Windows sections carry kube-proxy's defaults.
func (c *Config) KubeProxyConfiguration() *v1alpha1.KubeProxyConfiguration {
	d := func(v time.Duration) metav1.Duration { return metav1.Duration{Duration: v} }
	ptr := func(v int32) *int32 { return &v }
	cidrs := make([]string, len(c.ClusterCIDRs))
	for i, p := range c.ClusterCIDRs {
		cidrs[i] = p.String()
	}
	tcpEstablished, tcpCloseWait := d(c.Conntrack.TCPEstablishedTimeout), d(c.Conntrack.TCPCloseWaitTimeout)
	localhost := c.LocalhostNodePorts
	return &v1alpha1.KubeProxyConfiguration{
		TypeMeta:     metav1.TypeMeta{APIVersion: APIVersion, Kind: Kind},
		FeatureGates: c.FeatureGates,
		ClientConnection: componentbaseconfig.ClientConnectionConfiguration{
			Kubeconfig: c.Kubeconfig, ContentType: c.ContentType, QPS: c.QPS, Burst: c.Burst,
		},
		Logging:                     c.Logging,
		HostnameOverride:            c.HostnameOverride,
		BindAddress:                 c.BindAddress.String(),
		HealthzBindAddress:          c.HealthzBindAddress,
		MetricsBindAddress:          c.MetricsBindAddress,
		BindAddressHardFail:         c.BindAddressHardFail,
		EnableProfiling:             c.EnableProfiling,
		ShowHiddenMetricsForVersion: c.ShowHiddenMetricsForVersion,
		Mode:                        v1alpha1.ProxyMode(c.Mode),
		IPTables: v1alpha1.KubeProxyIPTablesConfiguration{
			MasqueradeBit: ptr(c.MasqueradeBit), MasqueradeAll: c.MasqueradeAll, LocalhostNodePorts: &localhost,
			SyncPeriod: d(c.SyncPeriod), MinSyncPeriod: d(c.MinSyncPeriod),
		},
		NFTables:        v1alpha1.KubeProxyNFTablesConfiguration{MasqueradeBit: ptr(DefaultMasqueradeBit)},
		DetectLocalMode: v1alpha1.LocalMode(c.DetectLocalMode),
		DetectLocal: v1alpha1.DetectLocalConfiguration{
			BridgeInterface: c.BridgeInterface, InterfaceNamePrefix: c.InterfaceNamePrefix,
		},
		ClusterCIDR:       strings.Join(cidrs, ","),
		NodePortAddresses: c.NodePortAddresses,
		OOMScoreAdj:       ptr(c.OOMScoreAdj),
		Conntrack: v1alpha1.KubeProxyConntrackConfiguration{
			MaxPerCore: ptr(c.Conntrack.MaxPerCore), Min: ptr(c.Conntrack.Min),
			TCPEstablishedTimeout: &tcpEstablished, TCPCloseWaitTimeout: &tcpCloseWait,
			TCPBeLiberal: c.Conntrack.TCPBeLiberal,
			UDPTimeout:   d(c.Conntrack.UDPTimeout), UDPStreamTimeout: d(c.Conntrack.UDPStreamTimeout),
		},
		ConfigSyncPeriod: d(c.ConfigSyncPeriod),
	}
}

// WriteYAML writes c as a KubeProxyConfiguration file, as kube-proxy's
// --write-config-to does.
func (c *Config) WriteYAML(w io.Writer) error {
	j, err := json.Marshal(c.KubeProxyConfiguration())
	if err != nil {
		return fmt.Errorf("encode the configuration: %w", err)
	}
	y, err := yaml.JSONToYAML(j)
	if err != nil {
		return fmt.Errorf("encode the configuration as YAML: %w", err)
	}
	_, err = w.Write(y)
	return err
}
