// Package iptables models iptables-restore input and the tables it produces,
// so that the packet tracer and the dataplane fake share one reading of the
// text that the real iptables-restore is given.
package iptables

import (
	"bufio"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Rule is one rule of a chain, split into arguments the way a shell would,
// without the leading "-A CHAIN".
type Rule []string

// String renders the rule's arguments, quoting those that contain spaces.
func (r Rule) String() string {
	parts := make([]string, len(r))
	for i, a := range r {
		if strings.ContainsAny(a, " \t\"") {
			a = `"` + strings.ReplaceAll(a, `"`, `\"`) + `"`
		}
		parts[i] = a
	}
	return strings.Join(parts, " ")
}

// Chain is a named, ordered list of rules.
type Chain struct {
	Name  string
	Rules []Rule
}

// Chains maps the chain names of one table to its chains.
type Chains map[string]*Chain

// State is the content of every table, as iptables-save would show it.
type State map[Table]Chains

// Op is one operation of a restore input.
type Op struct {
	// Kind is ':' (declare: create or flush), 'A' (append), 'I' (insert at the
	// head), 'X' (delete chain) or 'F' (flush chain).
	Kind  byte
	Chain string
	Rule  Rule
	// Line is the 1-based line of the input this operation came from, so
	// errors can point at the offending line.
	Line int
}

// TableInput is the part of a restore input between "*table" and "COMMIT".
type TableInput struct {
	Table Table
	Ops   []Op
	// CommitLine is the line of the COMMIT, where the real tool reports
	// some refusals.
	CommitLine int
}

// ParseRestore reads iptables-restore input. It accepts what this project
// writes and what iptables-save prints: "*table", ":CHAIN POLICY [p:b]",
// "-A/-I/-X/-F", "COMMIT", comments and blank lines.
func ParseRestore(text string) ([]TableInput, error) {
	var out []TableInput
	var cur *TableInput
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1024*1024), 64*1024*1024)
	line := 0
	for sc.Scan() {
		line++
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		switch {
		case strings.HasPrefix(l, "*"):
			if cur != nil {
				return nil, fmt.Errorf("line %d: table %q started before COMMIT of %q", line, l[1:], cur.Table)
			}
			cur = &TableInput{Table: Table(l[1:])}
		case l == "COMMIT":
			if cur == nil {
				return nil, fmt.Errorf("line %d: COMMIT outside a table", line)
			}
			cur.CommitLine = line
			out = append(out, *cur)
			cur = nil
		default:
			if cur == nil {
				return nil, fmt.Errorf("line %d: %q outside a table", line, l)
			}
			op, err := parseOp(l)
			if err != nil {
				return nil, fmt.Errorf("line %d: %w", line, err)
			}
			op.Line = line
			cur.Ops = append(cur.Ops, op)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read restore input: %w", err)
	}
	if cur != nil {
		return nil, fmt.Errorf("table %q has no COMMIT", cur.Table)
	}
	return out, nil
}

func parseOp(l string) (Op, error) {
	if strings.HasPrefix(l, ":") {
		f := strings.Fields(l[1:])
		if len(f) == 0 {
			return Op{}, fmt.Errorf("chain declaration without a name")
		}
		return Op{Kind: ':', Chain: f[0]}, nil
	}
	args, err := SplitArgs(l)
	if err != nil {
		return Op{}, err
	}
	if len(args) < 2 {
		return Op{}, fmt.Errorf("%q: want an operation and a chain", l)
	}
	switch args[0] {
	case "-A", "--append":
		return Op{Kind: 'A', Chain: args[1], Rule: Rule(args[2:])}, nil
	case "-I", "--insert":
		return Op{Kind: 'I', Chain: args[1], Rule: Rule(args[2:])}, nil
	case "-X", "--delete-chain":
		return Op{Kind: 'X', Chain: args[1]}, nil
	case "-F", "--flush":
		return Op{Kind: 'F', Chain: args[1]}, nil
	}
	return Op{}, fmt.Errorf("%q: unsupported operation %q", l, args[0])
}

