package faults

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/cluster"
)

// Every iptables and nft command of these drills runs through node.NS.Run,
// in a lab node's namespace: never in the root namespace.

var (
	countersRE = regexp.MustCompile(`\[\d+:\d+\]`)
	// canaryWarning is miniproxy's warning when the canary check finds the
	// rules flushed.
	canaryWarning = regexp.MustCompile(`(?m)^W\d{4} .*canary chain MP-CANARY of table .*another program flushed miniproxy's rules; rewriting all of them.*$`)
)

// saveTables is iptables-save (and ip6tables-save) of a node, comments
// dropped and counters zeroed, so that two saves of the same rules compare
// equal.
func saveTables(ctx context.Context, node *cluster.Node) (string, error) {
	var b strings.Builder
	for _, tool := range []string{"iptables-save", "ip6tables-save"} {
		out, stderr, err := node.NS.Run(ctx, tool)
		if err != nil {
			return "", fmt.Errorf("%s on %s: %v: %s", tool, node.Name, err, stderr)
		}
		b.WriteString("# " + tool + "\n")
		for _, l := range strings.Split(out, "\n") {
			if l == "" || strings.HasPrefix(l, "#") {
				continue
			}
			b.WriteString(countersRE.ReplaceAllString(l, "[0:0]") + "\n")
		}
	}
	return b.String(), nil
}

// ownLines keeps the lines of a normalised save that are miniproxy's: its
// chains, their rules and the jumps to them, with the table they are in.
func ownLines(save string) []string {
	var out []string
	table := ""
	for _, l := range strings.Split(save, "\n") {
		switch {
		case strings.HasPrefix(l, "# "), strings.HasPrefix(l, "*"):
			table = strings.TrimPrefix(strings.TrimPrefix(l, "# "), "*")
		case strings.Contains(l, "MP-"):
			out = append(out, table+": "+l)
		}
	}
	return out
}

// deleteOwnChains is the restore input that deletes miniproxy's chains in
// nat and filter, as a careless cleanup script would: the jumps to them
// from the built-in chains, then every MP- chain flushed and deleted.
func deleteOwnChains(save string) string {
	var b strings.Builder
	table := ""
	var chains []string
	var jumps []string
	flush := func() {
		if table != "nat" && table != "filter" {
			return
		}
		fmt.Fprintf(&b, "*%s\n", table)
		for _, j := range jumps {
			b.WriteString(j + "\n")
		}
		for _, c := range chains {
			fmt.Fprintf(&b, "-F %s\n", c)
		}
		for _, c := range chains {
			fmt.Fprintf(&b, "-X %s\n", c)
		}
		b.WriteString("COMMIT\n")
	}
	for _, l := range strings.Split(save, "\n") {
		switch {
		case strings.HasPrefix(l, "# "):
			if l != "# iptables-save" {
				table = "" // IPv4 only
			}
		case strings.HasPrefix(l, "*"):
			table, chains, jumps = l[1:], nil, nil
		case l == "COMMIT":
			flush()
			table = ""
		case strings.HasPrefix(l, ":MP-"):
			chains = append(chains, strings.Fields(l[1:])[0])
		case strings.HasPrefix(l, "-A ") && !strings.HasPrefix(l, "-A MP-") && strings.Contains(l, " -j MP-"):
			jumps = append(jumps, "-D"+l[2:])
		}
	}
	return b.String()
}

// nftTables lists a node's nftables tables.
func nftTables(ctx context.Context, node *cluster.Node) ([]string, error) {
	out, stderr, err := node.NS.Run(ctx, "nft", "list", "tables")
	if err != nil {
		return nil, fmt.Errorf("nft list tables on %s: %v: %s", node.Name, err, stderr)
	}
	return strings.Fields(strings.ReplaceAll(out, "\n", " ")), nil
}

