package main

import (
	"strings"
	"testing"
	"time"
)

// fakeRun is a complete run whose one change took ms milliseconds.
func fakeRun(proxy string, n int, startup float64, ms ...float64) *RunResult {
	r := &RunResult{Proxy: proxy, N: n, StartupS: startup, RSSMB: 50, HWMMB: 60, CPUStartupS: 1,
		FirstPacket: Latency{N: 1000, Median: 30, P10: 20, P90: 40, Depth: 12, Target: "svc-00001"},
		FirstSync:   RestoreSize{Count: 1, Lines: 100, Bytes: 1000}}
	for _, x := range ms {
		r.Changes = append(r.Changes, ChangeResult{LatencyMS: x, CPUS: 0.01, Restore: RestoreSize{Lines: 10, Bytes: 100}})
	}
	return r
}

func fakeBench(results ...*RunResult) *bench {
	return &bench{
		opts:    options{sizes: []int{100, 1000}, proxies: allProxies, placements: []string{placementOther}, changes: 20, connects: 1000, startupTimeout: 20 * time.Minute, svg: "/tmp/x/performance.svg"},
		machine: machineInfo{CPUs: 2, OS: "Debian GNU/Linux 12 (bookworm)", Kernel: "6.1.0", Iptables: "iptables v1.8.9 (nf_tables)", NFT: "nftables v1.0.6"},
		results: results, started: time.Date(2026, 1, 2, 3, 4, 0, 0, time.UTC), done: true,
	}
}

// rowOf returns the report's table row starting with name, in the section
// for n Services.
func rowOf(t *testing.T, report string, n, name string) []string {
	t.Helper()
	_, sec, ok := strings.Cut(report, "### "+n+" Services")
	if !ok {
		t.Fatalf("no section for %s Services in\n%s", n, report)
	}
	sec, _, _ = strings.Cut(sec, "\n\n## ")
	for _, l := range strings.Split(sec, "\n") {
		if strings.HasPrefix(l, "| "+name) {
			cells := strings.Split(strings.Trim(l, "|"), "|")
			for i := range cells {
				cells[i] = strings.TrimSpace(cells[i])
			}
			return cells
		}
	}
	t.Fatalf("no row %q for %s Services in\n%s", name, n, sec)
	return nil
}

func TestReportShowsATimedOutAndAMissingUpstreamMode(t *testing.T) {
	dnf := &RunResult{Proxy: kubeProxy, N: 1000, StartupS: 1200, StartupDNF: true, RestoreRunning: true, RSSMB: 286, HWMMB: 404, CPUStartupS: 1198}
	b := fakeBench(
		fakeRun(kubeProxy, 100, 0.5, 40, 60), fakeRun(kubeProxyNFT, 100, 0.4, 30, 50), fakeRun(miniproxy, 100, 0.2, 10, 20),
		dnf, fakeRun(miniproxy, 1000, 0.3, 20, 30, 40),
		// kube-proxy nftables did not run at 1,000 (an interrupted run).
	)
	rep := b.report()

	head := rowOf(t, rep, "1,000", "|")
	want := []string{"", "kube-proxy iptables", "kube-proxy nftables", "miniproxy", "miniproxy / iptables", "miniproxy / nftables"}
	if strings.Join(head, ",") != strings.Join(want, ",") {
		t.Errorf("header = %q, want %q", head, want)
	}
	start := rowOf(t, rep, "1,000", "start-up")
	if start[1] != "≥ 1200 s (did not finish)" || start[2] != "not run" || start[3] != "0.30 s" || start[4] != "< 0.0003×" || start[5] != "-" {
		t.Errorf("start-up row = %q", start)
	}
	change := rowOf(t, rep, "1,000", "one EndpointSlice change")
	if change[1] != "-" || change[2] != "not run" || change[3] != "30 ms (40 ms; 3 of 3)" {
		t.Errorf("change row = %q", change)
	}
	change100 := rowOf(t, rep, "100", "one EndpointSlice change")
	if change100[2] != "30 ms (50 ms; 2 of 2)" || change100[4] != "0.25×" || change100[5] != "0.33×" {
		t.Errorf("change row at 100 = %q", change100)
	}
	if !strings.Contains(rep, "| 1,000 (other nodes) | kube-proxy iptables | did not finish after 1200 s | | | 0 restores finished, one still running |") {
		t.Errorf("details do not report the time-out:\n%s", rep)
	}
	for _, s := range []string{"Linux 6.1.0", "iptables v1.8.9 (nf_tables)", "nftables v1.0.6", "**nf_tables** backend"} {
		if !strings.Contains(rep, s) {
			t.Errorf("report does not say %q", s)
		}
	}
	svg := plotSVG(b.results, b.opts.sizes, placementOther)
	if !strings.Contains(svg, "did not finish") || !strings.Contains(svg, "kube-proxy iptables start-up") {
		t.Errorf("plot does not show the time-out:\n%s", svg)
	}
}

