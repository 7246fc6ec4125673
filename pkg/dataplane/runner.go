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

// NewRunner returns the Runner that executes the real iptables tools:
// iptables-restore/iptables-save (ip6tables-… for IPv6) for whole inputs and
// iptables (ip6tables) for single rules. Every process it starts goes through
// one method (execRunner.exec), so that nothing else in miniproxy runs an
// iptables tool and Fake stands in for all of them. Nothing is executed until
// the first call; the tools' version is probed once per family then.
func NewRunner() Runner {
	return &execRunner{versions: map[iptables.Family]toolVersion{}}
}

type execRunner struct {
	mu       sync.Mutex
	versions map[iptables.Family]toolVersion
}

// tool is one of the iptables programs of a family.
type tool int

const (
	toolIptables tool = iota
	toolSave
	toolRestore
)

// command names the program of tool for family.
func (t tool) command(family iptables.Family) string {
	switch t {
	case toolSave:
		return saveCommand(family)
	case toolRestore:
		return restoreCommand(family)
	}
	if family == iptables.IPv6 {
		return "ip6tables"
	}
	return "iptables"
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

// toolError is a tool that exited unsuccessfully: the command line and what
// it wrote to stderr, so that the error says what was asked and why it was
// refused.
type toolError struct {
	command string
	stderr  string
	err     error
}

func (e *toolError) Error() string {
	if e.stderr == "" {
		return fmt.Sprintf("%s: %v", e.command, e.err)
	}
	return fmt.Sprintf("%s: %v: %s", e.command, e.err, e.stderr)
}

func (e *toolError) Unwrap() error { return e.err }

// exitCode gives the exit status of a tool that ran and failed, or -1 when
// err is not such a failure.
func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// exec runs tool of family with args, input on its stdin and attr for the
// new process, from the calling goroutine's OS thread, and returns its
// stdout. It is the one place the real Runner starts a process. A failure
// is a *toolError carrying the process's stderr; its exit status is
// exitCode's.
func (r *execRunner) exec(family iptables.Family, t tool, args []string, input []byte, attr *syscall.SysProcAttr) ([]byte, error) {
	name := t.command(family)
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = attr
	if input != nil {
		cmd.Stdin = bytes.NewReader(input)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), &toolError{
			command: strings.TrimSpace(name + " " + strings.Join(args, " ")),
			stderr:  strings.TrimSpace(stderr.String()),
			err:     err,
		}
	}
	return stdout.Bytes(), nil
}

// toolVersion is the version `iptables --version` reports.
type toolVersion struct{ major, minor, patch int }

// atLeast says whether v is w or later.
func (v toolVersion) atLeast(w toolVersion) bool {
	if v.major != w.major {
		return v.major > w.major
	}
	if v.minor != w.minor {
		return v.minor > w.minor
	}
	return v.patch >= w.patch
}

// versionRE finds the version in "iptables v1.8.9 (nf_tables)".
var versionRE = regexp.MustCompile(`v(\d+)\.(\d+)\.(\d+)`)

// parseVersion reads the output of `iptables --version`.
func parseVersion(out string) (toolVersion, error) {
	m := versionRE.FindStringSubmatch(out)
	if m == nil {
		return toolVersion{}, fmt.Errorf("no version in %q", strings.TrimSpace(out))
	}
	var v toolVersion
	v.major, _ = strconv.Atoi(m[1])
	v.minor, _ = strconv.Atoi(m[2])
	v.patch, _ = strconv.Atoi(m[3])
	return v, nil
}

// version probes the family's iptables version once; what the tools accept
// (--wait, --random-fully) depends on it.
func (r *execRunner) version(family iptables.Family) (toolVersion, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if v, ok := r.versions[family]; ok {
		return v, nil
	}
	out, err := r.exec(family, toolIptables, []string{"--version"}, nil, nil)
	if err != nil {
		return toolVersion{}, fmt.Errorf("probe %s iptables: %w", family, err)
	}
	v, err := parseVersion(string(out))
	if err != nil {
		return toolVersion{}, fmt.Errorf("probe %s iptables: %w", family, err)
	}
	r.versions[family] = v
	return v, nil
}

