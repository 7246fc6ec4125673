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
	"github.com/miniproxy/miniproxy/test/netns"
)

var reportFile = flag.String("faults.report", "", "rewrite the drills table between the markers of this file (docs/reliability.md)")

// lab is the cluster every drill shares.
var lab *cluster.Cluster

func TestMain(m *testing.M) {
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Println("faults: skipped, needs root to build network namespaces")
		os.Exit(0)
	}
	if _, err := netns.K8sBinaries(); err != nil {
		fmt.Printf("faults: kube-apiserver is not available (run `make k8s-binaries`): %v\n", err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	var err error
	lab, err = cluster.Start(ctx, cluster.Options{Nodes: 2, Logf: func(f string, a ...any) { fmt.Printf("lab: "+f+"\n", a...) }})
	cancel()
	if err != nil {
		fmt.Println("faults: start the lab cluster:", err)
		os.Exit(1)
	}
	code := m.Run()
	if code != 0 {
		fmt.Println(lab.Outputs())
	}
	lab.Close()
	if code == 0 && *reportFile != "" {
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

// writeReport puts the drills table between the markers of file.
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
	var tb strings.Builder
	tb.WriteString(beginMarker + "\n\n| drill | failed / total requests to other Services | time to recover | what the operator saw |\n|---|---|---|---|\n")
	names := make([]string, 0, len(rows))
	for n := range rows {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		f := rows[n]
		fmt.Fprintf(&tb, "| %s | %d / %d | %s | %s |\n", f.drill, f.failed, f.total, f.recovery, f.operatorSaw)
	}
	fmt.Fprintf(&tb, "\nMeasured %s.\n\n", time.Now().UTC().Format("2006-01-02"))
	return os.WriteFile(file, []byte(s[:a]+tb.String()+s[b:]), 0o644)
}
