// Command bench measures miniproxy against upstream kube-proxy (iptables
// mode, built from the same k8s.io/kubernetes release as the lab's API
// server) in the namespace lab, and writes docs/performance.md and
// docs/performance.svg. `make bench` runs it, as root.
//
// For each size N it loads N ClusterIP Services with 2 endpoints each
// through the real API server, then runs each proxy in turn on a fresh node
// namespace (clean tables) against that same state, and measures from
// outside the proxy: start-up until every Service carries traffic, one
// EndpointSlice change until traffic reaches the new endpoints, resident
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
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type options struct {
	sizes          []int
	proxies        []string
	changes        int
	connects       int
	startupTimeout time.Duration
	changeTimeout  time.Duration
	out, svg, json string
	miniproxyBin   string
	miniproxyRev   string
}

type pick struct {
	proxy string
	n     int
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
	logf     func(string, ...any)
}

func main() {
	var o options
	sizes := flag.String("sizes", "100,1000,10000,30000", "numbers of Services (each with 2 endpoints) to measure at, ascending; 100 is the first-packet baseline")
	proxies := flag.String("proxies", kubeProxy+","+miniproxy, "proxies to run at each size, in this order")
	flag.IntVar(&o.changes, "changes", 5, "EndpointSlice changes measured per proxy and size (the median is reported)")
	flag.IntVar(&o.connects, "connects", 1000, "TCP connections per first-packet measurement, in 5 rounds (the median is reported)")
	flag.DurationVar(&o.startupTimeout, "startup-timeout", 20*time.Minute, "give up on a proxy that has not programmed every Service by then (reported as did not finish)")
	flag.DurationVar(&o.changeTimeout, "change-timeout", 5*time.Minute, "give up on one change after this long")
	flag.StringVar(&o.out, "out", "docs/performance.md", "report to write (rewritten after every run, so an interrupted run leaves what it measured)")
	flag.StringVar(&o.svg, "svg", "docs/performance.svg", "plot to write; the report links it by its base name")
	flag.StringVar(&o.json, "json", "", "also write the raw results as JSON to this file")
	flag.StringVar(&o.miniproxyBin, "miniproxy", "", "run this miniproxy binary instead of building cmd/miniproxy from the working tree")
	flag.StringVar(&o.miniproxyRev, "miniproxy-rev", "", "what the -miniproxy binary was built from (e.g. a commit), for the report")
	flag.Parse()
	for _, f := range strings.Split(*sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 2 || n > 60000 {
			fmt.Fprintf(os.Stderr, "bench: bad size %q (2 to 60000)\n", f)
			os.Exit(2)
		}
		o.sizes = append(o.sizes, n)
	}
	sort.Ints(o.sizes)
	for _, p := range strings.Split(*proxies, ",") {
		p = strings.TrimSpace(p)
		if p != kubeProxy && p != miniproxy {
			fmt.Fprintf(os.Stderr, "bench: unknown proxy %q (%s or %s)\n", p, kubeProxy, miniproxy)
			os.Exit(2)
		}
		o.proxies = append(o.proxies, p)
	}
	if o.changes < 1 || o.connects < 10 {
		fmt.Fprintln(os.Stderr, "bench: need at least 1 change and 10 connections")
		os.Exit(2)
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: run as root (it builds network namespaces)")
		os.Exit(1)
	}
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
		b.machine.Commit = fmt.Sprintf("%s (binary %s)", o.miniproxyRev, o.miniproxyBin)
	}
	b.load = &loader{bl: b.bl, logf: b.logf}
	for _, n := range o.sizes {
		b.logf("=== %d Services x 2 endpoints", n)
		start := time.Now()
		if err := b.load.grow(ctx, n); err != nil {
			return fmt.Errorf("load %d services: %w", n, err)
		}
		b.loadDur[n] = time.Since(start)
		for _, p := range o.proxies {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			r := b.run(ctx, p, n)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			b.results = append(b.results, r)
			if err := b.write(); err != nil {
				return err
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

// write renders the report and plot from the results so far.
func (b *bench) write() error {
	if err := os.WriteFile(b.opts.svg, []byte(plotSVG(b.results, b.opts.sizes)), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(b.opts.out, []byte(b.report()), 0o644); err != nil {
		return err
	}
	if b.opts.json != "" {
		j, err := json.MarshalIndent(struct {
			Machine machineInfo  `json:"machine"`
			Results []*RunResult `json:"results"`
		}{b.machine, b.results}, "", "  ")
		if err != nil {
			return err
		}
		return os.WriteFile(b.opts.json, j, 0o644)
	}
	return nil
}
