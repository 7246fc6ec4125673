package proxy

import (
	"syscall"
	"time"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// ApplyResult is one apply of a family's rules as the loop saw it: what the
// dataplane reported, and what the loop measured around the call, so that
// health checks and metrics need nothing but the SyncResult.
type ApplyResult struct {
	dataplane.Result
	// CPU is the user and system time of this process and of its children
	// that were waited for (iptables-restore and friends) during the apply.
	// Other goroutines' work in that window is included: the figure is an
	// upper bound on the apply's own cost, exact on an otherwise idle proxy.
	CPU time.Duration
	// TableRules counts, per table, the rules in this project's own chains
	// once the apply succeeded: of the complete Ruleset, since a partial
	// apply writes only some chains but the kernel then holds them all.
	// Jumps from the built-in chains are not counted, as kube-proxy counts
	// only its own chains' rules. It is nil when the apply failed: nobody
	// knows then what the kernel holds beyond what was last applied.
	TableRules map[string]int
}

// apply puts rs into fam's dataplane and measures the apply.
func (p *Proxier) apply(fam iptables.Family, rs *iptables.Ruleset, full bool) (ApplyResult, error) {
	before := p.cpu()
	dr, err := p.planes[fam].Apply(rs, full)
	r := ApplyResult{Result: dr, CPU: max(p.cpu()-before, 0)}
	r.Family, r.Failed = fam, err != nil
	if err == nil {
		r.TableRules = tableRules(rs)
	}
	return r, err
}

// tableRules counts the rules of rs's chains per table; every table of rs
// has an entry.
func tableRules(rs *iptables.Ruleset) map[string]int {
	counts := map[string]int{}
	for _, t := range rs.Tables {
		n := counts[string(t.Table)]
		for _, c := range t.Chains {
			n += len(c.Rules)
		}
		counts[string(t.Table)] = n
	}
	return counts
}

// processCPU is the user and system time of this process and of its
// children that were waited for.
func processCPU() time.Duration {
	var total time.Duration
	for _, who := range []int{syscall.RUSAGE_SELF, syscall.RUSAGE_CHILDREN} {
		var ru syscall.Rusage
		if err := syscall.Getrusage(who, &ru); err != nil {
			continue
		}
		total += time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	return total
}
