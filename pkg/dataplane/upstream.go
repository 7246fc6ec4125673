package dataplane

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// kubeProxyChains are the fixed chain names that upstream kube-proxy's
// iptables mode creates and that nothing else uses (pkg/proxy/iptables of
// Kubernetes 1.28 to 1.37): the top-level chains in nat and filter, and
// its canary, which it keeps in mangle, nat and filter.
//
// KUBE-MARK-MASQ and KUBE-POSTROUTING were also created by kubelets older
// than 1.28; kube-proxy has always used and rewritten them, and upstream's
// own `kube-proxy --cleanup` deletes them, so they are removed here too.
var kubeProxyChains = map[string]bool{
	"KUBE-SERVICES":          true,
	"KUBE-EXTERNAL-SERVICES": true,
	"KUBE-NODEPORTS":         true,
	"KUBE-POSTROUTING":       true,
	"KUBE-MARK-MASQ":         true,
	"KUBE-FORWARD":           true,
	"KUBE-PROXY-FIREWALL":    true,
	"KUBE-PROXY-CANARY":      true,
}

// kubeProxyChainPrefixes are the per-Service and per-endpoint chains of
// kube-proxy's iptables mode: KUBE-SVC- (Cluster policy), KUBE-SVL- (Local
// policy), KUBE-EXT- (external destinations), KUBE-FW- (load balancer
// source ranges), KUBE-SEP- (endpoints), and KUBE-XLB- (the Local-policy
// chain of kube-proxy before 1.24, still found on nodes upgraded in place).
var kubeProxyChainPrefixes = []string{"KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-", "KUBE-XLB-"}

// IsKubeProxyChain says whether chain is one that upstream kube-proxy's
// iptables mode owns, and that CleanupKubeProxy therefore removes. It is
// false for the kubelet's chains, even those kube-proxy also writes to:
// KUBE-FIREWALL (the kubelet's martian-packet guard, of which kube-proxy
// keeps an identical copy), KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT and
// KUBE-MARK-DROP (created by kubelets before 1.28). It is also false for
// chains of other programs that happen to start with KUBE- (kube-router's
// KUBE-ROUTER-*, KUBE-POD-FW-*, KUBE-NWPLCY-*; the old KUBE-HOSTPORTS and
// KUBE-HP-*) and for kube-proxy's IPVS-mode chains, which this project does
// not replace.
func IsKubeProxyChain(chain string) bool {
	if kubeProxyChains[chain] {
		return true
	}
	for _, p := range kubeProxyChainPrefixes {
		if strings.HasPrefix(chain, p) {
			return true
		}
	}
	return false
}

// CleanupKubeProxy removes what an upstream kube-proxy in iptables mode
// left on the node, for `miniproxy --cleanup-kube-proxy` when miniproxy
// replaces it: kube-proxy's jump rules would otherwise keep sending new
// connections through its stale KUBE-SERVICES (it inserted them at the top
// of PREROUTING and OUTPUT), which would still DNAT traffic that miniproxy
// leaves alone, such as a Service whose endpoints have all gone or one that
// was deleted, to pods that may no longer exist.
//
// In every table iptables-save shows it first deletes each rule of a chain
// that kube-proxy does not own which jumps to one it owns (the jumps from
// the built-in chains, and any other program's jump into them, since a
// referenced chain cannot be deleted), then flushes and deletes every chain
// IsKubeProxyChain accepts. Nothing else is touched: not the kubelet's
// chains and rules, not other programs', and not miniproxy's own.
//
// Like Cleanup, it is safe to run when nothing of kube-proxy's is present
// (it then writes nothing), goes on after a failure and returns every
// failure joined, each with its context; with no families given it cleans
// IPv4 and IPv6. It must not run while kube-proxy is still running on the
// node: kube-proxy would put everything back at its next sync.
func CleanupKubeProxy(r Runner, families ...iptables.Family) (Removed, error) {
	if len(families) == 0 {
		families = []iptables.Family{iptables.IPv4, iptables.IPv6}
	}
	var errs []error
	var removed Removed
	for _, family := range families {
		rm, err := cleanupOwned(r, family, IsKubeProxyChain)
		removed = append(removed, rm...)
		if err != nil {
			errs = append(errs, fmt.Errorf("clean up kube-proxy's %s rules: %w", family, err))
		}
	}
	return removed, errors.Join(errs...)
}

