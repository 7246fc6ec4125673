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

// NewRunner returns the Runner that executes the real iptables tools:
// iptables-restore/iptables-save (ip6tables-… for IPv6) for whole inputs and
// iptables (ip6tables) for single rules. Every process it starts goes through
// one method (execRunner.exec), so that nothing else in miniproxy runs an
// iptables tool and Fake stands in for all of them. Nothing is executed until
// the first call; the tools' version is probed once per family then. It is
// Linux only (the tools, and the CLONE_NEWNET of Check); the rest of the
// package, Fake included, builds anywhere.
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

func (r *execRunner) SaveCounters(family iptables.Family) ([]byte, error) {
	return r.exec(family, toolSave, []string{"-c"}, nil, nil)
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
