package main

import (
	"fmt"
	"io"
	"regexp"
	"sort"
	"strings"
	"time"
)

// Event is one line of `go test -json`: the test2json events of each
// package (start, run, pause, cont, output, pass, fail, skip) and, since
// Go 1.24, the build's events (build-output, build-fail).
type Event struct {
	Time        time.Time
	Action      string
	Package     string
	Test        string
	Elapsed     float64
	Output      string
	FailedBuild string
	ImportPath  string
}

// Printer turns the events back into the text `go test` prints without
// -json and -v, and adds progress lines.
//
// Out receives, per package, what plain `go test` prints in package list
// mode, at the same moment: once the package and those that started before
// it have ended. That is the "ok" or "?" line of a package that passed; the
// whole text of one that failed (what its tests wrote to stdout and
// stderr, the "--- FAIL: TestX (1.00s)" report of each failed test followed
// by its log, panics, "FAIL", "FAIL pkg 1.2s"); and a last "FAIL" line when
// go test failed. Errs receives the build's output (compile and vet
// errors), as it comes, where plain go test prints it: to stderr.
//
// Progress receives lines starting with "..." that plain go test does not
// print: every Interval, what runs and for how long (each running test with
// the first line of its last log entry); a test that failed, as
// soon as it fails (its report follows when its package ends); a test that
// ran longer than Interval, when it ends; the totals at the end.
//
// One deliberate addition to Out: the log of a test that never finished
// (the package timed out or crashed) is printed before the package's FAIL
// line, under a "=== logs of TestX, which did not finish:" header; plain
// go test drops it.
type Printer struct {
	Out, Errs, Progress io.Writer
	// Interval is the period of the progress lines, and the running time
	// from which a test's end is announced.
	Interval time.Duration
	// Trim is removed from the front of package paths in progress lines
	// (the module path and a slash).
	Trim string
	// Total is the number of packages go test was given (0: unknown).
	Total int

	start time.Time
	pkgs  map[string]*pkg // the packages that run
	// queue holds, in the order they started, the packages not printed
	// yet: plain go test prints packages in that order, so a package that
	// ended waits for those before it.
	queue        []*pkg
	done, failed int
	failedPkgs   []string
	buildFailed  int
}

type pkg struct {
	name   string
	start  time.Time
	text   strings.Builder // the package's text as plain go test prints it
	last   string          // the last package-level line (the "ok" line at the end)
	said   string          // the last non-empty package-level line, for progress
	tests  map[string]*test
	order  []*test
	ended  bool
	result string // what Out gets for it once ended
}

type test struct {
	name     string
	parent   *test
	start    time.Time
	paused   bool
	reported bool // its "--- PASS/FAIL/SKIP" line was seen
	done     bool
	log      strings.Builder // its log, and failed subtests' reports, indented as in plain go test
	said     string          // the first line of its last log entry, for progress
	// failedChild: a subtest failed (the failure was announced there).
	failedChild bool
}

const indent = "    "

// NewPrinter returns a Printer whose elapsed times count from start.
func NewPrinter(out, errs, progress io.Writer, start time.Time) *Printer {
	return &Printer{Out: out, Errs: errs, Progress: progress, Interval: 10 * time.Second,
		start: start, pkgs: map[string]*pkg{}}
}

// framing are the lines of go test -v that plain go test does not print.
var framing = []string{"=== RUN ", "=== PAUSE ", "=== CONT ", "=== NAME ", "=== ATTR ", "=== ARTIFACTS "}

// Event handles one event. Elapsed times count to its Time.
func (p *Printer) Event(e Event) {
	now := e.Time
	switch e.Action {
	case "build-output":
		io.WriteString(p.Errs, e.Output)
		return
	case "build-fail":
		p.buildFailed++
		return
	}
	if e.Package == "" {
		return
	}
	k := p.pkgs[e.Package]
	if k == nil {
		k = &pkg{name: e.Package, start: now, tests: map[string]*test{}}
		p.pkgs[e.Package] = k
		p.queue = append(p.queue, k)
	}
	if e.Test == "" {
		switch e.Action {
		case "output":
			k.text.WriteString(e.Output)
			k.last = e.Output
			if s := strings.TrimSpace(e.Output); s != "" {
				k.said = s
			}
		case "pass", "fail", "skip":
			p.packageEnded(k, e)
		}
		return
	}
	t := k.tests[e.Test]
	switch e.Action {
	case "run":
		t = &test{name: e.Test, start: now, parent: k.parentOf(e.Test)}
		k.tests[e.Test] = t
		k.order = append(k.order, t)
	case "pause":
		if t != nil {
			t.paused = true
		}
	case "cont":
		if t != nil {
			t.paused = false
			t.start = now // the time it waited is not running time
		}
	case "output":
		p.output(k, t, e)
	case "pass", "fail", "skip":
		if t != nil {
			p.testEnded(k, t, e)
		}
	}
}