// Drill 2: another program breaks node1's rules, in three ways; the
// canary check (every proxy.DefaultCanaryInterval, 5 s, whatever the sync
// period, here the default 30 s) notices, warns, and rewrites everything.
// Every Service goes through these rules, so requests to the steady
// Service fail until they are back; the drill counts them and measures,
// with iptables-save from the node's namespace, when the rules are back,
// and checks that the node is then exactly as before (counters aside).
func TestDrillRulesFlushed(t *testing.T) {
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatalf("nft is needed for the nft flush ruleset variant (scripts/install-deps.sh installs nftables): %v", err)
	}
	node := lab.Nodes[0] // the node the load goes through
	variants := []struct {
		row    string
		break_ func(ctx context.Context, t *testing.T, before string) error
	}{
		{
			row: "2a. iptables -t nat -F on node1",
			break_: func(ctx context.Context, t *testing.T, _ string) error {
				_, stderr, err := node.NS.Run(ctx, "iptables", "-t", "nat", "-F")
				if err != nil {
					return fmt.Errorf("%v: %s", err, stderr)
				}
				return nil
			},
		},
		{
			row: "2b. miniproxy's chains deleted on node1 (jumps, -F and -X of every MP- chain in nat and filter)",
			break_: func(ctx context.Context, t *testing.T, before string) error {
				file := filepath.Join(t.TempDir(), "delete-own-chains")
				input := deleteOwnChains(before)
				if !strings.Contains(input, "-X MP-CANARY") {
					return fmt.Errorf("no chains to delete in\n%s", before)
				}
				if err := os.WriteFile(file, []byte(input), 0o644); err != nil {
					return err
				}
				_, stderr, err := node.NS.Run(ctx, "iptables-restore", "--noflush", file)
				if err != nil {
					return fmt.Errorf("%v: %s\ninput:\n%s", err, stderr, input)
				}
				return nil
			},
		},
		{
			row: "2c. nft flush ruleset on node1",
			break_: func(ctx context.Context, t *testing.T, _ string) error {
				_, stderr, err := node.NS.Run(ctx, "nft", "flush", "ruleset")
				if err != nil {
					return fmt.Errorf("%v: %s", err, stderr)
				}
				return nil
			},
		},
	}
	for _, v := range variants {
		t.Run(v.row, func(t *testing.T) {
			ctx := testContext(t, 2*time.Minute)
			l := startLoad(t)
			time.Sleep(2 * time.Second) // some load before the fault
			before, err := saveTables(ctx, node)
			if err != nil {
				t.Fatal(err)
			}
			tablesBefore, err := nftTables(ctx, node)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("nftables tables of %s before the fault: %s", node.Name, strings.Join(tablesBefore, " "))
			mark := len(node.Proxy.Output())

			if err := v.break_(ctx, t, before); err != nil {
				t.Fatalf("break the rules: %v", err)
			}
			broken := time.Now()
			after, _ := saveTables(ctx, node)
			if after == before {
				t.Fatalf("the fault changed nothing:\n%s", after)
			}
			var back time.Duration
			err = cluster.Eventually(ctx, 30*time.Second, func() error {
				s, err := saveTables(ctx, node)
				if err != nil {
					return err
				}
				if !slices.Equal(ownLines(s), ownLines(before)) {
					return fmt.Errorf("miniproxy's rules are not back (-before +now):\n%s", cmp.Diff(ownLines(before), ownLines(s)))
				}
				back = time.Since(broken)
				after = s
				return nil
			})
			if err != nil {
				t.Fatalf("%v\n%s", err, node.Proxy.Output()[mark:])
			}
			time.Sleep(2 * time.Second) // the load after the rules are back
			n, lastFail := l.failuresAfter(broken.Add(-time.Second))
			failed, total := l.stop(t)
			var outage time.Duration
			if n > 0 {
				outage = lastFail.Sub(broken)
			}

			warning := canaryWarning.FindString(node.Proxy.Output()[mark:])
			if warning == "" {
				t.Errorf("no warning about the canary after the fault; output since:\n%s", node.Proxy.Output()[mark:])
			}
			if limit := proxy.DefaultCanaryInterval + 3*time.Second; back > limit {
				t.Errorf("the rules were back %s after the fault; want within the canary interval and one sync (%s)", back.Round(10*time.Millisecond), limit)
			}
			if after != before {
				t.Errorf("the node's tables after the rewrite differ from before (-before +after):\n%s", cmp.Diff(before, after))
			}
			tablesAfter, err := nftTables(ctx, node)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(tablesBefore, tablesAfter) {
				t.Errorf("nftables tables before %q, after %q", tablesBefore, tablesAfter)
			}
			if failed != int64(n) {
				t.Errorf("%d requests failed, %d of them after the fault: the others were not this fault's", failed, n)
			}
			record(t, figures{
				drill:  v.row,
				failed: failed,
				total:  total,
				recovery: fmt.Sprintf("rules back (iptables-save of the node equal to before, counters aside) %s after the fault; traffic failed until %s after it (%d requests, each waiting up to its 1 s timeout)",
					back.Round(10*time.Millisecond), outage.Round(10*time.Millisecond), n),
				operatorSaw: fmt.Sprintf("`%s`", strings.TrimSpace(warning)),
			})
		})
	}
}
