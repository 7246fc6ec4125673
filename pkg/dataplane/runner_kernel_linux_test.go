package dataplane

import (
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// The real Runner's single-rule calls answer as recorded in
// singleRuleCalls, as the Fake's do (TestFakeSingleRuleCallsAnswerAsIptables),
// so the two agree.
func TestKernelSingleRuleCallsAnswerAsIptables(t *testing.T) {
	for _, family := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		t.Run(family.String(), func(t *testing.T) {
			ns := enterTestNetns(t)
			runSingleRuleCalls(t, NewRunner(), family, func() { ns.check(t) })
		})
	}
}
