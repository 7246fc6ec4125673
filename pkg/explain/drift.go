package explain

import (
	"slices"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// The ways a chain can differ from what miniproxy would write.
const (
	DriftMissing   = "missing"   // miniproxy would have it; the kernel has not
	DriftExtra     = "extra"     // the kernel has an MP- chain miniproxy would not write
	DriftDifferent = "different" // both have it, with other rules
)

// ChainDrift is one chain whose rules in the kernel differ from what
// miniproxy would write for the current view: another program changed it,
// or a sync failed or has not run yet.
type ChainDrift struct {
	Family string `json:"family"`
	Table  string `json:"table"`
	// Chain is an MP- chain, or a built-in chain whose jumps into MP-
	// chains differ (Jumps is then true).
	Chain string `json:"chain"`
	Kind  string `json:"kind"`
	Jumps bool   `json:"jumps,omitempty"`
}

// String names the chain for a warning: "IPv4 nat MP-VIP-8C (different)".
func (d ChainDrift) String() string {
	what := d.Chain
	if d.Jumps {
		what += " (its jumps to MP- chains)"
	}
	return d.Family + " " + d.Table + " " + what + " (" + d.Kind + ")"
}

// Drift compares the kernel's rules with what miniproxy would write for
// the view, family by family: every MP- chain of nat and filter (the
// dataplane's canary included), and the
// rules of the built-in chains that jump to MP- chains, in order. Rules are
// compared in their canonical spelling (iptables.Canonical), so the
// kernel's rewording is no difference; counters are not compared. A family
// of the view the kernel map lacks is skipped.
func Drift(v View, k Kernel) []ChainDrift {
	var out []ChainDrift
	for _, fam := range families(v) {
		st, ok := k[fam]
		if !ok {
			continue
		}
		out = append(out, familyDrift(rules.Build(v.Snapshot, v.Configs[fam]), st)...)
	}
	return out
}

// familyDrift compares one family's wanted ruleset with the kernel's state.
func familyDrift(want *iptables.Ruleset, st iptables.State) []ChainDrift {
	var out []ChainDrift
	add := func(table iptables.Table, chain, kind string, jumps bool) {
		out = append(out, ChainDrift{Family: want.Family.String(), Table: string(table), Chain: chain, Kind: kind, Jumps: jumps})
	}
	for _, tr := range want.Tables {
		have := st[tr.Table]
		wanted := map[string]bool{}
		// The dataplane keeps its canary in every table it writes.
		canary := iptables.Chain{Name: rules.Prefix + dataplane.CanarySuffix, Rules: []iptables.Rule{dataplane.CanaryRule}}
		for _, c := range append(slices.Clone(tr.Chains), canary) {
			wanted[c.Name] = true
			kc, ok := have[c.Name]
			switch {
			case !ok:
				add(tr.Table, c.Name, DriftMissing, false)
			case !sameRules(c.Rules, kc.Rules):
				add(tr.Table, c.Name, DriftDifferent, false)
			}
		}
		for _, name := range sortedChains(have) {
			if strings.HasPrefix(name, rules.Prefix) && !wanted[name] {
				add(tr.Table, name, DriftExtra, false)
			}
		}
		jumps := map[string][]iptables.Rule{}
		var builtins []string
		for _, j := range want.Jumps {
			if j.Table != tr.Table {
				continue
			}
			if _, seen := jumps[j.Chain]; !seen {
				builtins = append(builtins, j.Chain)
			}
			jumps[j.Chain] = append(jumps[j.Chain], j.Rule)
		}
		for _, name := range sortedChains(have) {
			if iptables.IsBuiltin(tr.Table, name) && !slices.Contains(builtins, name) && len(ownJumps(have[name])) > 0 {
				builtins = append(builtins, name)
			}
		}
		for _, chain := range builtins {
			var kernel []iptables.Rule
			if c, ok := have[chain]; ok {
				kernel = ownJumps(c)
			}
			if !sameRules(jumps[chain], kernel) {
				add(tr.Table, chain, DriftDifferent, true)
			}
		}
	}
	return out
}

// ownJumps lists a chain's rules that jump to MP- chains, in order.
func ownJumps(c *iptables.Chain) []iptables.Rule {
	var out []iptables.Rule
	for _, r := range c.Rules {
		if strings.HasPrefix(r.Target(), rules.Prefix) {
			out = append(out, r)
		}
	}
	return out
}

func sameRules(a, b []iptables.Rule) bool {
	return slices.EqualFunc(a, b, func(x, y iptables.Rule) bool { return iptables.Canonical(x) == iptables.Canonical(y) })
}

func sortedChains(c iptables.Chains) []string {
	names := make([]string, 0, len(c))
	for n := range c {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// families lists the view's families in order, IPv4 first.
func families(v View) []iptables.Family {
	var out []iptables.Family
	for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		if _, ok := v.Configs[fam]; ok {
			out = append(out, fam)
		}
	}
	return out
}