// The versions from which the tools take --wait (iptables-restore later
// than iptables) and MASQUERADE takes --random-fully. Older tools are run
// without --wait: they fail, rather than wait, while another program holds
// the xtables lock.
var (
	iptablesWaitSince = toolVersion{1, 4, 20}
	restoreWaitSince  = toolVersion{1, 6, 2}
	randomFullySince  = toolVersion{1, 6, 2}
)

func (r *execRunner) Restore(family iptables.Family, input []byte) error {
	return r.restore(family, input, nil, "--noflush")
}

// restore runs iptables-restore with args (and --wait where supported) on
// input, from the calling thread, with attr for the new process.
func (r *execRunner) restore(family iptables.Family, input []byte, attr *syscall.SysProcAttr, args ...string) error {
	v, err := r.version(family)
	if err != nil {
		return err
	}
	if v.atLeast(restoreWaitSince) {
		args = append(args, "--wait")
	}
	if out, err := r.exec(family, toolRestore, args, input, attr); err != nil {
		// The tool names the failing line on stderr or stdout, by version.
		output := string(out)
		var te *toolError
		if errors.As(err, &te) {
			output, err = output+"\n"+te.stderr, te.err
		}
		return newRestoreError(family, input, output, err)
	}
	return nil
}

// Check runs iptables-restore as a process created in a new network
// namespace of its own (CLONE_NEWNET), so that it sees empty tables and
// nothing it does reaches any other namespace; the namespace is gone when
// the process exits. Creating a network namespace needs CAP_SYS_ADMIN, as
// the DaemonSet's privileged container has.
func (r *execRunner) Check(family iptables.Family, input []byte) error {
	return r.restore(family, input, &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET})
}

func (r *execRunner) Save(family iptables.Family, table iptables.Table) ([]byte, error) {
	var args []string
	if table != "" {
		args = append(args, "-t", string(table))
	}
	return r.exec(family, toolSave, args, nil, nil)
}

// ruleCommand runs one iptables (ip6tables) command on table, with --wait
// where supported.
func (r *execRunner) ruleCommand(family iptables.Family, table iptables.Table, args ...string) error {
	v, err := r.version(family)
	if err != nil {
		return err
	}
	args = append([]string{"-t", string(table)}, args...)
	if v.atLeast(iptablesWaitSince) {
		args = append(args, "--wait")
	}
	_, err = r.exec(family, toolIptables, args, nil, nil)
	return err
}

// ChainExists lists the chain's first rule (`iptables -S chain 1`), which
// costs the same for any length of chain; exit status 1 means there is no
// such chain (or table).
func (r *execRunner) ChainExists(family iptables.Family, table iptables.Table, chain string) (bool, error) {
	err := r.ruleCommand(family, table, "-S", chain, "1")
	if exitCode(err) == 1 {
		return false, nil
	}
	return err == nil, err
}

// RuleExists runs `iptables -C`; exit status 1 means the chain does not
// hold the rule (or does not exist), 2 that the rule itself was refused.
func (r *execRunner) RuleExists(family iptables.Family, table iptables.Table, chain string, rule iptables.Rule) (bool, error) {
	err := r.ruleCommand(family, table, append([]string{"-C", chain}, rule...)...)
	if exitCode(err) == 1 {
		return false, nil
	}
	return err == nil, err
}

func (r *execRunner) InsertRule(family iptables.Family, table iptables.Table, chain string, pos int, rule iptables.Rule) error {
	return r.ruleCommand(family, table, append([]string{"-I", chain, strconv.Itoa(pos)}, rule...)...)
}

func (r *execRunner) DeleteRule(family iptables.Family, table iptables.Table, chain string, rule iptables.Rule) error {
	return r.ruleCommand(family, table, append([]string{"-D", chain}, rule...)...)
}

// RandomFully goes by the tool's version, as kube-proxy does: the kernel
// has had it since 3.13, older than any kernel Kubernetes supports.
func (r *execRunner) RandomFully(family iptables.Family) (bool, error) {
	v, err := r.version(family)
	if err != nil {
		return false, err
	}
	return v.atLeast(randomFullySince), nil
}

// errInjected is the cause of the failures Fake.FailNext asks for.
var errInjected = errors.New("failure injected by the test")
