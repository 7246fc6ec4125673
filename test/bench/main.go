// Command bench measures miniproxy against upstream kube-proxy in its
// iptables and nftables modes (built from the same k8s.io/kubernetes release
// as the lab's API server) in the namespace lab, and writes
// docs/performance.md and docs/performance.svg. `make bench` runs it, as
// root.
//
// For each size N it loads N ClusterIP Services with 2 endpoints each
// through the real API server (on other nodes, on the measured node, or
// both in turn), then runs each proxy in turn on a fresh node namespace
// (clean tables) against that same state, and measures from outside the
// proxy: how long the API server's state takes to reach the node alone,
// start-up until every Service carries traffic, 20 EndpointSlice changes
// until traffic reaches the new endpoints, resident
// memory and CPU, the latency of a first packet through the Service deepest
// in the proxy's rules, and the size of every iptables-restore input (with a
// logging shim on the proxy's PATH). The generated report says exactly how.
//
// Every process, namespace and rule lives in the lab and is removed at the
// end, also on Ctrl-C. No packet or API call leaves from the root namespace.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

type options struct {
	sizes          []int
	proxies        []string
	placements     []string
	changes        int
	connects       int
	startupTimeout time.Duration
	changeTimeout  time.Duration
	out, svg, json string
	miniproxyBin   string
	miniproxyRev   string
	profileDir     string
}

type pick struct {
	proxy     string
	n         int
	placement string
}

type bench struct {
	opts     options
	bl       *benchLab
	load     *loader
	results  []*RunResult
	deepest  map[pick]service
	baseline map[string]*baselineRef
	machine  machineInfo
	started  time.Time
	loadDur  map[int]time.Duration
	done     bool
	duration time.Duration // of the whole run so far
	logf     func(string, ...any)
}

