package dataplane

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// Fake is a Runner that keeps the tables in memory, so that the dataplane's
// decisions (what it writes, what it deletes, when it resyncs) can be tested
// without a kernel. It refuses what the real tools refuse: restores go
// through iptables.ParseRestore and State.Apply, which check every rule as
// iptables-restore and the kernel do (TestFakeAndKernelGiveTheRecordedVerdicts
// and TestFakeAndKernelAgreeOnEveryShapeAndItsMutations hold it to the real
// tool), with --noflush, all or nothing. It differs in one way: rules are
// compared literally (the kernel normalises "-p tcp" into "-p tcp -m tcp"
// and so on).
//
// A Fake starts with the built-in chains of every table, for both families.
// It is safe for concurrent use.
type Fake struct {
	mu       sync.Mutex
	states   map[iptables.Family]iptables.State
	failNext int
	inputs   []FakeInput
	calls    []string
}

var _ Runner = (*Fake)(nil)

// FakeInput is one restore input a Fake received, kept so tests can assert
// on exactly what the dataplane wrote and how much.
type FakeInput struct {
	// Family is the family the input was for.
	Family iptables.Family
	// Text is the input exactly as received.
	Text string
	// Failed says whether the restore was refused (injected or invalid).
	Failed bool
}

// NewFake returns a Fake whose tables hold only their built-in chains.
func NewFake() *Fake {
	return &Fake{states: map[iptables.Family]iptables.State{}}
}

func (f *Fake) state(family iptables.Family) iptables.State {
	s, ok := f.states[family]
	if !ok {
		s = iptables.NewState()
		f.states[family] = s
	}
	return s
}

// State returns a copy of family's current tables.
func (f *Fake) State(family iptables.Family) iptables.State {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.state(family).Clone()
}

// SetState replaces family's tables, which lets a test play another program
// (one that flushes tables or adds its own rules).
func (f *Fake) SetState(family iptables.Family, s iptables.State) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.states[family] = s.Clone()
}

// FailNext makes the next n restores fail with a *RestoreError without
// changing anything, as a refused iptables-restore does.
func (f *Fake) FailNext(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failNext = n
}

// Inputs returns every restore input received so far, in order, including
// refused ones.
func (f *Fake) Inputs() []FakeInput {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.inputs)
}

// Calls returns one line per Runner call received so far, in order (for
// example "insert IPv4 nat PREROUTING 1 -j MP-SERVICES"), so tests can check
// that a sync did no more work than needed.
func (f *Fake) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func (f *Fake) record(format string, args ...any) {
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

var fakeLineRE = regexp.MustCompile(`^line (\d+): `)

// errFakeRefused is the cause of a Fake restore refused for invalid input.
var errFakeRefused = errors.New("fake: input refused")

// Restore applies input to the family's tables with --noflush semantics, or
// changes nothing and returns a *RestoreError.
func (f *Fake) Restore(family iptables.Family, input []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("restore %s (%d bytes)", family, len(input))
	in := FakeInput{Family: family, Text: string(input), Failed: true}
	defer func() { f.inputs = append(f.inputs, in) }()
	if f.failNext > 0 {
		f.failNext--
		return &RestoreError{Family: family, Output: "fake: refused on request", Err: errInjected}
	}
	next, err := applyInput(family, f.state(family), input)
	if err != nil {
		return err
	}
	f.states[family] = next
	in.Failed = false
	return nil
}

// Check applies input to empty tables, as a scratch namespace has them, and
// reports whether that was refused; the family's tables are not touched.
// FailNext does not apply to it.
func (f *Fake) Check(family iptables.Family, input []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("check %s (%d bytes)", family, len(input))
	_, err := applyInput(family, iptables.NewState(), input)
	return err
}

// applyInput applies a restore input to s with --noflush semantics, or
// returns a *RestoreError naming the line the model refused.
func applyInput(family iptables.Family, s iptables.State, input []byte) (iptables.State, error) {
	fail := func(err error) error {
		re := &RestoreError{Family: family, Output: err.Error(), Err: errFakeRefused}
		if m := fakeLineRE.FindStringSubmatch(re.Output); m != nil {
			re.Line, _ = strconv.Atoi(m[1])
			re.Context = inputContext(input, re.Line, 2)
			re.Text = inputLine(input, re.Line)
		}
		return re
	}
	tables, err := iptables.ParseRestore(string(input))
	if err != nil {
		return s, fail(err)
	}
	next, err := s.Apply(family, tables, true)
	if err != nil {
		return s, fail(err)
	}
	return next, nil
}

// Save renders the family's tables as iptables-save prints them (without
// the comment lines): built-in chains first with policy ACCEPT, then the
// other chains sorted by name, then the rules chain by chain.
func (f *Fake) Save(family iptables.Family, table iptables.Table) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("save %s %s", family, table)
	return f.save(family, table, "")
}

