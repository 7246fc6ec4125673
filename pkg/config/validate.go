package config

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/validation/field"
	logsapi "k8s.io/component-base/logs/api/v1"
	// The json log format is kube-proxy's too: register it so that a
	// configuration asking for it is valid.
	_ "k8s.io/component-base/logs/json/register"

	"github.com/miniproxy/miniproxy/pkg/features"
)

// Validate checks a complete Config, from a file or from flags, with
// kube-proxy's rules (pkg/proxy/apis/config/validation), plus miniproxy's
// one restriction: the mode is iptables. Each error is a *FieldError naming
// the file's field; cmd/miniproxy names the flag instead when the value came
// from one.
func (c *Config) Validate() []error {
	var errs []error
	fail := func(f, format string, args ...any) {
		errs = append(errs, &FieldError{Field: f, Message: fmt.Sprintf(format, args...)})
	}
	if c.Mode != "" && c.Mode != "iptables" {
		fail("mode", "miniproxy implements only the iptables mode, not %q; set it to \"iptables\" or leave it empty", c.Mode)
	}
	if c.MasqueradeBit < 0 || c.MasqueradeBit > 31 {
		fail("iptables.masqueradeBit", "%d must be within the range [0, 31]", c.MasqueradeBit)
	}
	if c.SyncPeriod <= 0 {
		fail("iptables.syncPeriod", "%s must be greater than 0", c.SyncPeriod)
	}
	if c.MinSyncPeriod < 0 {
		fail("iptables.minSyncPeriod", "%s must be greater than or equal to 0", c.MinSyncPeriod)
	} else if c.MinSyncPeriod > c.SyncPeriod {
		fail("iptables.minSyncPeriod", "%s is longer than iptables.syncPeriod %s", c.MinSyncPeriod, c.SyncPeriod)
	}
	if c.ConfigSyncPeriod <= 0 {
		fail("configSyncPeriod", "%s must be greater than 0", c.ConfigSyncPeriod)
	}
	if c.OOMScoreAdj < -1000 || c.OOMScoreAdj > 1000 {
		fail("oomScoreAdj", "%d must be within the range [-1000, 1000]", c.OOMScoreAdj)
	}
	if c.Burst < 0 {
		fail("clientConnection.burst", "%d must be greater than or equal to 0", c.Burst)
	}
	for _, f := range []struct {
		name string
		v    int32
	}{{"conntrack.maxPerCore", c.Conntrack.MaxPerCore}, {"conntrack.min", c.Conntrack.Min}} {
		if f.v < 0 {
			fail(f.name, "%d must be greater than or equal to 0 (0 leaves the kernel's value as it is)", f.v)
		}
	}
	for name, d := range map[string]time.Duration{
		"conntrack.tcpEstablishedTimeout": c.Conntrack.TCPEstablishedTimeout,
		"conntrack.tcpCloseWaitTimeout":   c.Conntrack.TCPCloseWaitTimeout,
		"conntrack.udpTimeout":            c.Conntrack.UDPTimeout,
		"conntrack.udpStreamTimeout":      c.Conntrack.UDPStreamTimeout,
	} {
		if d < 0 {
			fail(name, "%s must be greater than or equal to 0 (0 leaves the kernel's value as it is)", d)
		}
	}
	switch c.DetectLocalMode {
	case "", LocalModeClusterCIDR, LocalModeNodeCIDR:
	case LocalModeBridgeInterface:
		if c.BridgeInterface == "" {
			fail("detectLocal.bridgeInterface", "must be set with detectLocalMode BridgeInterface (--pod-bridge-interface)")
		}
	case LocalModeInterfaceNamePrefix:
		if c.InterfaceNamePrefix == "" {
			fail("detectLocal.interfaceNamePrefix", "must be set with detectLocalMode InterfaceNamePrefix (--pod-interface-name-prefix)")
		}
	default:
		fail("detectLocalMode", "%q is not one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix", c.DetectLocalMode)
	}
	seen := map[string]bool{}
	for i, a := range c.NodePortAddresses {
		f := fmt.Sprintf("nodePortAddresses[%d]", i)
		switch a {
		case NodePortsPrimary, NodePortsLocalhost, NodePortsAll:
			if seen[a] {
				fail(f, "the keyword %q is given twice", a)
			}
			seen[a] = true
		default:
			if _, err := netip.ParsePrefix(a); err != nil {
				fail(f, "%q must be a valid CIDR or one of the keywords 'primary', 'localhost', 'all'", a)
			}
		}
	}
	if err := features.Check(c.FeatureGates); err != nil {
		fail("featureGates", "%v", err)
	}
	for _, e := range logsapi.Validate(&c.Logging, features.Effective(c.FeatureGates), field.NewPath("logging")) {
		errs = append(errs, &FieldError{Field: e.Field, Message: e.ErrorBody()})
	}
	return errs
}

// NodePortRanges resolves NodePortAddresses as kube-proxy does: CIDRs stay,
// "primary" becomes the node's primary address of each family (a /32 or
// /128; none for a family without one), "localhost" 127.0.0.0/8 and ::1,
// "all" every address. nil (no list) means every local address.
func NodePortRanges(list []string, primary []netip.Addr) ([]netip.Prefix, error) {
	if len(list) == 0 {
		return nil, nil
	}
	out := []netip.Prefix{}
	for _, a := range list {
		switch a {
		case NodePortsPrimary:
			for _, ip := range primary {
				if !ip.IsLoopback() {
					out = append(out, netip.PrefixFrom(ip, ip.BitLen()))
				}
			}
		case NodePortsLocalhost:
			out = append(out, netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128"))
		case NodePortsAll:
			out = append(out, netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0"))
		default:
			p, err := netip.ParsePrefix(a)
			if err != nil {
				return nil, fmt.Errorf("nodePortAddresses: %q must be a valid CIDR or one of the keywords 'primary', 'localhost', 'all'", a)
			}
			out = append(out, p.Masked())
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
	return slices.Compact(out), nil
}

// FieldErrors lists the *FieldError values inside an error returned by
// Load or Validate (joined errors included).
func FieldErrors(err error) []*FieldError {
	var out []*FieldError
	var walk func(error)
	walk = func(e error) {
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, x := range j.Unwrap() {
				walk(x)
			}
			return
		}
		var fe *FieldError
		if errors.As(e, &fe) {
			out = append(out, fe)
		}
	}
	if err != nil {
		walk(err)
	}
	return out
}