// parentOf finds the running test name is a subtest of (test names may
// contain slashes of their own, so the longest prefix that runs wins).
func (k *pkg) parentOf(name string) *test {
	for i := strings.LastIndexByte(name, '/'); i > 0; i = strings.LastIndexByte(name[:i], '/') {
		if t := k.tests[name[:i]]; t != nil && !t.done {
			return t
		}
	}
	return nil
}

func (p *Printer) output(k *pkg, t *test, e Event) {
	line := e.Output
	if t == nil {
		k.text.WriteString(line)
		return
	}
	for _, f := range framing {
		if strings.HasPrefix(line, f) {
			return
		}
	}
	for _, verdict := range []string{"FAIL", "PASS", "SKIP"} {
		if strings.HasPrefix(strings.TrimLeft(line, " "), "--- "+verdict+": "+t.name+" (") {
			t.reported = true
			if verdict == "FAIL" {
				report := strings.TrimLeft(line, " ") + t.log.String()
				if t.parent == nil {
					k.text.WriteString(report)
				} else {
					t.parent.log.WriteString(indentLines(report))
					t.parent.failedChild = true
				}
			}
			t.log.Reset()
			return
		}
	}
	// Plain go test holds a test's log (indented) until the test ends and
	// prints it only if the test failed; anything else a test writes to
	// stdout or stderr appears at once, as does what comes after its report
	// (an example's got/want, a panic).
	if !t.reported && strings.HasPrefix(line, indent) {
		t.log.WriteString(line)
		// An entry's first line is indented once, its next lines twice.
		if !strings.HasPrefix(line, indent+" ") {
			t.said = logPrefix.ReplaceAllString(strings.TrimSpace(line), "")
		}
		return
	}
	k.text.WriteString(line)
}

// logPrefix is where t.Log says it was called from.
var logPrefix = regexp.MustCompile(`^[^ :]+\.go:\d+: `)

func indentLines(s string) string {
	var b strings.Builder
	for _, l := range strings.SplitAfter(s, "\n") {
		if l != "" {
			b.WriteString(indent + l)
		}
	}
	return b.String()
}

func (p *Printer) testEnded(k *pkg, t *test, e Event) {
	t.done = true
	took := time.Duration(e.Elapsed * float64(time.Second))
	switch {
	case e.Action == "fail" && !t.failedChild:
		p.progressf(e.Time, "%s %s FAILED (%s); its report follows when %s ends", p.short(k.name), t.name, dur(took), p.short(k.name))
	case e.Action == "fail":
	case took >= p.Interval:
		verb := map[string]string{"pass": "passed", "skip": "skipped"}[e.Action]
		p.progressf(e.Time, "%s %s %s (%s)", p.short(k.name), t.name, verb, dur(took))
	}
}

func (p *Printer) packageEnded(k *pkg, e Event) {
	k.ended = true
	delete(p.pkgs, k.name)
	p.done++
	if e.Action != "fail" {
		k.result = k.last
	} else {
		p.failed++
		p.failedPkgs = append(p.failedPkgs, p.short(k.name))
		k.result = k.withUnfinished()
	}
	for len(p.queue) > 0 && p.queue[0].ended {
		io.WriteString(p.Out, p.queue[0].result)
		p.queue = p.queue[1:]
	}
}

// withUnfinished is the package's text with the logs of the tests that
// never ended inserted before its last line (the "FAIL pkg" line).
func (k *pkg) withUnfinished() string {
	var logs strings.Builder
	for _, t := range k.order {
		if !t.done && !t.reported && t.log.Len() > 0 {
			fmt.Fprintf(&logs, "=== logs of %s, which did not finish:\n%s", t.name, t.log.String())
		}
	}
	text := k.text.String()
	if logs.Len() == 0 {
		return text
	}
	if strings.HasSuffix(text, k.last) && strings.HasPrefix(k.last, "FAIL\t") {
		return strings.TrimSuffix(text, k.last) + logs.String() + k.last
	}
	return text + logs.String()
}