// Removal is what a cleanup removed from one table of one family: the
// owned chains with the rules in them, and the rules elsewhere that jumped
// to them.
type Removal struct {
	Family iptables.Family
	Table  iptables.Table
	// Chains were deleted; Rules counts their rules and the jumps to them.
	Chains, Rules int
}

// Removed lists a cleanup's removals, one per table that held something.
type Removed []Removal

// Total is the number of chains and rules removed.
func (r Removed) Total() (chains, rules int) {
	for _, x := range r {
		chains += x.Chains
		rules += x.Rules
	}
	return chains, rules
}

// cleanupOwned removes from one family every chain owns accepts and every
// rule elsewhere that jumps to one of them; Cleanup (our prefix) and
// CleanupKubeProxy (kube-proxy's chains) differ only in owns.
func cleanupOwned(r Runner, family iptables.Family, owns func(chain string) bool) (Removed, error) {
	out, err := r.Save(family, "")
	if err != nil {
		return nil, fmt.Errorf("list rules: %w", err)
	}
	saved := iptables.ParseSave(string(out))
	var errs []error
	owned := map[iptables.Table][]string{}
	counts := map[iptables.Table]*Removal{}
	count := func(t iptables.Table) *Removal {
		if counts[t] == nil {
			counts[t] = &Removal{Family: family, Table: t}
		}
		return counts[t]
	}
	for _, t := range saved.Tables() {
		st := saved[t]
		for _, c := range st.Chains {
			if owns(c) {
				owned[t] = append(owned[t], c)
				count(t).Chains++
				count(t).Rules += len(st.Rules[c])
				continue
			}
			for _, rule := range st.Rules[c] {
				if !owns(rule.Target()) {
					continue
				}
				if err := r.DeleteRule(family, t, c, rule); err != nil {
					errs = append(errs, fmt.Errorf("delete rule %q from %s %s: %w", rule.String(), t, c, err))
					continue
				}
				count(t).Rules++
			}
		}
	}
	var removed Removed
	for _, t := range saved.Tables() {
		if c := counts[t]; c != nil {
			removed = append(removed, *c)
		}
	}
	if len(owned) == 0 {
		return removed, errors.Join(errs...)
	}
	none := func(iptables.Table, string) bool { return false }
	all := iptables.RenderRestore(&iptables.Ruleset{}, none, owned)
	if err := r.Restore(family, []byte(all)); err == nil {
		return removed, errors.Join(errs...)
	}
	// One chain that cannot be deleted (say, because a rule we could not
	// delete still jumps to it) must not keep the others: flush them all,
	// so that they no longer refer to each other, then delete them one by
	// one.
	for _, t := range saved.Tables() {
		if len(owned[t]) == 0 {
			continue
		}
		var flush strings.Builder
		fmt.Fprintf(&flush, "*%s\n", t)
		for _, c := range owned[t] {
			fmt.Fprintf(&flush, ":%s - [0:0]\n", c)
		}
		flush.WriteString("COMMIT\n")
		if err := r.Restore(family, []byte(flush.String())); err != nil {
			errs = append(errs, fmt.Errorf("flush chains in %s: %w", t, err))
		}
		for _, c := range slices.Sorted(slices.Values(owned[t])) {
			input := fmt.Sprintf("*%s\n-X %s\nCOMMIT\n", t, c)
			if err := r.Restore(family, []byte(input)); err != nil {
				errs = append(errs, fmt.Errorf("delete chain %s %s: %w", t, c, err))
			}
		}
	}
	return removed, errors.Join(errs...)
}
