package proxy

import (
	"maps"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// ownRules counts the rules of this project's chains in each table the
// fake kernel holds, less the canary's (jumps from the built-in chains are
// not in these chains).
func ownRules(f *dataplane.Fake) map[string]int {
	out := map[string]int{}
	for table, chains := range f.State(iptables.IPv4) {
		for name, c := range chains {
			if strings.HasPrefix(name, rules.Prefix) && name != rules.Prefix+dataplane.CanarySuffix {
				out[string(table)] += len(c.Rules)
			}
		}
	}
	return out
}

// Each apply is reported with the CPU time it took and, once it succeeded,
// the rules per table of everything the kernel then holds, even when the
// apply wrote only the changed chains; a failed apply counts no rules.
func TestSyncReportsWhatEachApplyTookAndLeft(t *testing.T) {
	l := newLab(t, Options{})
	var clock time.Duration
	l.proxier.cpu = func() time.Duration { clock += 3 * time.Millisecond; return clock }
	for _, step := range []struct {
		name     string
		change   func()
		fail     bool
		wantFull bool
	}{
		{"the first sync", func() {
			l.tracker.OnServiceAdd(service("web", "10.0.0.10", v1.ProtocolTCP))
			l.tracker.OnEndpointSliceAdd(slice("web", "10.244.2.6", "node2", v1.ProtocolTCP))
		}, false, true},
		{"a partial sync", func() {
			l.tracker.OnServiceAdd(service("api", "10.0.0.11", v1.ProtocolTCP))
			l.tracker.OnEndpointSliceAdd(slice("api", "10.244.2.7", "node2", v1.ProtocolTCP))
		}, false, false},
		{"a failed sync", func() {
			l.tracker.OnEndpointSliceUpdate(nil, slice("api", "10.244.2.8", "node2", v1.ProtocolTCP))
		}, true, false},
	} {
		step.change()
		before := ownRules(l.fake)
		if step.fail {
			l.fake.FailNext(1)
		}
		res := l.proxier.Sync(false)
		if (res.Err != nil) != step.fail || len(res.Results) != 1 {
			t.Fatalf("%s: err=%v, %d results", step.name, res.Err, len(res.Results))
		}
		r := res.Results[0]
		if r.Family != iptables.IPv4 || r.Failed != step.fail || r.Full != step.wantFull {
			t.Errorf("%s: family %v failed %v full %v", step.name, r.Family, r.Failed, r.Full)
		}
		if r.CPU != 3*time.Millisecond {
			t.Errorf("%s: CPU %v, want the 3ms the clock moved during the apply", step.name, r.CPU)
		}
		if step.fail {
			if r.TableRules != nil || !maps.Equal(ownRules(l.fake), before) {
				t.Errorf("%s: counted %v; the kernel should still hold %v", step.name, r.TableRules, before)
			}
			continue
		}
		if want := ownRules(l.fake); !maps.Equal(r.TableRules, want) {
			t.Errorf("%s: counted %v, the kernel holds %v", step.name, r.TableRules, want)
		}
		if !step.wantFull && r.TableRules["nat"] <= r.TableRulesWritten["nat"] {
			t.Errorf("%s: counted %d nat rules, no more than the %d written", step.name, r.TableRules["nat"], r.TableRulesWritten["nat"])
		}
	}
}
