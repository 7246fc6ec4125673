package dataplane

import (
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// dedent removes the common leading indentation of text and the first
// newline, so expected restore inputs can be written inline.
func dedent(text string) string {
	text = strings.TrimPrefix(text, "\n")
	lines := strings.Split(text, "\n")
	indent := -1
	for _, l := range lines {
		if strings.TrimSpace(l) == "" {
			continue
		}
		n := len(l) - len(strings.TrimLeft(l, " \t"))
		if indent < 0 || n < indent {
			indent = n
		}
	}
	for i, l := range lines {
		if len(l) >= indent && indent > 0 {
			lines[i] = l[indent:]
		} else {
			lines[i] = strings.TrimLeft(l, " \t")
		}
	}
	return strings.Join(lines, "\n")
}

// rule splits a rule written as on the command line.
func rule(t testing.TB, text string) iptables.Rule {
	t.Helper()
	args, err := iptables.SplitArgs(text)
	if err != nil {
		t.Fatalf("rule %q: %v", text, err)
	}
	return iptables.Rule(args)
}

// chain builds a chain from rules written as on the command line.
func chain(t testing.TB, name string, rules ...string) iptables.Chain {
	t.Helper()
	c := iptables.Chain{Name: name}
	for _, r := range rules {
		c.Rules = append(c.Rules, rule(t, r))
	}
	return c
}

// jump builds a Jump from a rule written as on the command line.
func jump(t testing.TB, table iptables.Table, chainName, text string) iptables.Jump {
	t.Helper()
	return iptables.Jump{Table: table, Chain: chainName, Rule: rule(t, text)}
}

// testRuleset is the ruleset most tests start from: a Services chain with
// two services in nat, a postrouting chain, a forward chain in filter, and
// the jumps into them. edit may change it.
func testRuleset(t testing.TB, family iptables.Family, edit func(rs *iptables.Ruleset)) *iptables.Ruleset {
	t.Helper()
	a, b, port := "10.96.0.1/32", "10.96.0.2/32", "10.244.1.5:8443"
	if family == iptables.IPv6 {
		a, b, port = "fd00:96::1/128", "fd00:96::2/128", "[fd00:244::5]:8443"
	}
	rs := &iptables.Ruleset{
		Family: family,
		Tables: []iptables.TableRules{
			{Table: "nat", Chains: []iptables.Chain{
				chain(t, "MP-SERVICES",
					"-d "+a+" -p tcp -m tcp --dport 443 -j MP-SVC-A",
					"-d "+b+" -p udp -m udp --dport 53 -j MP-SVC-B"),
				chain(t, "MP-SVC-A", "-p tcp -m tcp -j DNAT --to-destination "+port),
				chain(t, "MP-SVC-B", "-j RETURN"),
				chain(t, "MP-POSTROUTING", `-m mark --mark 0x4000/0x4000 -m comment --comment "masquerade marked traffic" -j MASQUERADE`),
			}},
			{Table: "filter", Chains: []iptables.Chain{
				chain(t, "MP-FORWARD", "-m conntrack --ctstate INVALID -j DROP"),
			}},
		},
		Jumps: []iptables.Jump{
			jump(t, "nat", "PREROUTING", `-m comment --comment "miniproxy service portals" -j MP-SERVICES`),
			jump(t, "nat", "OUTPUT", `-m comment --comment "miniproxy service portals" -j MP-SERVICES`),
			jump(t, "nat", "POSTROUTING", "-j MP-POSTROUTING"),
			jump(t, "filter", "FORWARD", "-j MP-FORWARD"),
		},
	}
	if edit != nil {
		edit(rs)
	}
	return rs
}
