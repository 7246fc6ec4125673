package iptables

import (
	"slices"
	"strconv"
	"strings"
)

// Counter is a rule's packet and byte counters, as `iptables-save -c`
// prints them ("[packets:bytes]" before the rule).
type Counter struct {
	Packets, Bytes uint64
}

// SavedTable is one table of iptables-save output: its chains in the order
// printed, each chain's rules as arguments without "-A CHAIN", and their
// counters when the output had them.
type SavedTable struct {
	Chains []string
	Rules  map[string][]Rule
	// Counters holds, per chain, one entry per rule; nil without -c.
	Counters map[string][]Counter
}

// Saved is iptables-save output of one family, by table.
type Saved map[Table]*SavedTable

// ParseSave reads iptables-save output, with or without counters (-c).
// Unlike ParseRestore it never fails: the output also holds other
// programs' rules, and a rule this package cannot split exactly must not
// stop a sync or an explanation. Such a rule is split on blanks, which is
// enough to find its target.
func ParseSave(text string) Saved {
	out := Saved{}
	var cur *SavedTable
	for _, l := range strings.Split(text, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case l == "" || strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "*"):
			cur = &SavedTable{Rules: map[string][]Rule{}}
			out[Table(l[1:])] = cur
		case l == "COMMIT":
			cur = nil
		case cur == nil:
		case strings.HasPrefix(l, ":"):
			if f := strings.Fields(l[1:]); len(f) > 0 {
				cur.Chains = append(cur.Chains, f[0])
			}
		default:
			cnt, rest, counted := cutCounter(l)
			if !strings.HasPrefix(rest, "-A ") {
				continue
			}
			args, err := SplitArgs(rest)
			if err != nil {
				args = strings.Fields(rest)
			}
			if len(args) < 2 {
				continue
			}
			cur.Rules[args[1]] = append(cur.Rules[args[1]], Rule(args[2:]))
			if counted {
				if cur.Counters == nil {
					cur.Counters = map[string][]Counter{}
				}
				cur.Counters[args[1]] = append(cur.Counters[args[1]], cnt)
			}
		}
	}
	return out
}

// cutCounter splits "[p:b] -A ..." into its counter and the rule line.
func cutCounter(l string) (Counter, string, bool) {
	if !strings.HasPrefix(l, "[") {
		return Counter{}, l, false
	}
	inside, rest, ok := strings.Cut(l[1:], "]")
	if !ok {
		return Counter{}, l, false
	}
	p, b, _ := strings.Cut(inside, ":")
	packets, err1 := strconv.ParseUint(p, 10, 64)
	bytes, err2 := strconv.ParseUint(b, 10, 64)
	if err1 != nil || err2 != nil {
		return Counter{}, l, false
	}
	return Counter{Packets: packets, Bytes: bytes}, strings.TrimSpace(rest), true
}

// Tables returns the table names, sorted, so that work over them happens
// in a stable order.
func (s Saved) Tables() []Table {
	names := make([]Table, 0, len(s))
	for t := range s {
		names = append(names, t)
	}
	slices.Sort(names)
	return names
}

// State gives the tables as a State, for the tracer: every chain printed,
// with its rules, unchecked (what the kernel holds was accepted by it).
func (s Saved) State() State {
	out := State{}
	for t, st := range s {
		out[t] = Chains{}
		for _, c := range st.Chains {
			out[t][c] = &Chain{Name: c, Rules: st.Rules[c]}
		}
	}
	return out
}
