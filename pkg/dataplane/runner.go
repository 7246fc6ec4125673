package dataplane

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// Runner is everything miniproxy asks of iptables: the one seam through
// which the dataplane, the cleanups and the daemon's start-up probes run
// iptables, iptables-save and iptables-restore (ip6tables… alike), so that
// the same code runs against the kernel (NewRunner) and against Fake in unit
// tests, swapped in one place. Rules are passed as arguments without the leading "-A CHAIN", the way
// iptables.Rule holds them.
//
// Every method runs its command from the calling goroutine's OS thread, so a
// caller that locked its thread into a network namespace gets that
// namespace's tables.
type Runner interface {
	// Restore feeds input to `iptables-restore --noflush` (or
	// ip6tables-restore): the input is applied atomically or not at all.
	// A failure is a *RestoreError naming the offending input line.
	Restore(family iptables.Family, input []byte) error
	// Save returns iptables-save output (without counters) for table, or for
	// every table that exists when table is "".
	Save(family iptables.Family, table iptables.Table) ([]byte, error)
	// SaveCounters returns iptables-save -c output of every table: each
	// rule with its packet and byte counters ("[p:b] -A ..."), which
	// show whether traffic takes it (/debug/rules).
	SaveCounters(family iptables.Family) ([]byte, error)
	// ChainExists says whether chain exists in table; a missing table is
	// reported as a missing chain, not as an error.
	ChainExists(family iptables.Family, table iptables.Table, chain string) (bool, error)
	// RuleExists says whether chain holds rule (iptables -C).
	RuleExists(family iptables.Family, table iptables.Table, chain string, rule iptables.Rule) (bool, error)
	// InsertRule inserts rule at 1-based position pos of chain (iptables -I).
	InsertRule(family iptables.Family, table iptables.Table, chain string, pos int, rule iptables.Rule) error
	// DeleteRule deletes the first rule of chain equal to rule (iptables -D).
	DeleteRule(family iptables.Family, table iptables.Table, chain string, rule iptables.Rule) error
	// Check asks the kernel whether it accepts input, without touching the
	// live tables: the input is restored into the empty tables of a new
	// network namespace that is gone afterwards. A refusal is a
	// *RestoreError, as from Restore.
	Check(family iptables.Family, input []byte) error
	// RandomFully says whether MASQUERADE takes --random-fully here, which
	// avoids source port collisions under load (the rules add it when it
	// does, as kube-proxy's).
	RandomFully(family iptables.Family) (bool, error)
}

// RestoreError is how a Runner reports a failed restore: the tool's own
// message plus the input lines it complained about, because "line 4711
// failed" alone is useless once the input is gone.
type RestoreError struct {
	// Family is the IP family whose restore failed.
	Family iptables.Family
	// Line is the 1-based input line the tool named, or 0 when it named none.
	Line int
	// Context holds the input lines around Line, numbered, the offending
	// one marked with ">"; empty when Line is 0.
	Context string
	// Output is what the tool wrote (stderr and stdout), trimmed of its usage hint.
	Output string
	// Text is the input line the tool named, as given; empty when Line is 0.
	Text string
	// Err is the underlying error (usually an *exec.ExitError).
	Err error
}

// Error gives the tool's message followed by the offending input lines.
func (e *RestoreError) Error() string {
	var b strings.Builder
	b.WriteString(restoreCommand(e.Family))
	b.WriteString(" failed")
	if e.Err != nil {
		b.WriteString(" (")
		b.WriteString(e.Err.Error())
		b.WriteString(")")
	}
	if e.Output != "" {
		b.WriteString(": ")
		b.WriteString(e.Output)
	}
	if e.Context != "" {
		fmt.Fprintf(&b, "\ninput around line %d:\n%s", e.Line, e.Context)
	}
	return b.String()
}

// Unwrap gives the underlying error.
func (e *RestoreError) Unwrap() error { return e.Err }

// lineRE matches the ways iptables-restore names the input line it failed on:
// "Error occurred at line: 5", "line 3 failed", "line 3: CHAIN_DEL failed".
var lineRE = regexp.MustCompile(`(?i)line:? (\d+)`)

// newRestoreError builds a RestoreError, finding the line the tool named in
// output and quoting that line of input and two lines either side.
func newRestoreError(family iptables.Family, input []byte, output string, err error) *RestoreError {
	var kept []string
	for _, l := range strings.Split(output, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "Try `") {
			continue
		}
		kept = append(kept, l)
	}
	e := &RestoreError{Family: family, Output: strings.Join(kept, "; "), Err: err}
	if m := lineRE.FindStringSubmatch(output); m != nil {
		e.Line, _ = strconv.Atoi(m[1])
		e.Context = inputContext(input, e.Line, 2)
		e.Text = inputLine(input, e.Line)
	}
	return e
}

// inputLine returns line n (1-based) of input, or "".
func inputLine(input []byte, n int) string {
	lines := strings.Split(string(input), "\n")
	if n < 1 || n > len(lines) {
		return ""
	}
	return lines[n-1]
}

// inputContext returns lines line-around..line+around of input, numbered,
// with the line itself marked. Long lines are cut so that an error message
// stays readable.
func inputContext(input []byte, line, around int) string {
	if line <= 0 {
		return ""
	}
	lines := strings.Split(strings.TrimSuffix(string(input), "\n"), "\n")
	var b strings.Builder
	for n := max(1, line-around); n <= min(len(lines), line+around); n++ {
		l := lines[n-1]
		if len(l) > 300 {
			l = l[:300] + "..."
		}
		mark := " "
		if n == line {
			mark = ">"
		}
		fmt.Fprintf(&b, "%s %6d | %s\n", mark, n, l)
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// restoreCommand and saveCommand name the tools of a family, for the real
// Runner and for errors alike.
func restoreCommand(family iptables.Family) string {
	if family == iptables.IPv6 {
		return "ip6tables-restore"
	}
	return "iptables-restore"
}

func saveCommand(family iptables.Family) string {
	if family == iptables.IPv6 {
		return "ip6tables-save"
	}
	return "iptables-save"
}

// errInjected is the cause of the failures Fake.FailNext asks for.
var errInjected = errors.New("failure injected by the test")
