package dataplane

import (
	"bytes"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"

	goipt "github.com/coreos/go-iptables/iptables"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// Runner is everything the dataplane asks of iptables, so that the same
// Dataplane code runs against the kernel (NewRunner) and against Fake in unit
// tests. Rules are passed as arguments without the leading "-A CHAIN", the way
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
	Save(family iptables.Family, table string) ([]byte, error)
	// ChainExists says whether chain exists in table; a missing table is
	// reported as a missing chain, not as an error.
	ChainExists(family iptables.Family, table, chain string) (bool, error)
	// RuleExists says whether chain holds rule (iptables -C).
	RuleExists(family iptables.Family, table, chain string, rule iptables.Rule) (bool, error)
	// InsertRule inserts rule at 1-based position pos of chain (iptables -I).
	InsertRule(family iptables.Family, table, chain string, pos int, rule iptables.Rule) error
	// DeleteRule deletes the first rule of chain equal to rule (iptables -D).
	DeleteRule(family iptables.Family, table, chain string, rule iptables.Rule) error
	// Check asks the kernel whether it accepts input, without touching the
	// live tables: the input is restored into the empty tables of a new
	// network namespace that is gone afterwards. A refusal is a
	// *RestoreError, as from Restore.
	Check(family iptables.Family, input []byte) error
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

// NewRunner returns the Runner that executes the real iptables tools:
// iptables-restore/iptables-save (ip6tables-… for IPv6) for whole inputs and
// go-iptables for single rules. Nothing is executed until the first call; the
// iptables version is probed once per family then.
func NewRunner() Runner {
	return &execRunner{ipt: map[iptables.Family]*goipt.IPTables{}}
}

type execRunner struct {
	mu  sync.Mutex
	ipt map[iptables.Family]*goipt.IPTables
}

func (r *execRunner) handle(family iptables.Family) (*goipt.IPTables, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ipt, ok := r.ipt[family]; ok {
		return ipt, nil
	}
	proto := goipt.ProtocolIPv4
	if family == iptables.IPv6 {
		proto = goipt.ProtocolIPv6
	}
	ipt, err := goipt.NewWithProtocol(proto)
	if err != nil {
		return nil, fmt.Errorf("probe %s iptables: %w", family, err)
	}
	r.ipt[family] = ipt
	return ipt, nil
}

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

// restoreHasWait says whether iptables-restore of this version accepts
// --wait (added in 1.6.2).
func restoreHasWait(v1, v2, v3 int) bool {
	return v1 > 1 || (v1 == 1 && (v2 > 6 || (v2 == 6 && v3 >= 2)))
}

func (r *execRunner) Restore(family iptables.Family, input []byte) error {
	return r.run(family, input, nil, "--noflush")
}

// run runs iptables-restore with args (and --wait where supported) on
// input, from the calling thread, with attr for the new process.
func (r *execRunner) run(family iptables.Family, input []byte, attr *syscall.SysProcAttr, args ...string) error {
	ipt, err := r.handle(family)
	if err != nil {
		return err
	}
	if restoreHasWait(ipt.GetIptablesVersion()) {
		args = append(args, "--wait")
	}
	cmd := exec.Command(restoreCommand(family), args...)
	cmd.SysProcAttr = attr
	cmd.Stdin = bytes.NewReader(input)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return newRestoreError(family, input, out.String(), err)
	}
	return nil
}

// Check runs iptables-restore as a process created in a new network
// namespace of its own (CLONE_NEWNET), so that it sees empty tables and
// nothing it does reaches any other namespace; the namespace is gone when
// the process exits. Creating a network namespace needs CAP_SYS_ADMIN, as
// the DaemonSet's privileged container has.
func (r *execRunner) Check(family iptables.Family, input []byte) error {
	return r.run(family, input, &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET})
}

func (r *execRunner) Save(family iptables.Family, table string) ([]byte, error) {
	var args []string
	if table != "" {
		args = append(args, "-t", table)
	}
	cmd := exec.Command(saveCommand(family), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s", saveCommand(family), strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

func (r *execRunner) ChainExists(family iptables.Family, table, chain string) (bool, error) {
	ipt, err := r.handle(family)
	if err != nil {
		return false, err
	}
	return ipt.ChainExists(table, chain)
}

func (r *execRunner) RuleExists(family iptables.Family, table, chain string, rule iptables.Rule) (bool, error) {
	ipt, err := r.handle(family)
	if err != nil {
		return false, err
	}
	return ipt.Exists(table, chain, rule...)
}

func (r *execRunner) InsertRule(family iptables.Family, table, chain string, pos int, rule iptables.Rule) error {
	ipt, err := r.handle(family)
	if err != nil {
		return err
	}
	return ipt.Insert(table, chain, pos, rule...)
}

func (r *execRunner) DeleteRule(family iptables.Family, table, chain string, rule iptables.Rule) error {
	ipt, err := r.handle(family)
	if err != nil {
		return err
	}
	return ipt.Delete(table, chain, rule...)
}

// errInjected is the cause of the failures Fake.FailNext asks for.
var errInjected = errors.New("failure injected by the test")
