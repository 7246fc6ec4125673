package dataplane

import (
	"fmt"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// singleRuleCall is one call of the Runner's single-rule methods, with what
// iptables answers: "true", "false", "ok" or "error". The same calls, in
// order, are made of the Fake (unit test) and of the real Runner in a
// network namespace of its own (kernel test), so that the Fake's answers are
// the kernel's.
type singleRuleCall struct {
	name string
	call func(r Runner, f iptables.Family) (bool, error)
	want string
}

// singleRuleSetup is restored first: two chains, one holding a rule.
const singleRuleSetup = "*nat\n:MP-X - [0:0]\n:MP-Y - [0:0]\n-A MP-X -j RETURN\nCOMMIT\n"

func singleRuleCalls() []singleRuleCall {
	exists := func(table iptables.Table, chain string, rule ...string) func(Runner, iptables.Family) (bool, error) {
		return func(r Runner, f iptables.Family) (bool, error) { return r.RuleExists(f, table, chain, rule) }
	}
	chainExists := func(table iptables.Table, chain string) func(Runner, iptables.Family) (bool, error) {
		return func(r Runner, f iptables.Family) (bool, error) { return r.ChainExists(f, table, chain) }
	}
	insert := func(table iptables.Table, chain string, pos int, rule ...string) func(Runner, iptables.Family) (bool, error) {
		return func(r Runner, f iptables.Family) (bool, error) {
			return false, r.InsertRule(f, table, chain, pos, rule)
		}
	}
	del := func(table iptables.Table, chain string, rule ...string) func(Runner, iptables.Family) (bool, error) {
		return func(r Runner, f iptables.Family) (bool, error) { return false, r.DeleteRule(f, table, chain, rule) }
	}
	return []singleRuleCall{
		{"a chain that exists", chainExists("nat", "MP-X"), "true"},
		{"a built-in chain", chainExists("nat", "PREROUTING"), "true"},
		{"a chain that does not exist", chainExists("nat", "MP-NONE"), "false"},
		{"a chain of another table", chainExists("filter", "MP-X"), "false"},
		{"a rule the chain holds", exists("nat", "MP-X", "-j", "RETURN"), "true"},
		{"a rule the chain does not hold", exists("nat", "MP-Y", "-j", "RETURN"), "false"},
		{"a rule of a chain that does not exist", exists("nat", "MP-NONE", "-j", "RETURN"), "false"},
		{"checking a jump to a chain that does not exist", exists("nat", "MP-X", "-j", "MP-NONE"), "error"},
		{"checking a port without a protocol", exists("nat", "MP-X", "--dport", "1", "-j", "RETURN"), "error"},
		{"inserting at the head", insert("nat", "PREROUTING", 1, "-j", "MP-X"), "ok"},
		{"inserting past the end plus one", insert("nat", "PREROUTING", 3, "-j", "MP-Y"), "error"},
		{"inserting at the end plus one", insert("nat", "PREROUTING", 2, "-j", "MP-Y"), "ok"},
		{"the inserted rule is there", exists("nat", "PREROUTING", "-j", "MP-Y"), "true"},
		{"inserting a jump to a chain that does not exist", insert("nat", "PREROUTING", 1, "-j", "MP-NONE"), "error"},
		{"inserting into a chain that does not exist", insert("nat", "MP-NONE", 1, "-j", "RETURN"), "error"},
		{"inserting an input interface into OUTPUT", insert("nat", "OUTPUT", 1, "-i", "eth0", "-j", "MP-X"), "error"},
		{"deleting a rule", del("nat", "PREROUTING", "-j", "MP-X"), "ok"},
		{"the deleted rule is gone", exists("nat", "PREROUTING", "-j", "MP-X"), "false"},
		{"deleting it again", del("nat", "PREROUTING", "-j", "MP-X"), "error"},
		{"deleting from a chain that does not exist", del("nat", "MP-NONE", "-j", "RETURN"), "error"},
		{"deleting a jump to a chain that does not exist", del("nat", "PREROUTING", "-j", "MP-NONE"), "error"},
		{"MASQUERADE --random-fully", func(r Runner, f iptables.Family) (bool, error) { return r.RandomFully(f) }, "true"},
	}
}

// runSingleRuleCalls makes the calls of singleRuleCalls of r, after
// restoring singleRuleSetup, and reports every answer that differs from the
// recorded one; before, if not nil, runs before each call.
func runSingleRuleCalls(t *testing.T, r Runner, family iptables.Family, before func()) {
	t.Helper()
	if before != nil {
		before()
	}
	if err := r.Restore(family, []byte(singleRuleSetup)); err != nil {
		t.Fatalf("restore the setup: %v", err)
	}
	for _, c := range singleRuleCalls() {
		if before != nil {
			before()
		}
		ok, err := c.call(r, family)
		got := fmt.Sprint(ok)
		switch {
		case err != nil:
			got = "error"
		case c.want == "ok" && !ok:
			got = "ok"
		}
		if got != c.want {
			t.Errorf("%s, %s: got %s (%v), want %s", family, c.name, got, err, c.want)
		}
	}
}

func TestFakeSingleRuleCallsAnswerAsIptables(t *testing.T) {
	for _, family := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		runSingleRuleCalls(t, NewFake(), family, nil)
	}
}