func main() {
	var o options
	sizes := flag.String("sizes", "100,1000,10000,30000", "numbers of Services (each with 2 endpoints) to measure at, ascending; a first size below 1,000 is the first-packet baseline")
	huge := flag.Bool("huge", false, "also measure at 100,000 Services (writing them takes about an hour more)")
	placements := flag.String("placement", placementOther, "where the endpoints are: "+placementOther+" (spread over other nodes), "+placementLocal+" (all on the measured node), or both, comma-separated (every size is then run with each)")
	proxies := flag.String("proxies", strings.Join(allProxies, ","), "proxies to run at each size, in this order ("+strings.Join(allProxies, ", ")+")")
	flag.IntVar(&o.changes, "changes", 20, "EndpointSlice changes measured per proxy and size (p50 and p99 are reported)")
	flag.IntVar(&o.connects, "connects", 1000, "TCP connections per first-packet measurement, in 5 rounds (the median is reported)")
	flag.DurationVar(&o.startupTimeout, "startup-timeout", 20*time.Minute, "give up on a proxy that has not programmed every Service by then (reported as did not finish)")
	flag.DurationVar(&o.changeTimeout, "change-timeout", 5*time.Minute, "give up on one change after this long")
	flag.StringVar(&o.out, "out", "docs/performance.md", "report to write (rewritten after every run, so an interrupted run leaves what it measured)")
	flag.StringVar(&o.svg, "svg", "docs/performance.svg", "plot to write; the report links it by its base name")
	flag.StringVar(&o.json, "json", "", "also write the raw results as JSON to this file")
	flag.StringVar(&o.miniproxyBin, "miniproxy", "", "run this miniproxy binary instead of building cmd/miniproxy from the working tree")
	flag.StringVar(&o.miniproxyRev, "miniproxy-rev", "", "what the -miniproxy binary was built from (e.g. a commit), for the report")
	flag.StringVar(&o.profileDir, "profile-dir", "", "run both proxies with --profiling and save a heap profile of each, once settled, to this directory (for diagnosis; profiling is noted in the report)")
	render := flag.String("render", "", "do not measure: write the report and plot from the results a run saved with -json")
	flag.Parse()
	for _, f := range strings.Split(*sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 2 || n > maxServices {
			fmt.Fprintf(os.Stderr, "bench: bad size %q (2 to %d)\n", f, maxServices)
			os.Exit(2)
		}
		o.sizes = append(o.sizes, n)
	}
	if *huge {
		o.sizes = append(o.sizes, 100000)
	}
	sort.Ints(o.sizes)
	o.sizes = slices.Compact(o.sizes)
	for _, pl := range strings.Split(*placements, ",") {
		pl = strings.TrimSpace(pl)
		if pl != placementOther && pl != placementLocal || slices.Contains(o.placements, pl) {
			fmt.Fprintf(os.Stderr, "bench: bad placement %q (%s, %s or both)\n", pl, placementOther, placementLocal)
			os.Exit(2)
		}
		o.placements = append(o.placements, pl)
	}
	for _, p := range strings.Split(*proxies, ",") {
		p = strings.TrimSpace(p)
		if !slices.Contains(allProxies, p) {
			fmt.Fprintf(os.Stderr, "bench: unknown proxy %q (one of %s)\n", p, strings.Join(allProxies, ", "))
			os.Exit(2)
		}
		o.proxies = append(o.proxies, p)
	}
	if o.changes < 1 || o.connects < 10 {
		fmt.Fprintln(os.Stderr, "bench: need at least 1 change and 10 connections")
		os.Exit(2)
	}
	if *render != "" {
		if err := renderSaved(*render, o); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: run as root (it builds network namespaces)")
		os.Exit(1)
	}
	// client-go logs through klog; the only thing it says here is that the
	// informers timed in apilist.go were stopped, once per run.
	klog.LogToStderr(false)
	klog.SetOutput(io.Discard)
	// The lab tears itself down on SIGINT/SIGTERM; this context stops the
	// measurements meanwhile.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) error {
	b := &bench{opts: o, deepest: map[pick]service{}, baseline: map[string]*baselineRef{}, started: time.Now(), loadDur: map[int]time.Duration{}}
	b.logf = func(f string, a ...any) {
		fmt.Printf("%s %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(f, a...))
	}
	b.logf("building binaries and bringing up the lab (router, etcd + kube-apiserver)")
	var err error
	if b.bl, err = startLab(ctx, b.logf, o.miniproxyBin); err != nil {
		return err
	}
	defer func() {
		b.logf("tearing the lab down")
		if err := b.bl.lab.Close(); err != nil {
			b.logf("teardown: %v", err)
		}
	}()
	b.machine = collectMachine(ctx, b.bl)
	if o.miniproxyBin != "" {
		b.machine.Commit = fmt.Sprintf("%s (the binary %s)", o.miniproxyRev, o.miniproxyBin)
	}
	b.load = &loader{bl: b.bl, logf: b.logf}
	for _, n := range o.sizes {
		b.logf("=== %d Services x 2 endpoints", n)
		start := time.Now()
		if err := b.load.grow(ctx, n); err != nil {
			return fmt.Errorf("load %d services: %w", n, err)
		}
		b.loadDur[n] = time.Since(start)
		for _, pl := range b.placementOrder() {
			if err := b.load.place(ctx, pl); err != nil {
				return fmt.Errorf("place endpoints (%s) at %d services: %w", pl, n, err)
			}
			for _, p := range o.proxies {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r := b.run(ctx, p, n, pl)
				if ctx.Err() != nil {
					return ctx.Err()
				}
				b.results = append(b.results, r)
				if err := b.write(); err != nil {
					return err
				}
			}
		}
	}
	b.done = true
	if err := b.write(); err != nil {
		return err
	}
	b.logf("wrote %s and %s in %s", o.out, o.svg, time.Since(b.started).Round(time.Second))
	return nil
}

// placementOrder is the order of the placements at the next size: the one
// the slices have now first, so that a size rewrites them at most once.
func (b *bench) placementOrder() []string {
	cur := b.load.placement()
	out := []string{}
	if slices.Contains(b.opts.placements, cur) {
		out = append(out, cur)
	}
	for _, pl := range b.opts.placements {
		if pl != cur {
			out = append(out, pl)
		}
	}
	return out
}

// saved is what -json writes and -render reads.
type saved struct {
	Machine machineInfo  `json:"machine"`
	Run     runInfo      `json:"run"`
	Results []*RunResult `json:"results"`
}

type runInfo struct {
	Started         time.Time       `json:"started"`
	DurationS       float64         `json:"duration_s"`
	Done            bool            `json:"done"`
	Sizes           []int           `json:"sizes"`
	Proxies         []string        `json:"proxies"`
	Placements      []string        `json:"placements,omitempty"`
	Changes         int             `json:"changes"`
	Connects        int             `json:"connects"`
	StartupTimeoutS float64         `json:"startup_timeout_s"`
	LoadS           map[int]float64 `json:"load_s"`
}

// write renders the report and plot from the results so far.
func (b *bench) write() error {
	b.duration = time.Since(b.started)
	if err := os.WriteFile(b.opts.svg, []byte(plotSVG(b.results, b.opts.sizes, b.opts.placements[0])), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(b.opts.out, []byte(b.report()), 0o644); err != nil {
		return err
	}
	if b.opts.json == "" {
		return nil
	}
	ri := runInfo{Started: b.started, DurationS: b.duration.Seconds(), Done: b.done, Sizes: b.opts.sizes,
		Proxies: b.opts.proxies, Placements: b.opts.placements, Changes: b.opts.changes, Connects: b.opts.connects,
		StartupTimeoutS: b.opts.startupTimeout.Seconds(), LoadS: map[int]float64{}}
	for n, d := range b.loadDur {
		ri.LoadS[n] = d.Seconds()
	}
	j, err := json.MarshalIndent(saved{b.machine, ri, b.results}, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(b.opts.json, j, 0o644)
}

// renderSaved writes the report and plot of a saved run again, with this
// program's rendering (for changes to the report's wording).
func renderSaved(path string, o options) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var sv saved
	if err := json.Unmarshal(raw, &sv); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if len(sv.Run.Sizes) == 0 {
		return fmt.Errorf("%s: no run information", path)
	}
	o.sizes, o.proxies, o.changes, o.connects = sv.Run.Sizes, sv.Run.Proxies, sv.Run.Changes, sv.Run.Connects
	o.placements = sv.Run.Placements
	if len(o.placements) == 0 {
		o.placements = []string{placementOther} // saved before placements existed
	}
	o.startupTimeout = time.Duration(sv.Run.StartupTimeoutS * float64(time.Second))
	b := &bench{opts: o, machine: sv.Machine, results: sv.Results, started: sv.Run.Started, done: sv.Run.Done,
		duration: time.Duration(sv.Run.DurationS * float64(time.Second)), loadDur: map[int]time.Duration{}}
	for n, s := range sv.Run.LoadS {
		b.loadDur[n] = time.Duration(s * float64(time.Second))
	}
	if err := os.WriteFile(o.svg, []byte(plotSVG(b.results, o.sizes, o.placements[0])), 0o644); err != nil {
		return err
	}
	return os.WriteFile(o.out, []byte(b.report()), 0o644)
}
