package rules

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// The values of --detect-local-mode.
const (
	DetectClusterCIDR         = "ClusterCIDR"
	DetectNodeCIDR            = "NodeCIDR"
	DetectBridgeInterface     = "BridgeInterface"
	DetectInterfaceNamePrefix = "InterfaceNamePrefix"
)

// maxIfName is the longest interface name the kernel takes (IFNAMSIZ less
// its terminating zero); iptables refuses a longer -i argument, "+"
// included.
const maxIfName = 15

// DetectLocal is how the rules tell traffic from this node's pods from
// other traffic (--detect-local-mode). Pod traffic to a ClusterIP keeps its
// source; any other is masqueraded. Pod traffic to an external address of
// an externalTrafficPolicy: Local Service may go to any endpoint, as if it
// had gone out to a load balancer and come back.
//
// A packet the node itself sends has no input interface, so the interface
// modes count it as not local, as upstream's do; the CIDR modes go by its
// source address.
type DetectLocal struct {
	// Mode is one of the Detect* values; any other (also "") detects
	// nothing: no rule depends on where the traffic comes from.
	Mode string `json:"mode"`
	// CIDRs are the pods' ranges, at most one per family: the cluster's
	// (ClusterCIDR) or this node's spec.podCIDRs (NodeCIDR). A family
	// without one detects nothing.
	CIDRs []netip.Prefix `json:"cidrs,omitempty"`
	// BridgeInterface is the bridge the node's pods are attached to
	// (BridgeInterface mode).
	BridgeInterface string `json:"bridgeInterface,omitempty"`
	// InterfaceNamePrefix starts the name of every pod interface on the
	// node (InterfaceNamePrefix mode).
	InterfaceNamePrefix string `json:"interfaceNamePrefix,omitempty"`
}

// IfLocal gives the match arguments for "from a pod of this node" in fam,
// or nil when nothing is detected in fam.
func (d DetectLocal) IfLocal(fam iptables.Family) []string {
	switch d.Mode {
	case DetectClusterCIDR, DetectNodeCIDR:
		for _, c := range d.CIDRs {
			if familyOf(c.Addr()) == fam {
				return []string{"-s", c.Masked().String()}
			}
		}
	case DetectBridgeInterface:
		if d.BridgeInterface != "" {
			return []string{"-i", d.BridgeInterface}
		}
	case DetectInterfaceNamePrefix:
		if d.InterfaceNamePrefix != "" {
			return []string{"-i", d.InterfaceNamePrefix + "+"}
		}
	}
	return nil
}

// IsLocal says whether a packet from src arriving on inIface ("" for the
// node's own packets) is what IfLocal matches in fam: from this node's
// pods. detected is false when nothing is detected in fam (IfLocal is
// nil), and then local is false too.
func (d DetectLocal) IsLocal(fam iptables.Family, src netip.Addr, inIface string) (local, detected bool) {
	m := d.IfLocal(fam)
	if m == nil {
		return false, false
	}
	switch m[0] {
	case "-s":
		p, err := netip.ParsePrefix(m[1])
		return err == nil && p.Contains(src.Unmap()), true
	}
	if prefix, ok := strings.CutSuffix(m[1], "+"); ok {
		return inIface != "" && strings.HasPrefix(inIface, prefix), true
	}
	return inIface != "" && inIface == m[1], true
}

// Describe says in words what counts as local traffic in fam, for
// explanations ("source in 10.244.0.0/16 (--detect-local-mode
// ClusterCIDR)"); "" when nothing is detected.
func (d DetectLocal) Describe(fam iptables.Family) string {
	m := d.IfLocal(fam)
	if m == nil {
		return ""
	}
	what := "source in " + m[1]
	if m[0] == "-i" {
		what = "arriving on interface " + m[1]
	}
	return fmt.Sprintf("%s (--detect-local-mode %s)", what, d.Mode)
}

// IfNotLocal gives the match arguments for "not from a pod of this node"
// in fam, or nil when nothing is detected in fam.
func (d DetectLocal) IfNotLocal(fam iptables.Family) []string {
	local := d.IfLocal(fam)
	if local == nil {
		return nil
	}
	return append([]string{"!"}, local...)
}

// Validate refuses settings whose rules iptables would refuse, or that
// cannot mean what was asked: an unknown mode, two ranges of one family, an
// interface name that is empty or longer than the kernel allows.
func (d DetectLocal) Validate() error {
	switch d.Mode {
	case DetectClusterCIDR, DetectNodeCIDR:
		seen := map[iptables.Family]bool{}
		for _, c := range d.CIDRs {
			if !c.IsValid() {
				return fmt.Errorf("detect-local-mode %s: invalid range %v", d.Mode, c)
			}
			if seen[familyOf(c.Addr())] {
				return fmt.Errorf("detect-local-mode %s: more than one %s range", d.Mode, familyOf(c.Addr()))
			}
			seen[familyOf(c.Addr())] = true
		}
	case DetectBridgeInterface:
		return checkIfName(d.Mode, d.BridgeInterface)
	case DetectInterfaceNamePrefix:
		return checkIfName(d.Mode, d.InterfaceNamePrefix+"+")
	default:
		return fmt.Errorf("detect-local-mode %q is not one of %s, %s, %s, %s", d.Mode,
			DetectClusterCIDR, DetectNodeCIDR, DetectBridgeInterface, DetectInterfaceNamePrefix)
	}
	return nil
}

func checkIfName(mode, name string) error {
	switch {
	case name == "" || name == "+":
		return fmt.Errorf("detect-local-mode %s needs an interface name", mode)
	case len(name) > maxIfName:
		return fmt.Errorf("detect-local-mode %s: interface name %q is longer than %d characters", mode, name, maxIfName)
	}
	return nil
}