// Tick prints a progress line: how far go test is, which packages and
// tests are running and for how long.
func (p *Printer) Tick(now time.Time) {
	var running []*pkg
	for _, k := range p.pkgs {
		running = append(running, k)
	}
	sort.Slice(running, func(i, j int) bool { return running[i].start.Before(running[j].start) })
	done := packages(p.done) + " done"
	if p.Total > 0 {
		done = fmt.Sprintf("%d of %s done", p.done, packages(p.Total))
	}
	if len(running) == 0 {
		p.progressf(now, "%s; building test binaries", done)
		return
	}
	var parts []string
	for _, k := range running {
		parts = append(parts, p.describe(k, now))
	}
	p.progressf(now, "%s; running: %s", done, strings.Join(parts, ", "))
}

// describe says what a running package does: its innermost running tests,
// longest first, or that it has not started a test yet and what it said.
func (p *Printer) describe(k *pkg, now time.Time) string {
	var leaves []*test
	for _, t := range k.order {
		if t.done || t.paused {
			continue
		}
		leaf := true
		for _, c := range k.order {
			if c.parent == t && !c.done && !c.paused {
				leaf = false
				break
			}
		}
		if leaf {
			leaves = append(leaves, t)
		}
	}
	name := p.short(k.name)
	if len(leaves) == 0 {
		if len(k.order) > 0 {
			return fmt.Sprintf("%s (%s, between tests)", name, dur(now.Sub(k.start)))
		}
		s := fmt.Sprintf("%s (%s, before its first test", name, dur(now.Sub(k.start)))
		if k.said != "" {
			s += "; it said: " + clip(k.said, 80)
		}
		return s + ")"
	}
	sort.SliceStable(leaves, func(i, j int) bool { return leaves[i].start.Before(leaves[j].start) })
	const most = 3
	var parts []string
	for i, t := range leaves {
		if i == most {
			parts = append(parts, fmt.Sprintf("and %d more", len(leaves)-most))
			break
		}
		said := ""
		if t.said != "" {
			said = "; last log: " + clip(t.said, 80)
		}
		parts = append(parts, fmt.Sprintf("%s (%s%s)", clip(t.name, 90), dur(now.Sub(t.start)), said))
	}
	return name + " " + strings.Join(parts, ", ")
}

// Finish prints what is left once go test has exited with exitCode: the
// text of packages that never ended, plain go test's last "FAIL" line if
// it failed, and the totals. It returns the exit code to exit with: go
// test's, or 1 if go test said 0 but a package or build failed.
func (p *Printer) Finish(now time.Time, exitCode int) int {
	left := 0
	for _, k := range p.queue {
		if !k.ended {
			left++
			p.failed++
			p.failedPkgs = append(p.failedPkgs, p.short(k.name)+" (did not end)")
			k.result = k.withUnfinished()
		}
		io.WriteString(p.Out, k.result)
	}
	p.queue = nil
	if exitCode == 0 && (p.failed > 0 || p.buildFailed > 0) {
		exitCode = 1
	}
	if exitCode != 0 {
		io.WriteString(p.Out, "FAIL\n")
	}
	summary := fmt.Sprintf("go test ended after %s: %s", dur(now.Sub(p.start)), packages(p.done+left))
	if p.failed > 0 {
		summary += fmt.Sprintf(", %d failed: %s", p.failed, strings.Join(p.failedPkgs, ", "))
	} else if exitCode == 0 {
		summary += ", all ok"
	}
	if exitCode != 0 {
		summary += fmt.Sprintf("; exit status %d", exitCode)
	}
	p.progressf(now, "%s", summary)
	return exitCode
}

func (p *Printer) progressf(now time.Time, format string, args ...any) {
	if p.Progress == nil {
		return
	}
	fmt.Fprintf(p.Progress, "... [%s] "+format+"\n", append([]any{dur(now.Sub(p.start)).String()}, args...)...)
}

func (p *Printer) short(pkg string) string {
	if p.Trim != "" {
		if s, ok := strings.CutPrefix(pkg, p.Trim+"/"); ok {
			return s
		}
	}
	return pkg
}

// dur rounds a duration for reading: tenths of a second below 10 s,
// seconds above.
func dur(d time.Duration) time.Duration {
	if d < 10*time.Second {
		return d.Round(100 * time.Millisecond)
	}
	return d.Round(time.Second)
}

func packages(n int) string {
	if n == 1 {
		return "1 package"
	}
	return fmt.Sprintf("%d packages", n)
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