// SaveCounters renders every table as Save does, each rule with zero
// counters: the Fake sees no packets.
func (f *Fake) SaveCounters(family iptables.Family) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("save-counters %s", family)
	return f.save(family, "", "[0:0] ")
}

// save renders table (every table when "") with prefix before each rule.
func (f *Fake) save(family iptables.Family, table iptables.Table, prefix string) ([]byte, error) {
	s := f.state(family)
	var names []iptables.Table
	if table != "" {
		if _, ok := s[table]; !ok {
			return nil, fmt.Errorf("fake %s: table %q does not exist", saveCommand(family), table)
		}
		names = []iptables.Table{table}
	} else {
		for t := range s {
			names = append(names, t)
		}
		slices.Sort(names)
	}
	var b strings.Builder
	for _, t := range names {
		fmt.Fprintf(&b, "*%s\n", t)
		for _, c := range fakeChainOrder(t, s[t]) {
			if iptables.IsBuiltin(t, c) {
				fmt.Fprintf(&b, ":%s ACCEPT [0:0]\n", c)
			} else {
				fmt.Fprintf(&b, ":%s - [0:0]\n", c)
			}
		}
		for _, c := range fakeChainOrder(t, s[t]) {
			for _, l := range strings.SplitAfter(iptables.ChainText(s[t][c]), "\n") {
				if l != "" {
					b.WriteString(prefix + l)
				}
			}
		}
		b.WriteString("COMMIT\n")
	}
	return []byte(b.String()), nil
}

// fakeChainOrder lists a table's chains: built-in ones in their usual
// order, then the others sorted.
func fakeChainOrder(table iptables.Table, tab iptables.Chains) []string {
	var builtin, user []string
	for _, c := range []string{"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"} {
		if _, ok := tab[c]; ok && iptables.IsBuiltin(table, c) {
			builtin = append(builtin, c)
		}
	}
	for c := range tab {
		if !iptables.IsBuiltin(table, c) {
			user = append(user, c)
		}
	}
	sort.Strings(user)
	return append(builtin, user...)
}

// RandomFully is true: the model accepts MASQUERADE --random-fully, as
// iptables does from 1.6.2, older than any this project supports.
func (f *Fake) RandomFully(family iptables.Family) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("random-fully %s", family)
	return true, nil
}

// ChainExists says whether the family's table holds chain.
func (f *Fake) ChainExists(family iptables.Family, table iptables.Table, chain string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("chain-exists %s %s %s", family, table, chain)
	_, ok := f.state(family)[table][chain]
	return ok, nil
}

// RuleExists says whether chain holds a rule with exactly these arguments;
// a missing chain holds none (iptables -C exits 1 for both, which the real
// Runner reports as false). Like iptables -C it refuses a rule that could
// not be added there: one it cannot parse, or a jump to a chain that does
// not exist.
func (f *Fake) RuleExists(family iptables.Family, table iptables.Table, chain string, rule iptables.Rule) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("exists %s %s %s %s", family, table, chain, rule)
	s := f.state(family)
	if err := s.CheckRuleIn(family, table, chain, rule); err != nil {
		return false, fmt.Errorf("fake iptables: %w", err)
	}
	c, ok := s[table][chain]
	if !ok {
		return false, nil
	}
	for _, r := range c.Rules {
		if slices.Equal(r, rule) {
			return true, nil
		}
	}
	return false, nil
}

// InsertRule inserts rule at 1-based position pos; like iptables it refuses
// a position past the end plus one and a jump to a chain that does not exist.
func (f *Fake) InsertRule(family iptables.Family, table iptables.Table, chain string, pos int, rule iptables.Rule) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("insert %s %s %s %d %s", family, table, chain, pos, rule)
	next, err := f.state(family).Insert(family, table, chain, pos, rule)
	if err != nil {
		return fmt.Errorf("fake iptables: %w", err)
	}
	f.states[family] = next
	return nil
}

// DeleteRule deletes the first rule of chain with exactly these arguments,
// or fails as iptables -D does when there is none or the rule could not be
// there (see RuleExists).
func (f *Fake) DeleteRule(family iptables.Family, table iptables.Table, chain string, rule iptables.Rule) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("delete %s %s %s %s", family, table, chain, rule)
	s := f.state(family)
	if err := s.CheckRuleIn(family, table, chain, rule); err != nil {
		return fmt.Errorf("fake iptables: %w", err)
	}
	c, ok := s[table][chain]
	if !ok {
		return fmt.Errorf("fake iptables: chain %q does not exist in table %q", chain, table)
	}
	for i, r := range c.Rules {
		if slices.Equal(r, rule) {
			c.Rules = slices.Delete(slices.Clone(c.Rules), i, i+1)
			return nil
		}
	}
	return fmt.Errorf("fake iptables: Bad rule (does a matching rule exist in that chain?): %s %s %s", table, chain, rule)
}
