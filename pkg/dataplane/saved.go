package dataplane

import (
	"slices"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// savedTable is one table of iptables-save output: its chains in the order
// printed, and each chain's rules as arguments without "-A CHAIN".
type savedTable struct {
	chains []string
	rules  map[string][]iptables.Rule
}

// parseSave reads iptables-save output. Unlike iptables.ParseRestore it never
// fails: the output also holds other programs' rules, and a rule this
// package cannot split exactly must not stop a sync. Such a rule is split on
// blanks, which is enough to find its target.
func parseSave(text string) map[iptables.Table]*savedTable {
	out := map[iptables.Table]*savedTable{}
	var cur *savedTable
	for _, l := range strings.Split(text, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case l == "" || strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "*"):
			cur = &savedTable{rules: map[string][]iptables.Rule{}}
			out[iptables.Table(l[1:])] = cur
		case l == "COMMIT":
			cur = nil
		case cur == nil:
		case strings.HasPrefix(l, ":"):
			if f := strings.Fields(l[1:]); len(f) > 0 {
				cur.chains = append(cur.chains, f[0])
			}
		case strings.HasPrefix(l, "-A "):
			args, err := iptables.SplitArgs(l)
			if err != nil {
				args = strings.Fields(l)
			}
			if len(args) >= 2 {
				cur.rules[args[1]] = append(cur.rules[args[1]], iptables.Rule(args[2:]))
			}
		}
	}
	return out
}

// sortedTables returns the table names of a parsed save, sorted, so that
// work over them happens in a stable order.
func sortedTables(saved map[iptables.Table]*savedTable) []iptables.Table {
	names := make([]iptables.Table, 0, len(saved))
	for t := range saved {
		names = append(names, t)
	}
	slices.Sort(names)
	return names
}
