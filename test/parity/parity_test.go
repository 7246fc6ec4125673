package parity

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/netns"
)

var (
	scenarios = flag.Int("parity.scenarios", 50, "how many scenarios to run")
	seed      = flag.Uint64("parity.seed", 20261202, "the seed of the scenario generator")
	report    = flag.String("parity.report", "", "a Markdown file whose last-run section is rewritten with the summary (make parity: docs/parity.md)")
	only      = flag.Int("parity.only", -1, "run only this scenario (to look at one difference again)")
	dump      = flag.Bool("parity.dump", false, "print both nodes' iptables-save when a difference is found")
)

// tries is how often a probe is asked; a probe whose answers differ
// between the proxies is asked confirmTries times again on both, and those
// answers decide (with three endpoints, 12 tries miss one with probability
// 3*(2/3)^12, about 2%; 48 make that 10^-8).
const (
	tries        = 12
	confirmTries = 48
)

// both runs f on the two sides at once.
func both(sides [2]*side, f func(s *side) error) error {
	var wg sync.WaitGroup
	var errs [2]error
	for i, s := range sides {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = f(s) }()
	}
	wg.Wait()
	return errors.Join(errs[0], errs[1])
}

// labBinaries skips t without root (the labs are network namespaces) and
// fails it without the Kubernetes binaries they run.
func labBinaries(t *testing.T) netns.K8sBinaryPaths {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to build network namespaces")
	}
	bins, err := netns.K8sBinaries()
	if err != nil {
		t.Fatalf("kube-apiserver, kube-controller-manager and kube-proxy are needed (make k8s-binaries): %v", err)
	}
	return bins
}

// TestParity runs the scenarios of the seed on miniproxy and on upstream
// kube-proxy and fails on every difference in what a client saw that
// docs/parity.md does not explain.
func TestParity(t *testing.T) {
	labBinaries(t)
	ctx := context.Background()
	start := time.Now()
	sides, err := startBoth(ctx, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			for _, s := range sides {
				t.Logf("--- %s lab:\n%s", s.proxy, s.c.Outputs())
			}
		}
		for _, s := range sides {
			s.close()
		}
	}()
	t.Logf("both labs up in %s", time.Since(start).Round(time.Second))

	var diffs []difference
	probesRun, attempts := 0, 0
	run := time.Now()
	said := run
	for i := 0; i < *scenarios; i++ {
		if *only >= 0 && i != *only {
			continue
		}
		// How far it is, every 10 s (make test's progress lines show a
		// running test's last log line).
		if time.Since(said) >= 10*time.Second {
			t.Logf("scenario %d of %d, %d differences so far", i+1, *scenarios, len(diffs))
			said = time.Now()
		}
		sc := generate(*seed, i)
		if err := both(sides, func(s *side) error { return s.apply(ctx, sc) }); err != nil {
			t.Fatalf("scenario %d: %v", i, err)
		}
		if err := both(sides, func(s *side) error { return s.waitSynced(ctx) }); err != nil {
			t.Fatalf("scenario %d: %v", i, err)
		}
		ps := probes(sc)
		var outs [2][]string
		if err := both(sides, func(s *side) error {
			o, err := s.outcomes(ctx, ps, tries)
			outs[indexOf(sides, s)] = o
			return err
		}); err != nil {
			t.Fatalf("scenario %d: %v", i, err)
		}
		probesRun += len(ps)
		for j, p := range ps {
			attempts += 2 * tries
			if outs[0][j] == outs[1][j] {
				continue
			}
			var again [2]string
			if err := both(sides, func(s *side) error {
				o, err := s.outcome(ctx, p, confirmTries)
				again[indexOf(sides, s)] = o
				return err
			}); err != nil {
				t.Fatalf("scenario %d: %v", i, err)
			}
			attempts += 2 * confirmTries
			mini, kube := again[0], again[1]
			if mini == kube {
				continue
			}
			d := difference{scenario: sc, probe: p, mini: mini, kube: kube}
			d.known = knownAs(d)
			diffs = append(diffs, d)
			if d.known == "" {
				t.Errorf("difference: %s\n  miniproxy:  %s\n  kube-proxy: %s\n%s", p, mini, kube, sc.describe(p.Service))
				if *dump {
					for _, s := range sides {
						for _, n := range s.c.Nodes {
							out, _, _ := n.NS.Run(ctx, "iptables-save")
							t.Logf("%s %s iptables-save:\n%s", s.proxy, n.Name, out)
						}
					}
				}
			}
		}
		if err := both(sides, func(s *side) error { return s.clear(ctx, sc) }); err != nil {
			t.Fatalf("scenario %d: %v", i, err)
		}
	}
	elapsed := time.Since(run)
	summary := summarize(*seed, *scenarios, probesRun, attempts, diffs, elapsed)
	summary += fmt.Sprintf("\ntransient failures among answers, left out: miniproxy %d, kube-proxy %d", sides[0].transient.Load(), sides[1].transient.Load())
	t.Log(summary)
	if *report != "" {
		if err := writeReport(*report, summary); err != nil {
			t.Error(err)
		}
	}
}

func indexOf(sides [2]*side, s *side) int {
	if sides[0] == s {
		return 0
	}
	return 1
}

func summarize(seed uint64, n, probes, attempts int, diffs []difference, elapsed time.Duration) string {
	known := map[string]int{}
	unexplained := 0
	for _, d := range diffs {
		if d.known == "" {
			unexplained++
		} else {
			known[d.known]++
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "seed %d: %d scenarios, %d probes (%d requests) in %s; %d differences, %d unexplained",
		seed, n, probes, attempts, elapsed.Round(time.Second), len(diffs), unexplained)
	for _, name := range slices.Sorted(maps.Keys(known)) {
		fmt.Fprintf(&b, "\n- known, %s: %d", name, known[name])
	}
	return b.String()
}

// writeReport puts the summary between the last-run markers of path.
func writeReport(path, summary string) error {
	stamp := time.Now().UTC().Format("2006-01-02 15:04 UTC")
	return rewriteMarked(path, "last run", fmt.Sprintf("%s (run %s)", summary, stamp))
}

// rewriteMarked puts text, as a code block, between the markers <!-- name
// --> and <!-- /name --> of the Markdown file at path.
func rewriteMarked(path, name, text string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	re := regexp.MustCompile(`(?s)<!-- ` + name + ` -->.*<!-- /` + name + ` -->`)
	if !re.Match(b) {
		return fmt.Errorf("%s has no <!-- %s --> markers", path, name)
	}
	block := fmt.Sprintf("<!-- %s -->\n```\n%s\n```\n<!-- /%s -->", name, text, name)
	return os.WriteFile(path, re.ReplaceAllLiteral(b, []byte(block)), 0o644)
}