func TestReportNamesThePlacementOfEveryTable(t *testing.T) {
	local := fakeRun(miniproxy, 1000, 0.4, 25)
	local.Placement = placementLocal
	b := fakeBench(fakeRun(miniproxy, 1000, 0.3, 20), local)
	b.opts.placements = []string{placementOther, placementLocal}
	rep := b.report()
	if rowOf(t, rep, "1,000", "start-up")[3] != "0.30 s" {
		t.Errorf("the first table is not the spread placement's")
	}
	for _, s := range []string{
		"### 1,000 Services x 2 endpoints, endpoints spread over 97 other nodes",
		"### 1,000 Services x 2 endpoints, all endpoints on the measured node",
		"| 1,000 (other nodes) | miniproxy |", "| 1,000 (this node) | miniproxy |",
		"against kube-proxy's iptables mode, with endpoints spread over 97 other nodes",
	} {
		if !strings.Contains(rep, s) {
			t.Errorf("report does not say %q:\n%s", s, rep)
		}
	}
	_, local1000, _ := strings.Cut(rep, "all endpoints on the measured node\n")
	if !strings.Contains(local1000, "| start-up: process start until every Service answers | not run | not run | 0.40 s |") {
		t.Errorf("the local table does not hold the local run:\n%s", local1000)
	}
}

func TestIssue17TargetsPerPlacement(t *testing.T) {
	at := func(r *RunResult, pl string) *RunResult { r.Placement = pl; return r }
	huge := fakeRun(miniproxy, 100000, 9.5, 40, 120)
	huge.RSSMB = 280
	mp10 := fakeRun(miniproxy, 10000, 1.0, 50, 60)
	mp10.RSSMB = 40
	b := fakeBench(
		fakeRun(kubeProxy, 10000, 48, 900), fakeRun(kubeProxyNFT, 10000, 18, 550), mp10, huge,
		// local: iptables mode timed out.
		at(&RunResult{Proxy: kubeProxy, N: 10000, StartupS: 1200, StartupDNF: true}, placementLocal),
		at(fakeRun(kubeProxyNFT, 10000, 100, 550), placementLocal),
		at(fakeRun(miniproxy, 10000, 2.0, 50), placementLocal),
	)
	b.opts.sizes = []int{10000, 100000}
	b.opts.placements = []string{placementOther, placementLocal}
	rep := b.report()
	_, sec, _ := strings.Cut(rep, "## Targets of issue 17\n")
	sec, _, _ = strings.Cut(sec, "\n\n![")
	for _, want := range []string{
		"| start-up at 100,000 | ≤ 10 s | 9.50 s: **yes** | not measured |",
		"| one change at 100,000, p99 of the changes | ≤ 100 ms | 120 ms (2 of 2): **no** | not measured |",
		"| memory after the first sync at 100,000 | ≤ 300 MiB | 280 MiB: **yes** | not measured |",
		"| start-up at 10,000 | ≤ 0.05× both upstream modes (20× faster) | 1.00 s (0.021× iptables, 0.056× nftables): **no** | 2.00 s (< 0.0017× iptables, 0.020× nftables): **yes** |",
		"| one change at 10,000, p50 | faster than both upstream modes (< 1×) | 50 ms (0.056× iptables, 0.091× nftables): **yes** | kube-proxy iptables did not finish |",
		"| memory after the first sync at 10,000 | ≤ 0.4× the lighter upstream mode | 40 MiB (0.80× iptables, 0.80× nftables): **no** |",
	} {
		if !strings.Contains(sec, want) {
			t.Errorf("issue 17's targets lack %q:\n%s", want, sec)
		}
	}
}
