package dataplane

import (
	"fmt"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// benchRuleset is shaped like the dispatch tree of the brief: a Services
// chain with one rule per leaf, and leaves holding the DNAT rules inline.
// variant changes the last rule of leaf 0, so that alternating variants
// makes a one-chain change.
func benchRuleset(leaves, perLeaf, variant int) *iptables.Ruleset {
	services := iptables.Chain{Name: "MP-SERVICES"}
	nat := iptables.TableRules{Table: "nat"}
	for l := range leaves {
		leaf := iptables.Chain{Name: fmt.Sprintf("MP-L-%d", l)}
		services.Rules = append(services.Rules, iptables.Rule{"-d", fmt.Sprintf("10.%d.%d.0/24", 96+l/256, l%256), "-j", leaf.Name})
		for r := range perLeaf {
			port := 8080
			if l == 0 && r == perLeaf-1 {
				port += variant
			}
			leaf.Rules = append(leaf.Rules, iptables.Rule{
				"-d", fmt.Sprintf("10.%d.%d.%d/32", 96+l/256, l%256, r%250), "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(80 + r/250),
				"-m", "statistic", "--mode", "random", "--probability", "0.50000000000",
				"-j", "DNAT", "--to-destination", fmt.Sprintf("10.244.%d.%d:%d", l%256, r%250, port),
			})
		}
		nat.Chains = append(nat.Chains, leaf)
	}
	nat.Chains = append([]iptables.Chain{services}, nat.Chains...)
	return &iptables.Ruleset{
		Family: iptables.IPv4,
		Tables: []iptables.TableRules{nat},
		Jumps: []iptables.Jump{
			{Table: "nat", Chain: "PREROUTING", Rule: iptables.Rule{"-j", "MP-SERVICES"}},
			{Table: "nat", Chain: "OUTPUT", Rule: iptables.Rule{"-j", "MP-SERVICES"}},
		},
	}
}

// BenchmarkKernelApply measures applies into a loaded nat table inside a
// throwaway namespace: a full rewrite, a one-chain change and an apply with
// nothing to do (the canary check alone). Run it with
// `go test -run ^$ -bench KernelApply ./pkg/dataplane/`.
func BenchmarkKernelApply(b *testing.B) {
	for _, size := range []struct{ leaves, perLeaf int }{{100, 20}, {364, 137}} {
		for _, kind := range []string{"full", "one-chain", "unchanged"} {
			b.Run(fmt.Sprintf("%s/%d-chains-%d-rules", kind, size.leaves+1, size.leaves*(size.perLeaf+1)), func(b *testing.B) {
				ns := enterTestNetns(b)
				dp, err := New(NewRunner(), iptables.IPv4, rules.Prefix)
				if err != nil {
					b.Fatal(err)
				}
				rs := []*iptables.Ruleset{benchRuleset(size.leaves, size.perLeaf, 0), benchRuleset(size.leaves, size.perLeaf, 1)}
				if _, err := ns.apply(b, dp, rs[0], false); err != nil {
					b.Fatal(err)
				}
				ns.check(b)
				i, bytes := 0, 0
				for b.Loop() {
					i++
					var res Result
					switch kind {
					case "full":
						res, err = dp.Apply(rs[0], true)
					case "one-chain":
						res, err = dp.Apply(rs[i%2], false)
					default:
						res, err = dp.Apply(rs[0], false)
					}
					if err != nil {
						b.Fatal(err)
					}
					bytes = res.Bytes
				}
				b.ReportMetric(float64(bytes), "input-bytes")
				ns.check(b)
			})
		}
	}
}
