package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// The recorded cases in testdata are the fixture packages of
// testdata/fixtures run twice by testdata/record.sh: once with go test
// -json (<case>.json) and once plainly (<case>.txt, .err, .exit). Fed the
// first, the printer must print the second.

type replay struct {
	out, errs, progress string
	code                int
}

// play feeds a recorded go test -json stream to a Printer and finishes it
// with go test's exit code.
func play(t *testing.T, name string, goExit int) replay {
	t.Helper()
	f, err := os.Open(filepath.Join("testdata", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out, errs, progress bytes.Buffer
	var p *Printer
	var last time.Time
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var e Event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("%s: %v", sc.Text(), err)
		}
		if p == nil && !e.Time.IsZero() {
			p = NewPrinter(&out, &errs, &progress, e.Time)
			p.Trim = "example.com/fixtures"
		}
		if e.Time.IsZero() {
			e.Time = last
		}
		last = e.Time
		if p == nil { // build events come first and have no time
			p = NewPrinter(&out, &errs, &progress, time.Time{})
			p.Trim = "example.com/fixtures"
		}
		p.Event(e)
	}
	code := p.Finish(last, goExit)
	return replay{out.String(), errs.String(), progress.String(), code}
}

func recorded(t *testing.T, name string) (txt, errs string, exit int) {
	t.Helper()
	read := func(ext string) string {
		b, err := os.ReadFile(filepath.Join("testdata", name+ext))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	exit, err := strconv.Atoi(strings.TrimSpace(read(".exit")))
	if err != nil {
		t.Fatal(err)
	}
	return read(".txt"), read(".err"), exit
}

var (
	seconds    = regexp.MustCompile(`\d+\.\d+s\b`)
	hex        = regexp.MustCompile(`0x[0-9a-f]+`)
	goroutines = regexp.MustCompile(`goroutine \d+ \[[^]]*\]`)
)

// same removes what differs between two runs of the same tests: durations,
// and in stack traces goroutine numbers and states and addresses.
func same(s string) string {
	s = seconds.ReplaceAllString(s, "N.NNs")
	s = hex.ReplaceAllString(s, "0x?")
	return goroutines.ReplaceAllString(s, "goroutine N [...]")
}

func TestPrintsWhatPlainGoTestPrints(t *testing.T) {
	for _, name := range []string{"pass", "fail", "build", "panic"} {
		t.Run(name, func(t *testing.T) {
			txt, errs, exit := recorded(t, name)
			r := play(t, name, exit)
			if d := cmp.Diff(same(txt), same(r.out)); d != "" {
				t.Errorf("stdout differs from plain go test's (-plain +printed):\n%s", d)
			}
			if d := cmp.Diff(errs, r.errs); d != "" {
				t.Errorf("stderr differs from plain go test's (-plain +printed):\n%s", d)
			}
			if r.code != exit {
				t.Errorf("exit status %d, go test's was %d", r.code, exit)
			}
		})
	}
}

func TestWhatTheUserSees(t *testing.T) {
	t.Run("a pass", func(t *testing.T) {
		r := play(t, "pass", 0)
		want := "ok  \texample.com/fixtures/pass\tN.NNs\n?   \texample.com/fixtures/notests\t[no test files]\n"
		if d := cmp.Diff(want, same(r.out)); d != "" {
			t.Errorf("(-want +got):\n%s", d)
		}
		if r.code != 0 {
			t.Errorf("exit status %d, want 0", r.code)
		}
		if !strings.Contains(r.progress, "go test ended after") || !strings.Contains(r.progress, "2 packages, all ok") {
			t.Errorf("no summary saying all is well:\n%s", r.progress)
		}
	})
	t.Run("failures with output", func(t *testing.T) {
		r := play(t, "fail", 1)
		for _, line := range []string{
			"--- FAIL: TestFails (N.NNs)\n    failing_test.go:12: before\n",
			"--- FAIL: TestSub (N.NNs)\n    failing_test.go:20: parent log before\n    --- FAIL: TestSub/bad (N.NNs)\n" +
				"        failing_test.go:23: sub bad log\n        --- FAIL: TestSub/bad/deeper (N.NNs)\n" +
				"            failing_test.go:24: deep failure\n    failing_test.go:27: parent log after\n",
			"    --- FAIL: TestParallel/p2 (N.NNs)\n",
			"--- FAIL: Example_bad (N.NNs)\ngot:\ngot this\nwant:\nwant that\n",
			"\nFAIL\texample.com/fixtures/failing\tN.NNs\n",
			"lab: starting\n--- FAIL: TestTwo (N.NNs)\n    main_test.go:17: two failed\nFAIL\nlab: stopping\nFAIL\texample.com/fixtures/mainprint\tN.NNs\nFAIL\n",
		} {
			if !strings.Contains(same(r.out), line) {
				t.Errorf("missing %q in:\n%s", line, r.out)
			}
		}
		for _, hidden := range []string{"a log of a passing test", "sub ok log", "in p1", "=== RUN", "--- PASS", "--- SKIP", "not today"} {
			if strings.Contains(r.out, hidden) {
				t.Errorf("plain go test does not print %q, but it is in:\n%s", hidden, r.out)
			}
		}
		// Each failing test is announced as it fails; a parent whose
		// subtest failed is not announced again.
		for _, name := range []string{"TestFails", "TestSub/bad/deeper", "TestParallel/p2", "Example_bad", "TestTwo"} {
			if !strings.Contains(r.progress, " "+name+" FAILED") {
				t.Errorf("%s's failure not announced:\n%s", name, r.progress)
			}
		}
		if strings.Contains(r.progress, "TestSub FAILED") || strings.Contains(r.progress, "TestParallel FAILED") {
			t.Errorf("a parent announced besides its subtest:\n%s", r.progress)
		}
		if !strings.Contains(r.progress, "2 failed: failing, mainprint; exit status 1") {
			t.Errorf("summary does not name the failed packages:\n%s", r.progress)
		}
		if r.code != 1 {
			t.Errorf("exit status %d, want 1", r.code)
		}
	})
	t.Run("build failures", func(t *testing.T) {
		r := play(t, "build", 1)
		if !strings.Contains(r.errs, "broken_test.go:5:40: cannot use \"s\"") || !strings.Contains(r.errs, "fmt.Printf format %d has arg") {
			t.Errorf("compile and vet errors missing from stderr:\n%s", r.errs)
		}
		want := "FAIL\texample.com/fixtures/broken [build failed]\nFAIL\texample.com/fixtures/vetbad [build failed]\n" +
			"ok  \texample.com/fixtures/pass\tN.NNs\nFAIL\n"
		if d := cmp.Diff(want, same(r.out)); d != "" {
			t.Errorf("(-want +got):\n%s", d)
		}
		if r.code != 1 {
			t.Errorf("exit status %d, want 1", r.code)
		}
		// Read from a pipe, go test's exit status is unknown (0): the
		// failed builds are enough to fail.
		if r := play(t, "build", 0); r.code != 1 || !strings.HasSuffix(r.out, "\nFAIL\n") {
			t.Errorf("without go test's exit status: exit %d, output:\n%s", r.code, r.out)
		}
	})
	t.Run("a panic", func(t *testing.T) {
		r := play(t, "panic", 1)
		want := "--- FAIL: TestPanics (N.NNs)\n    panicky_test.go:8: about to panic\npanic: assignment to entry in nil map [recovered, repanicked]\n\ngoroutine N [...]:\n"
		if !strings.HasPrefix(same(r.out), want) {
			t.Errorf("want it to start with %q, got:\n%s", want, r.out)
		}
		if !strings.HasSuffix(same(r.out), "\nFAIL\texample.com/fixtures/panicky\tN.NNs\nFAIL\n") {
			t.Errorf("no FAIL lines at the end:\n%s", r.out)
		}
		if strings.Contains(r.out, "first ok") {
			t.Errorf("the passing test's log is printed:\n%s", r.out)
		}
		if r.code != 1 {
			t.Errorf("exit status %d, want 1", r.code)
		}
	})
	t.Run("a timeout: the log of the test that did not finish", func(t *testing.T) {
		txt, _, exit := recorded(t, "timeout")
		r := play(t, "timeout", exit)
		// Plain go test drops the hanging test's log; the printer adds it
		// before the package's FAIL line, and is otherwise the same.
		added := "=== logs of TestHangs, which did not finish:\n    timeout_test.go:9: log of a hanging test\n"
		fail := "FAIL\texample.com/fixtures/timeout\tN.NNs\n"
		want := strings.Replace(same(txt), fail, added+fail, 1)
		if d := cmp.Diff(want, same(r.out)); d != "" {
			t.Errorf("(-want +got):\n%s", d)
		}
		if r.code != 1 {
			t.Errorf("exit status %d, want 1", r.code)
		}
	})
}

// TestProgress feeds a made-up run of two long packages and a short one,
// with progress ticks in between, and checks every progress line: each
// running test with its last log entry, or a package's last line before
// its first test.
func TestProgress(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	var out, errs, progress bytes.Buffer
	p := NewPrinter(&out, &errs, &progress, t0)
	p.Trim = "github.com/miniproxy/miniproxy"
	p.Total = 3
	const faults, parity, rules = "github.com/miniproxy/miniproxy/test/faults", "github.com/miniproxy/miniproxy/test/parity", "github.com/miniproxy/miniproxy/pkg/rules"
	ev := func(s float64, action, pkg, test, output string, elapsed float64) {
		p.Event(Event{Time: at(s), Action: action, Package: pkg, Test: test, Output: output, Elapsed: elapsed})
	}
	p.Tick(at(10))
	ev(12, "start", rules, "", "", 0)
	ev(12.5, "output", rules, "", "ok  \t"+rules+"\t0.4s\n", 0)
	ev(12.5, "pass", rules, "", "", 0.4)
	ev(14, "start", faults, "", "", 0)
	ev(14, "output", faults, "", "lab: network up: router, client 198.51.100.79\n", 0)
	ev(15, "start", parity, "", "", 0)
	ev(16, "run", parity, "TestParity", "", 0)
	ev(17, "run", parity, "TestParity/scenario_1", "", 0)
	p.Tick(at(20))
	ev(29, "run", faults, "TestDrillOddObjects", "", 0)
	ev(30, "pass", parity, "TestParity/scenario_1", "", 13)
	ev(31, "run", parity, "TestParity/scenario_2", "", 0)
	ev(31.5, "output", parity, "TestParity/scenario_2", "    parity_test.go:99: probe differs\n", 0)
	ev(31.5, "output", parity, "TestParity/scenario_2", "--- FAIL: TestParity/scenario_2 (0.50s)\n", 0)
	ev(31.5, "fail", parity, "TestParity/scenario_2", "", 0.5)
	ev(32, "run", parity, "TestParity/scenario_3", "", 0)
	ev(33, "output", parity, "TestParity/scenario_3", "    parity_test.go:87: scenario 3 of 50, 1 differences so far\n", 0)
	ev(33, "output", parity, "TestParity/scenario_3", "        a second line of the same entry\n", 0)
	p.Tick(at(84))
	ev(95, "pass", faults, "TestDrillOddObjects", "", 66)
	p.Tick(at(100))

	want := `... [10s] 0 of 3 packages done; building test binaries
... [20s] 1 of 3 packages done; running: test/faults (6s, before its first test; it said: lab: network up: router, client 198.51.100.79), test/parity TestParity/scenario_1 (3s)
... [30s] test/parity TestParity/scenario_1 passed (13s)
... [32s] test/parity TestParity/scenario_2 FAILED (500ms); its report follows when test/parity ends
... [1m24s] 1 of 3 packages done; running: test/faults TestDrillOddObjects (55s), test/parity TestParity/scenario_3 (52s; last log: scenario 3 of 50, 1 differences so far)
... [1m35s] test/faults TestDrillOddObjects passed (1m6s)
... [1m40s] 1 of 3 packages done; running: test/faults (1m26s, between tests), test/parity TestParity/scenario_3 (1m8s; last log: scenario 3 of 50, 1 differences so far)
`
	if d := cmp.Diff(want, progress.String()); d != "" {
		t.Errorf("progress (-want +got):\n%s", d)
	}
	if got := out.String(); got != "ok  \t"+rules+"\t0.4s\n" {
		t.Errorf("stdout: %q", got)
	}
}

func TestPackageArgs(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"-count=1", "-timeout", "25m", "./..."}, []string{"./..."}},
		{[]string{"-count", "1", "./pkg/...", "./cmd/...", "-run", "TestX"}, []string{"./pkg/...", "./cmd/..."}},
		{[]string{"-v", "./test/parity", "-parity.scenarios=500"}, []string{"./test/parity"}},
		{[]string{"-count=1"}, nil},
	} {
		if d := cmp.Diff(tc.want, packageArgs(tc.args)); d != "" {
			t.Errorf("%q: (-want +got):\n%s", tc.args, d)
		}
	}
}