// SplitArgs splits a rule line into arguments, honouring double quotes as
// iptables-restore does.
func SplitArgs(l string) ([]string, error) {
	var args []string
	var b strings.Builder
	inQuote, have := false, false
	for i := 0; i < len(l); i++ {
		c := l[i]
		switch {
		case c == '\\' && inQuote && i+1 < len(l) && l[i+1] == '"':
			b.WriteByte('"')
			i++
		case c == '"':
			inQuote = !inQuote
			have = true
		case (c == ' ' || c == '\t') && !inQuote:
			if have {
				args = append(args, b.String())
				b.Reset()
				have = false
			}
		default:
			b.WriteByte(c)
			have = true
		}
	}
	if inQuote {
		return nil, fmt.Errorf("%q: unterminated quote", l)
	}
	if have {
		args = append(args, b.String())
	}
	return args, nil
}

// builtinChains are the chains each table has before anyone writes to it.
var builtinChains = map[Table][]string{
	Filter: {"INPUT", "FORWARD", "OUTPUT"},
	NAT:    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
	Mangle: {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
	Raw:    {"PREROUTING", "OUTPUT"},
}

// IsBuiltin says whether chain is one of table's built-in chains.
func IsBuiltin(table Table, chain string) bool {
	for _, c := range builtinChains[table] {
		if c == chain {
			return true
		}
	}
	return false
}

// NewState returns the tables of a fresh network namespace: built-in chains only.
func NewState() State {
	s := State{}
	for t, chains := range builtinChains {
		s[t] = Chains{}
		for _, c := range chains {
			s[t][c] = &Chain{Name: c}
		}
	}
	return s
}

// Clone returns a deep copy, so a failed apply can be thrown away.
func (s State) Clone() State {
	out := State{}
	for t, tab := range s {
		out[t] = Chains{}
		for n, c := range tab {
			out[t][n] = &Chain{Name: c.Name, Rules: append([]Rule(nil), c.Rules...)}
		}
	}
	return out
}

// Apply performs a restore input for family with iptables-restore's
// semantics and returns the new state; s is left unchanged. With noflush,
// tables are kept and only the chains the input declares are flushed;
// without it each table named in the input is emptied first. Like the real
// tool it refuses the whole input for anything the tool or the kernel
// refuses (see check.go): a rule it cannot parse, a jump to a chain not
// declared before the jump, a chain deleted while referenced or not empty, a
// built-in chain deleted, a loop, or a target reached from a chain where it
// is not valid.
func (s State) Apply(family Family, inputs []TableInput, noflush bool) (State, error) {
	next := s.Clone()
	for _, in := range inputs {
		tab, ok := next[in.Table]
		if !ok {
			return s, fmt.Errorf("unable to initialize table '%s'", in.Table)
		}
		if !noflush {
			for name, c := range tab {
				if IsBuiltin(in.Table, name) {
					c.Rules = nil
				} else {
					delete(tab, name)
				}
			}
		}
		refs := references(tab)
		for _, op := range in.Ops {
			if err := applyOp(family, in.Table, tab, refs, op); err != nil {
				line := op.Line
				if errors.As(err, new(atCommit)) {
					line = in.CommitLine
				}
				return s, fmt.Errorf("line %d: %w", line, err)
			}
		}
		if err := checkReach(in.Table, tab); err != nil {
			return s, fmt.Errorf("line %d: %w", in.CommitLine, err)
		}
	}
	return next, nil
}

// atCommit marks refusals the real tool reports at the table's COMMIT line
// rather than at the rule's.
type atCommit struct{ error }

// references counts, per chain, the rules jumping to it.
func references(tab Chains) map[string]int {
	refs := map[string]int{}
	for _, c := range tab {
		for _, r := range c.Rules {
			if t := r.Target(); t != "" {
				refs[t]++
			}
		}
	}
	return refs
}

func flush(c *Chain, refs map[string]int) {
	for _, r := range c.Rules {
		if t := r.Target(); t != "" {
			refs[t]--
		}
	}
	c.Rules = nil
}

func applyOp(family Family, table Table, tab Chains, refs map[string]int, op Op) error {
	switch op.Kind {
	case ':':
		if err := checkChainName(op.Chain); err != nil {
			return err
		}
		if c, ok := tab[op.Chain]; ok {
			flush(c, refs)
		} else {
			tab[op.Chain] = &Chain{Name: op.Chain}
		}
	case 'A', 'I':
		c, ok := tab[op.Chain]
		if !ok {
			return fmt.Errorf("No chain/target/match by that name (chain %q, table %q)", op.Chain, table)
		}
		if err := checkRuleIn(family, table, op.Chain, tab, op.Rule); err != nil {
			return err
		}
		if op.Kind == 'A' {
			c.Rules = append(c.Rules, op.Rule)
		} else {
			c.Rules = append([]Rule{op.Rule}, c.Rules...)
		}
		if t := op.Rule.Target(); t != "" {
			refs[t]++
		}
	case 'F':
		c, ok := tab[op.Chain]
		if !ok {
			return fmt.Errorf("No chain/target/match by that name (chain %q, table %q)", op.Chain, table)
		}
		flush(c, refs)
	case 'X':
		c, ok := tab[op.Chain]
		switch {
		case !ok:
			return fmt.Errorf("No chain/target/match by that name (chain %q, table %q)", op.Chain, table)
		case IsBuiltin(table, op.Chain):
			return fmt.Errorf("CHAIN_DEL failed (Device or resource busy): chain %s is built in", op.Chain)
		case len(c.Rules) > 0:
			return fmt.Errorf("CHAIN_DEL failed (Device or resource busy): chain %s is not empty", op.Chain)
		}
		if refs[op.Chain] > 0 {
			return fmt.Errorf("CHAIN_DEL failed (Device or resource busy): chain %s is referenced", op.Chain)
		}
		delete(tab, op.Chain)
	}
	return nil
}

// checkRuleIn checks a rule about to be added to chain of tab: the rule by
// itself, its interfaces in that chain, and that the chain it jumps to
// exists already.
func checkRuleIn(family Family, table Table, chain string, tab Chains, r Rule) error {
	p, err := parseRule(family, table, r)
	if err != nil {
		return err
	}
	if err := checkIfaceIn(table, chain, p); err != nil {
		return err
	}
	if p.jumpTo == "" || p.target != nil {
		return nil
	}
	if _, ok := tab[p.jumpTo]; !ok {
		return atCommit{fmt.Errorf("Chain '%s' does not exist", p.jumpTo)}
	}
	return nil
}

// CheckRuleIn says what iptables refuses about r as a rule of chain in table,
// given the chains s has: the rule by itself, its interfaces in that chain,
// and that a chain it jumps to exists. `iptables -C` and `-D` refuse such a
// rule before they look for it, so a fake of them must too.
func (s State) CheckRuleIn(family Family, table Table, chain string, r Rule) error {
	tab, ok := s[table]
	if !ok {
		return fmt.Errorf("table %q does not exist", table)
	}
	return checkRuleIn(family, table, chain, tab, r)
}

// Target returns the rule's -j/-g argument, or "" when it has none.
func (r Rule) Target() string {
	for i := 0; i+1 < len(r); i++ {
		if r[i] == "-j" || r[i] == "--jump" || r[i] == "-g" || r[i] == "--goto" {
			return r[i+1]
		}
	}
	return ""
}

// Insert returns s with rule inserted at 1-based position pos of chain, as
// `iptables -I` does, refusing what iptables refuses: a position past the
// end plus one, a rule it cannot parse, a jump to a chain that does not
// exist, a target reached from where it is not valid, a loop.
func (s State) Insert(family Family, table Table, chain string, pos int, r Rule) (State, error) {
	next := s.Clone()
	c, ok := next[table][chain]
	if !ok {
		return s, fmt.Errorf("chain %q does not exist in table %q", chain, table)
	}
	if pos < 1 || pos > len(c.Rules)+1 {
		return s, fmt.Errorf("index of insertion %d too big for %s", pos, chain)
	}
	if err := checkRuleIn(family, table, chain, next[table], r); err != nil {
		return s, err
	}
	c.Rules = slices.Insert(c.Rules, pos-1, slices.Clone(r))
	if err := checkReach(table, next[table]); err != nil {
		return s, err
	}
	return next, nil
}
