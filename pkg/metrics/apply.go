package metrics

import (
	"syscall"
	"time"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// WrapApplier returns an Applier that applies through next and records what
// a SyncResult cannot tell: how many rules each table of the family holds
// once the apply succeeded (kubeproxy_sync_proxy_rules_iptables_total; a
// partial apply writes only some chains, but the Ruleset it was given is
// complete), and the CPU time the apply consumed
// (miniproxy_sync_apply_cpu_seconds). Wrap each family's dataplane before
// handing it to proxy.New; that also tells the metrics which families this
// node programs before the first sync.
func (m *Metrics) WrapApplier(fam iptables.Family, next proxy.Applier) proxy.Applier {
	m.learnFamily(fam)
	return &countingApplier{m: m, fam: fam, next: next, cpu: processCPU}
}

type countingApplier struct {
	m    *Metrics
	fam  iptables.Family
	next proxy.Applier
	cpu  func() time.Duration
}

func (a *countingApplier) Apply(rs *iptables.Ruleset, full bool) (dataplane.Result, error) {
	before := a.cpu()
	res, err := a.next.Apply(rs, full)
	a.m.applyCPU.WithLabelValues(a.fam.String()).Observe(max(a.cpu()-before, 0).Seconds())
	if err == nil && rs != nil {
		a.m.setRuleCounts(a.fam, rs)
	}
	return res, err
}

// Check only forwards: a check in a scratch namespace changes nothing the
// metrics count.
func (a *countingApplier) Check(rs *iptables.Ruleset) error { return a.next.Check(rs) }

// CanaryLost only forwards: the check between syncs counts nothing.
func (a *countingApplier) CanaryLost() (string, error) { return a.next.CanaryLost() }

// setRuleCounts sets the rule count of every table of rs, and 0 for tables
// of an earlier Ruleset that rs no longer has. Jumps from the built-in
// chains are not counted, as kube-proxy counts only its own chains' rules.
func (m *Metrics) setRuleCounts(fam iptables.Family, rs *iptables.Ruleset) {
	counts := map[string]int{}
	for _, t := range rs.Tables {
		n := counts[string(t.Table)]
		for _, c := range t.Chains {
			n += len(c.Rules)
		}
		counts[string(t.Table)] = n
	}
	f := fam.String()
	m.mu.Lock()
	defer m.mu.Unlock()
	seen := m.tables[f]
	if seen == nil {
		seen = map[string]bool{}
		m.tables[f] = seen
	}
	for t := range seen {
		if _, ok := counts[t]; !ok {
			m.rulesTotal.WithLabelValues(t, f).Set(0)
		}
	}
	for t, n := range counts {
		seen[t] = true
		m.rulesTotal.WithLabelValues(t, f).Set(float64(n))
	}
}

// processCPU is the user and system time of this process and of its
// children that were waited for (iptables-restore and friends). Other
// goroutines' work during an apply is included: the figure is an upper
// bound on the apply's own cost, exact on an otherwise idle proxy.
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
