package iptables

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
)

// Family is an IP family; each has its own iptables binaries and tables.
type Family int

// The two IP families.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// String gives "IPv4" or "IPv6" for logs and metrics.
func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// FamilyOf gives the family of an address (IPv4-mapped IPv6 addresses are
// IPv4).
func FamilyOf(a netip.Addr) Family {
	if a.Unmap().Is4() {
		return IPv4
	}
	return IPv6
}

// Table names one of the kernel's iptables tables. It is a type of its own so
// that a table and a chain, both names, cannot be passed in each other's
// place.
type Table string

// The tables miniproxy writes to (nat, filter) or looks at (mangle, raw:
// cleanups and iptables-save list them).
const (
	NAT    Table = "nat"
	Filter Table = "filter"
	Mangle Table = "mangle"
	Raw    Table = "raw"
)

// Jump is a rule this project keeps in a built-in chain (or another chain it
// does not own) so that packets reach its own chains. Jumps are kept at the
// head of the chain, in the order given.
type Jump struct {
	Table Table
	Chain string
	Rule  Rule
}

// TableRules is the desired content of this project's chains in one table.
type TableRules struct {
	Table  Table
	Chains []Chain
}

// Ruleset is everything this project wants in one family's tables: its own
// chains (which it owns entirely) and the jumps into them.
type Ruleset struct {
	Family Family
	Tables []TableRules
	Jumps  []Jump
}

// Chain returns the named chain of table, or nil.
func (rs *Ruleset) Chain(table Table, name string) *Chain {
	for ti := range rs.Tables {
		if rs.Tables[ti].Table != table {
			continue
		}
		for ci := range rs.Tables[ti].Chains {
			if rs.Tables[ti].Chains[ci].Name == name {
				return &rs.Tables[ti].Chains[ci]
			}
		}
	}
	return nil
}

// ChainText renders a chain's rules as restore lines ("-A NAME ..."), the
// form in which the dataplane compares what it applied with what it wants.
func ChainText(c *Chain) string {
	var b strings.Builder
	for _, r := range c.Rules {
		b.WriteString("-A ")
		b.WriteString(c.Name)
		b.WriteByte(' ')
		b.WriteString(r.String())
		b.WriteByte('\n')
	}
	return b.String()
}

// RenderRestore writes restore input for `iptables-restore --noflush`: for
// each table, the chains for which write(table, chain) is true are declared
// (which creates or flushes them) and filled, and the chains in remove are
// deleted. Declarations come first, then rules, then deletions, so that a
// rule may jump to a chain declared later and a chain is only deleted after
// the rules that jumped to it were rewritten. A table with nothing to do is
// left out.
func RenderRestore(rs *Ruleset, write func(table Table, chain string) bool, remove map[Table][]string) string {
	var b strings.Builder
	tables := map[Table]bool{}
	for _, t := range rs.Tables {
		tables[t.Table] = true
	}
	for t := range remove {
		tables[t] = true
	}
	names := make([]Table, 0, len(tables))
	for t := range tables {
		names = append(names, t)
	}
	slices.Sort(names)
	for _, table := range names {
		var chains []*Chain
		for ti := range rs.Tables {
			if rs.Tables[ti].Table != table {
				continue
			}
			for ci := range rs.Tables[ti].Chains {
				c := &rs.Tables[ti].Chains[ci]
				if write(table, c.Name) {
					chains = append(chains, c)
				}
			}
		}
		gone := append([]string(nil), remove[table]...)
		sort.Strings(gone)
		if len(chains) == 0 && len(gone) == 0 {
			continue
		}
		fmt.Fprintf(&b, "*%s\n", table)
		for _, c := range chains {
			fmt.Fprintf(&b, ":%s - [0:0]\n", c.Name)
		}
		// A chain about to be deleted is flushed first, so that chains
		// referring to each other can be deleted in one input.
		for _, name := range gone {
			fmt.Fprintf(&b, ":%s - [0:0]\n", name)
		}
		for _, c := range chains {
			b.WriteString(ChainText(c))
		}
		for _, name := range gone {
			fmt.Fprintf(&b, "-X %s\n", name)
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// RenderComplete writes restore input that builds rs in empty tables:
// every chain declared and filled, and the jumps appended to their
// built-in chains, in order, before each table's COMMIT. It is how the
// rules are judged away from the live tables (a scratch namespace, the
// packet tracer) with every check the kernel makes on the way from the
// built-in chains.
func RenderComplete(rs *Ruleset) string {
	text := RenderRestore(rs, func(Table, string) bool { return true }, nil)
	var b strings.Builder
	var table Table
	for _, l := range strings.SplitAfter(text, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			table = Table(strings.TrimSpace(l[1:]))
		case l == "COMMIT\n":
			for _, j := range rs.Jumps {
				if j.Table == table {
					fmt.Fprintf(&b, "-A %s %s\n", j.Chain, j.Rule)
				}
			}
		}
		b.WriteString(l)
	}
	return b.String()
}
