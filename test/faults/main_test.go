// Package faults runs the fault drills of issue 14 in the namespace lab: a
// real etcd and kube-apiserver, two nodes running miniproxy, and, during
// every drill, two load generators that hit Services the fault does not
// concern (a pod to a ClusterIP, the outside client to a NodePort, a
// request every 100 ms each) and count what failed. Each drill prints its
// figures; with -faults.report=FILE the table of docs/reliability.md is
// rewritten from them.
package faults

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/cluster"
)

var reportFile = flag.String("faults.report", "", "rewrite the drills table between the markers of this file (docs/reliability.md)")

// lab is the cluster every drill shares.
var lab *cluster.Cluster

func TestMain(m *testing.M) {
	flag.Parse()
	code := cluster.RunTests(m, "faults", func(c *cluster.Cluster) { lab = c })
	if code == 0 && *reportFile != "" && os.Geteuid() == 0 {
		if err := writeReport(*reportFile); err != nil {
			fmt.Println("faults: write the report:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func testContext(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// figures is one row of the drills table.
type figures struct {
	drill         string
	failed, total int64
	recovery      string // time to recover, as measured
	operatorSaw   string // log line, metric, health answer
}

var (
	rowsMu sync.Mutex
	rows   = map[string]figures{}
)

// record prints a drill's figures and keeps them for the report.
func record(t *testing.T, f figures) {
	t.Helper()
	t.Logf("DRILL %s: %d of %d requests to other Services failed; recovery: %s; the operator saw: %s",
		f.drill, f.failed, f.total, f.recovery, f.operatorSaw)
	rowsMu.Lock()
	rows[f.drill] = f
	rowsMu.Unlock()
}

const (
	beginMarker = "<!-- drills table: rewritten by make test -faults.report -->"
	endMarker   = "<!-- end of drills table -->"
)

// writeReport puts the drills table between the markers of file: this
// run's rows, and the rows of drills this run did not run as they were
// (a row is known by its drill's number, the first word of its first cell).
func writeReport(file string) error {
	raw, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	s := string(raw)
	a, b := strings.Index(s, beginMarker), strings.Index(s, endMarker)
	if a < 0 || b < a {
		return fmt.Errorf("%s lacks the markers %q and %q", file, beginMarker, endMarker)
	}
	byNumber := map[string]string{}
	for _, line := range strings.Split(s[a:b], "\n") {
		if cells := strings.Split(line, "|"); len(cells) > 2 && strings.HasPrefix(line, "| ") && !strings.HasPrefix(line, "| drill") {
			byNumber[strings.Fields(cells[1])[0]] = line
		}
	}
	for _, f := range rows {
		byNumber[strings.Fields(f.drill)[0]] = fmt.Sprintf("| %s | %d / %d | %s | %s |", f.drill, f.failed, f.total, f.recovery, f.operatorSaw)
	}
	numbers := make([]string, 0, len(byNumber))
	for n := range byNumber {
		numbers = append(numbers, n)
	}
	sort.Strings(numbers)
	var tb strings.Builder
	tb.WriteString(beginMarker + "\n\n| drill | failed / total requests to other Services | time to recover | what the operator saw |\n|---|---|---|---|\n")
	for _, n := range numbers {
		tb.WriteString(byNumber[n] + "\n")
	}
	fmt.Fprintf(&tb, "\nLast written %s by `make drills` (a drill run alone with -faults.report updates its own row).\n\n", time.Now().UTC().Format("2006-01-02"))
	return os.WriteFile(file, []byte(s[:a]+tb.String()+s[b:]), 0o644)
}
