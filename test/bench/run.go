package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/miniproxy/miniproxy/test/netns"
)

// The proxies the benchmark runs. kube-proxy without a suffix is its
// iptables mode (the name the saved results of earlier runs use);
// kube-proxy-nftables is the same binary with --proxy-mode nftables.
const (
	kubeProxy    = "kube-proxy"
	kubeProxyNFT = "kube-proxy-nftables"
	miniproxy    = "miniproxy"
)

// allProxies is every proxy the benchmark knows, in the order of the
// report's columns.
var allProxies = []string{kubeProxy, kubeProxyNFT, miniproxy}

// upstreamModes are the proxies miniproxy is compared with.
var upstreamModes = []string{kubeProxy, kubeProxyNFT}

// proxyLabel is a proxy's name in the report.
func proxyLabel(kind string) string {
	switch kind {
	case kubeProxy:
		return "kube-proxy iptables"
	case kubeProxyNFT:
		return "kube-proxy nftables"
	}
	return kind
}

// RunResult is what one proxy measured at one size.
type RunResult struct {
	Proxy string `json:"proxy"`
	N     int    `json:"n"`
	// Placement is where the endpoints were (placementOther when empty:
	// saved before there was a choice).
	Placement string `json:"placement,omitempty"`
	Err       string `json:"error,omitempty"`

	StartupS   float64 `json:"startup_s"`
	StartupDNF bool    `json:"startup_dnf,omitempty"`
	// RestoreRunning says, for a start-up that did not finish, that its
	// first iptables-restore was still running when it was stopped.
	RestoreRunning bool    `json:"restore_running_at_timeout,omitempty"`
	SampleFirst    int     `json:"sample_ok_first_try"`
	SampleTotal    int     `json:"sample_total"`
	SettleS        float64 `json:"settle_s"` // from programmed to idle

	EndpointsInRules  int `json:"endpoints_in_rules"`
	EndpointsExpected int `json:"endpoints_expected"`
	NATRules          int `json:"nat_rules"`
	NATChains         int `json:"nat_chains"`
	MeanDepth         float64

	RSSMB            float64 `json:"rss_mb"`
	HWMMB            float64 `json:"hwm_mb"`
	CPUStartupS      float64 `json:"cpu_startup_s"`
	CPUStartupChildS float64 `json:"cpu_startup_children_s"`

	GoHeap GoHeap `json:"go_heap"`

	FirstSync          RestoreSize `json:"first_sync_restore"`
	MetricRestoreBytes float64     `json:"metric_restore_bytes,omitempty"`
	MetricRulesWritten float64     `json:"metric_rules_written,omitempty"`

	OutsideStartup float64 `json:"outside_load_startup"`
	// APIList is the API server's initial state reaching the node,
	// timed on the fresh node just before the proxy started.
	APIList APIList `json:"api_list"`

	NoProxy     Latency `json:"connect_no_proxy"`
	Direct      Latency `json:"connect_direct_with_rules"`
	FirstPacket Latency `json:"first_packet"`
	Baseline    Latency `json:"first_packet_baseline_interleaved"`
	OtherTarget Latency `json:"first_packet_other_target"`

	Changes []ChangeResult `json:"changes"`
}

func (r *RunResult) placement() string {
	if r.Placement == "" {
		return placementOther
	}
	return r.Placement
}

// GoHeap is the Go runtime's view of a proxy's memory once settled, from
// its own go_memstats_* metrics (both proxies export them), in MiB.
type GoHeap struct {
	AllocMB    float64 `json:"heap_alloc_mib"`    // reachable plus not yet collected
	InuseMB    float64 `json:"heap_inuse_mib"`    // spans in use
	IdleMB     float64 `json:"heap_idle_mib"`     // spans free
	ReleasedMB float64 `json:"heap_released_mib"` // of which returned to the OS
	NextGCMB   float64 `json:"next_gc_mib"`       // heap goal: about twice the live heap after the last GC
	SysMB      float64 `json:"sys_mib"`           // everything obtained from the OS
}

// ChangeResult is one EndpointSlice change.
type ChangeResult struct {
	Service   string      `json:"service"`
	LatencyMS float64     `json:"latency_ms"`
	Polls     int         `json:"polls"`
	CPUS      float64     `json:"cpu_s"`
	Restore   RestoreSize `json:"restore"`
	Outside   float64     `json:"outside_load"`
	Err       string      `json:"error,omitempty"`
}

// run starts one proxy on a fresh node against the current API state of n
// Services and measures everything.
func (b *bench) run(ctx context.Context, kind string, n int, placement string) *RunResult {
	r := &RunResult{Proxy: kind, N: n, Placement: placement}
	if err := b.runInto(ctx, kind, n, r); err != nil {
		r.Err = err.Error()
		b.logf("  %s at %d: %v", kind, n, err)
	}
	return r
}

func (b *bench) runInto(ctx context.Context, kind string, n int, r *RunResult) error {
	if err := b.load.reset(ctx); err != nil {
		return err
	}
	nd, err := b.bl.newNode(ctx)
	if err != nil {
		return err
	}
	keep := false
	defer func() {
		if !keep {
			nd.retire(context.Background())
		}
	}()

	// Reference: a connection straight to an endpoint, before any rule.
	ep0 := netip.AddrPortFrom(endpointIP(sinks[0].block, 0), endpointPort)
	if l, err := b.measureConnects(ctx, probe{nd, ep0}); err == nil {
		r.NoProxy = l[0]
	} else {
		return fmt.Errorf("the node does not reach its pods: %w", err)
	}
	// The part of start-up that is the API server's: its initial state
	// through informers, from this node, on a calm machine.
	waitQuiet(ctx, 2*time.Minute)
	r.APIList = timeAPIList(ctx, b.bl.cp, nd.ns)
	b.logf("  API list from %s: %d Services, %d slices in %.2fs %s", nd.short, r.APIList.Services, r.APIList.Slices, r.APIList.Seconds, r.APIList.Error)
	runtime.GC()
	// Start on a calm machine, and note how calm it stayed.
	waitQuiet(ctx, 2*time.Minute)

	// One log per run: a run reads every record in it.
	logPath := filepath.Join(b.bl.tmp, fmt.Sprintf("restores-%s-%d-%s.jsonl", kind, n, r.placement()))
	cmd, err := b.proxyCmd(kind, logPath)
	if err != nil {
		return err
	}
	b.logf("  %s: starting on %s (%s)", kind, nd.ns.Name(), nd.ip)
	t0 := time.Now()
	proc, err := nd.ns.StartCmd(cmd)
	if err != nil {
		return err
	}
	defer proc.Stop()
	pid := proc.Pid()
	meter := b.newLoadMeter()

	// Start-up: the last-created Service answers through its ClusterIP...
	last := b.load.svcs[n-1]
	tProg, err := waitServing(ctx, nd.client, proc, netip.AddrPortFrom(last.clusterIP, servicePort), t0, b.opts.startupTimeout)
	if err != nil {
		if errors.Is(err, errStartupTimeout) {
			r.StartupDNF = true
			r.StartupS = time.Since(t0).Seconds()
			r.OutsideStartup = meter.outside()
			if ps, err := sampleProc(pid); err == nil {
				r.RSSMB, r.HWMMB = float64(ps.rssKB)/1024, float64(ps.hwmKB)/1024
				r.CPUStartupS, r.CPUStartupChildS = ps.cpu().Seconds(), ps.children.Seconds()
			}
			recs := readRestores(logPath)
			r.FirstSync = sumRestores(recs, func(restoreRecord) bool { return true })
			r.RestoreRunning = restoreRunning(pid)
			b.logf("  %s: not programmed after %s; giving up (restores finished: %d, one running: %v)", kind,
				time.Since(t0).Round(time.Second), len(recs), r.RestoreRunning)
			return nil
		}
		return fmt.Errorf("%w\n%s", err, tailOf(proc.Output(), 3000))
	}
	// ... and so do a sample of the others.
	sample := sampleServices(b.load.svcs[:n], 20)
	okFirst, tAll, err := checkSample(ctx, nd.client, sample)
	r.SampleFirst, r.SampleTotal = okFirst, len(sample)
	if err != nil {
		return err
	}
	if okFirst < len(sample) {
		tProg = tAll
	}
	r.StartupS = tProg.Sub(t0).Seconds()
	r.OutsideStartup = meter.outside()
	b.logf("  %s: every Service programmed after %.2fs (sample %d/%d at once; outside load %.0f%%)", kind, r.StartupS, okFirst, len(sample), 100*r.OutsideStartup)

	// Settled: the process has used (almost) no CPU for a second.
	tIdle := settle(ctx, pid, 3*time.Minute)
	r.SettleS = tIdle.Sub(tProg).Seconds()
	ps, err := sampleProc(pid)
	if err != nil {
		return err
	}
	r.RSSMB, r.HWMMB = float64(ps.rssKB)/1024, float64(ps.hwmKB)/1024
	r.CPUStartupS, r.CPUStartupChildS = ps.cpu().Seconds(), ps.children.Seconds()
	r.FirstSync = sumRestores(readRestores(logPath), func(x restoreRecord) bool { return x.start().Before(tProg) })
	if m, err := scrapeMetrics(ctx, nd.ns); err == nil {
		mb := func(name string) float64 {
			v, _ := metric(m, name)
			return v / (1 << 20)
		}
		r.GoHeap = GoHeap{
			AllocMB:    mb("go_memstats_heap_alloc_bytes"),
			InuseMB:    mb("go_memstats_heap_inuse_bytes"),
			IdleMB:     mb("go_memstats_heap_idle_bytes"),
			ReleasedMB: mb("go_memstats_heap_released_bytes"),
			NextGCMB:   mb("go_memstats_next_gc_bytes"),
			SysMB:      mb("go_memstats_sys_bytes"),
		}
		if v, ok := metric(m, "miniproxy_sync_restore_bytes"); ok {
			r.MetricRestoreBytes = v
		}
		if v, ok := metric(m, "miniproxy_sync_rules_written"); ok {
			r.MetricRulesWritten = v
		}
	}
	if b.opts.profileDir != "" {
		b.saveHeapProfile(ctx, nd, kind, n)
	}
	b.logf("  %s: settled %.1fs later: RSS %.0f MB, CPU %.2fs; first sync restore %d lines, %d bytes", kind,
		r.SettleS, r.RSSMB, r.CPUStartupS, r.FirstSync.Lines, r.FirstSync.Bytes)

	// The rules as saved: every endpoint there, and the first packet.
	r.EndpointsExpected = 2 * n
	var nat *natTable
	var dnats map[string]bool
	if kind == kubeProxyNFT {
		t, err := saveNFT(ctx, nd.ns)
		if err != nil {
			return err
		}
		r.NATRules, r.NATChains, dnats = t.rules, t.chains, t.dnats
	} else {
		if nat, err = saveNAT(ctx, nd.ns); err != nil {
			return err
		}
		r.NATRules, r.NATChains, dnats = nat.rules, len(nat.chains), nat.dnats
	}
	for i := range n {
		for _, blk := range []byte{sinks[0].block, sinks[1].block} {
			if dnats[fmt.Sprintf("%s:%d", endpointIP(blk, i), endpointPort)] {
				r.EndpointsInRules++
			}
		}
	}
	if err := b.firstPacket(ctx, nd, kind, n, nat, r); err != nil {
		return err
	}

	// One change at a time, on Services spread over the list.
	for k := range b.opts.changes {
		idx := (k*n)/b.opts.changes + n/(2*b.opts.changes)
		if idx == n-1 {
			idx--
		}
		c := b.change(ctx, nd, pid, logPath, idx)
		r.Changes = append(r.Changes, c)
		if c.Err != "" {
			b.logf("  %s: change %d on %s: %s", kind, k+1, c.Service, c.Err)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			continue
		}
		b.logf("  %s: change %d on %s: traffic moved after %.0f ms (%d polls), CPU %.3fs, restore %d lines / %d bytes",
			kind, k+1, c.Service, c.LatencyMS, c.Polls, c.CPUS, c.Restore.Lines, c.Restore.Bytes)
	}
	select {
	case <-proc.Done():
		return fmt.Errorf("%s exited during the run: %v\n%s", kind, proc.Err(), tailOf(proc.Output(), 3000))
	default:
	}
	// The smallest size's node is the first-packet baseline: its rules
	// stay when the proxy stops (neither proxy removes them on exit), and
	// its pods keep answering, so larger sizes can measure it again,
	// interleaved with their own first packets.
	if n == b.opts.sizes[0] && n < 1000 && r.FirstPacket.N > 0 && b.baseline[kind] == nil {
		proc.Stop()
		keep = true
		b.baseline[kind] = &baselineRef{nd: nd, target: b.deepest[pick{kind, n, r.placement()}], depth: r.FirstPacket.Depth, n: n}
	}
	return nil
}

// baselineRef is a kept node with the smallest size's rules.
type baselineRef struct {
	nd     *node
	target service
	depth  int
	n      int
}

// proxyCmd is the command line of each proxy. Both get the same
// environment, whose PATH starts with the restore shim.
func (b *bench) proxyCmd(kind, logPath string) (*exec.Cmd, error) {
	shimDir := filepath.Join(b.bl.tmp, "shim")
	if err := os.MkdirAll(shimDir, 0o755); err != nil {
		return nil, err
	}
	for _, name := range []string{"iptables-restore", "ip6tables-restore", "nft"} {
		link := filepath.Join(shimDir, name)
		if _, err := os.Lstat(link); err != nil {
			if err := os.Symlink(b.bl.bins.shim, link); err != nil {
				return nil, err
			}
		}
	}
	kc := b.bl.cp.ProxyKubeconfig()
	var cmd *exec.Cmd
	switch kind {
	case miniproxy:
		cmd = exec.Command(b.bl.bins.miniproxy, miniproxyArgs(kc)...)
	case kubeProxy:
		cmd = exec.Command(b.bl.bins.kubeProxy, kubeProxyArgs("iptables", kc)...)
	case kubeProxyNFT:
		cmd = exec.Command(b.bl.bins.kubeProxy, kubeProxyArgs("nftables", kc)...)
	default:
		return nil, fmt.Errorf("unknown proxy %q", kind)
	}
	if b.opts.profileDir != "" {
		cmd.Args = append(cmd.Args, "--profiling=true")
	}
	env := []string{"PATH=" + shimDir + ":" + os.Getenv("PATH"), "BENCH_REAL_DIR=" + b.bl.bins.realRestoreDir, "BENCH_RESTORE_LOG=" + logPath}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch lk := strings.ToLower(k); {
		case lk == "path", strings.HasSuffix(lk, "_proxy"), k == "KUBECONFIG", strings.HasPrefix(k, "BENCH_"):
		default:
			env = append(env, kv)
		}
	}
	cmd.Env = env
	return cmd, nil
}

func miniproxyArgs(kubeconfig string) []string {
	return append([]string{
		"--kubeconfig", kubeconfig,
		"--hostname-override", nodeName,
		"--cluster-cidr", clusterCIDR.String(),
	}, netns.LeaveConntrackAlone...)
}

func kubeProxyArgs(mode, kubeconfig string) []string {
	return append([]string{
		"--proxy-mode=" + mode,
		"--kubeconfig=" + kubeconfig,
		"--hostname-override=" + nodeName,
		"--cluster-cidr=" + clusterCIDR.String(),
		"--metrics-bind-address=127.0.0.1:10249",
		"--healthz-bind-address=0.0.0.0:10256",
		"--v=2",
	}, netns.LeaveConntrackAlone...)
}

var errStartupTimeout = errors.New("start-up timed out")

// waitServing returns when a TCP connection through dst succeeds from ns:
// the send time of the earliest connection that got through. A new attempt
// starts every 10 ms at first and every 0.5% of the elapsed time later (at
// most every 200 ms), each with a 300 ms timeout. An attempt sent before
// the rule was in fails even if the rule comes during it (its conntrack
// entry was made without NAT), so a success proves the rule was in when it
// was sent.
func waitServing(ctx context.Context, ns *netns.Namespace, proc *netns.Process, dst netip.AddrPort, t0 time.Time, timeout time.Duration) (time.Time, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	hits := make(chan time.Time, 256)
	deadline := t0.Add(timeout)
	for {
		now := time.Now()
		go func(sent time.Time) {
			if dialOnce(ctx, ns, dst, 300*time.Millisecond) == nil {
				select {
				case hits <- sent:
				default:
				}
			}
		}(now)
		interval := min(max(now.Sub(t0)/200, 10*time.Millisecond), 200*time.Millisecond)
		select {
		case first := <-hits:
			return earliest(first, hits, 100*time.Millisecond), nil
		case <-proc.Done():
			return time.Time{}, fmt.Errorf("the proxy exited before programming its rules: %v", proc.Err())
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(interval):
		}
		if time.Now().After(deadline) {
			return time.Time{}, errStartupTimeout
		}
	}
}

// earliest collects further send times for a moment and returns the
// earliest one.
func earliest(first time.Time, more <-chan time.Time, wait time.Duration) time.Time {
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		select {
		case t := <-more:
			if t.Before(first) {
				first = t
			}
		case <-timer.C:
			return first
		}
	}
}

// sampleServices picks k Services spread evenly, the first one included.
func sampleServices(svcs []service, k int) []service {
	if len(svcs) <= k {
		return svcs
	}
	var out []service
	for j := range k {
		out = append(out, svcs[j*len(svcs)/k])
	}
	return out
}

// checkSample connects through each sampled Service; it returns how many
// answered at the first try and, once all have answered, the start of the
// round in which the last one did.
func checkSample(ctx context.Context, ns *netns.Namespace, sample []service) (int, time.Time, error) {
	pending := sample
	first := -1
	deadline := time.Now().Add(2 * time.Minute)
	for {
		round := time.Now()
		var still []service
		for _, s := range pending {
			if dialOnce(ctx, ns, netip.AddrPortFrom(s.clusterIP, servicePort), time.Second) != nil {
				still = append(still, s)
			}
		}
		if first < 0 {
			first = len(sample) - len(still)
		}
		if len(still) == 0 {
			return first, round, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return first, time.Time{}, fmt.Errorf("%d sampled Services still do not answer (e.g. %s %s)", len(still), still[0].name, still[0].clusterIP)
		}
		pending = still
		time.Sleep(100 * time.Millisecond)
	}
}

// settle waits until the process has used at most 20 ms of CPU in a
// second (rules synced, nothing left to do), and returns when it was.
func settle(ctx context.Context, pid int, timeout time.Duration) time.Time {
	deadline := time.Now().Add(timeout)
	prev, err := sampleProc(pid)
	if err != nil {
		return time.Now()
	}
	for {
		select {
		case <-ctx.Done():
			return time.Now()
		case <-time.After(time.Second):
		}
		cur, err := sampleProc(pid)
		if err != nil || cur.cpu()-prev.cpu() <= 20*time.Millisecond || time.Now().After(deadline) {
			return time.Now()
		}
		prev = cur
	}
}

func saveNAT(ctx context.Context, ns *netns.Namespace) (*natTable, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	out, _, err := ns.Run(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		return nil, err
	}
	return parseNAT(out), nil
}

// deepest returns the Service whose first packet walks the most nat rules,
// and the mean walk over all Services.
func deepest(nat *natTable, svcs []service) (service, int, float64) {
	var best service
	bestDepth := -1
	total := 0
	for _, s := range svcs {
		d, ok := nat.depth(clientPodIP, s.clusterIP, servicePort)
		if !ok {
			continue
		}
		total += d
		if d > bestDepth {
			best, bestDepth = s, d
		}
	}
	return best, bestDepth, float64(total) / float64(max(len(svcs), 1))
}

// firstPacket measures TCP connect latency from the client pod through the
// ClusterIP of the Service that is deepest in this proxy's nat rules (for
// kube-proxy: the last one of its KUBE-SERVICES list, whose order is
// random and redrawn at every sync, so the pick is checked again after
// measuring and the measurement repeated if a sync moved it), then through
// the other proxies' picks at the same size when there are any, then to an
// endpoint directly (no Service, but with the rules loaded). For upstream's
// nftables mode (nat nil) no Service is deeper than another: each is one
// lookup in a verdict map, so the last-written Service is measured.
func (b *bench) firstPacket(ctx context.Context, nd *node, kind string, n int, nat *natTable, r *RunResult) error {
	svcs := b.load.svcs[:n]
	for attempt := 1; ; attempt++ {
		target, depth, mean := svcs[n-1], 0, 0.0
		if nat != nil {
			target, depth, mean = deepest(nat, svcs)
			if depth < 0 {
				return errors.New("no Service reaches a DNAT in the saved rules")
			}
		}
		r.MeanDepth = mean
		probes := []probe{{nd, netip.AddrPortFrom(target.clusterIP, servicePort)}}
		base := b.baseline[kind]
		if base != nil && base.n < n {
			probes = append(probes, probe{base.nd, netip.AddrPortFrom(base.target.clusterIP, servicePort)})
		}
		lats, err := b.measureConnects(ctx, probes...)
		if err != nil {
			return fmt.Errorf("first packet via %s: %w", target.name, err)
		}
		fp := lats[0]
		if len(lats) > 1 {
			r.Baseline = lats[1]
			r.Baseline.Target, r.Baseline.Depth, r.Baseline.Map = fmt.Sprintf("%s on the %d-Service node", base.target.name, base.n), base.depth, nat == nil
		}
		d2 := depth
		if nat != nil {
			after, err := saveNAT(ctx, nd.ns)
			if err != nil {
				return err
			}
			d2, _ = after.depth(clientPodIP, target.clusterIP, servicePort)
			if d2*100 < depth*95 && attempt < 3 {
				b.logf("  %s: a sync moved %s from depth %d to %d while measuring; again", kind, target.name, depth, d2)
				nat = after
				continue
			}
		}
		r.FirstPacket = fp
		r.FirstPacket.Target, r.FirstPacket.Depth, r.FirstPacket.Map = target.name, depth, nat == nil
		if d2 != depth {
			r.FirstPacket.Comment = fmt.Sprintf("depth %d after measuring", d2)
		}
		b.deepest[pick{kind, n, r.placement()}] = target
		break
	}
	b.logf("  %s: first packet via %s (depth %d, mean %.0f): median %.0f µs (p10 %.0f, p90 %.0f; outside load %.0f%%)", kind,
		r.FirstPacket.Target, r.FirstPacket.Depth, r.MeanDepth, r.FirstPacket.Median, r.FirstPacket.P10, r.FirstPacket.P90, 100*r.FirstPacket.Outside)
	// The first other proxy (in column order) whose pick at this size is a
	// different Service: does this proxy's time depend on where a Service is?
	for _, other := range allProxies {
		s, ok := b.deepest[pick{other, n, r.placement()}]
		if other == kind || !ok || s.name == r.FirstPacket.Target {
			continue
		}
		if l, err := b.measureConnects(ctx, probe{nd, netip.AddrPortFrom(s.clusterIP, servicePort)}); err == nil {
			r.OtherTarget = l[0]
			r.OtherTarget.Target = s.name + " (" + proxyLabel(other) + "'s pick)"
			if nat != nil {
				r.OtherTarget.Depth, _ = nat.depth(clientPodIP, s.clusterIP, servicePort)
			} else {
				r.OtherTarget.Map = true
			}
		}
		break
	}
	ep := netip.AddrPortFrom(endpointIP(sinks[0].block, 0), endpointPort)
	if l, err := b.measureConnects(ctx, probe{nd, ep}); err == nil {
		r.Direct = l[0]
		r.Direct.Target = ep.String()
		if nat != nil {
			r.Direct.Depth, _ = nat.depth(clientPodIP, ep.Addr(), int(ep.Port()))
		} else {
			r.Direct.Map = true
		}
	}
	return nil
}

// probe is a connection target seen from a node's client pod.
type probe struct {
	nd  *node
	dst netip.AddrPort
}

// measureConnects measures connect latency from the client pod of each
// probe's node to its dst, in 5 rounds of connects/5 per probe, each round
// after the machine was calm, the probes taking turns connection by
// connection, and pools each probe's rounds. Taking turns puts the probes
// under the same conditions, whatever drifts over seconds and minutes.
// Outside load is over the whole measurement, calm-waiting included.
func (b *bench) measureConnects(ctx context.Context, probes ...probe) ([]Latency, error) {
	const rounds = 5
	targets := make([]connTarget, len(probes))
	for i, p := range probes {
		targets[i] = connTarget{p.nd.client, p.dst}
	}
	all := make([][]time.Duration, len(probes))
	failed := make([]int, len(probes))
	meter := b.newLoadMeter()
	for range rounds {
		waitQuiet(ctx, 30*time.Second)
		lats, f, err := connectLatencies(targets, 20, b.opts.connects/rounds)
		if err != nil {
			return nil, err
		}
		for i := range probes {
			all[i] = append(all[i], lats[i]...)
			failed[i] += f[i]
		}
	}
	out := make([]Latency, len(probes))
	load := meter.outside()
	for i := range probes {
		out[i] = summarize(all[i], failed[i])
		out[i].Outside = load
	}
	return out, nil
}

// change moves Service idx's endpoints from sink-a/sink-b to sink-c/sink-d
// and measures until the client pod's traffic lands on the new ones.
func (b *bench) change(ctx context.Context, nd *node, pid int, logPath string, idx int) ChangeResult {
	svc := b.load.svcs[idx]
	c := ChangeResult{Service: svc.name}
	dst := netip.AddrPortFrom(svc.clusterIP, servicePort)
	// Quiet first: the proxy idle, its last sync more than a second ago,
	// and the machine calm.
	settle(ctx, pid, 2*time.Minute)
	waitQuiet(ctx, time.Minute)
	if h, err := hostnameVia(ctx, nd.client, dst, 2*time.Second); err != nil || (h != sinks[0].name && h != sinks[1].name) {
		c.Err = fmt.Sprintf("before the change the Service answers %q (%v)", h, err)
		return c
	}
	before, err := sampleProc(pid)
	if err != nil {
		c.Err = err.Error()
		return c
	}
	meter := b.newLoadMeter()
	t0, err := b.load.move(ctx, idx, sinks[2].block, sinks[3].block)
	if err != nil {
		c.Err = err.Error()
		return c
	}
	moved, polls, err := waitMoved(ctx, nd.client, dst, b.opts.changeTimeout)
	c.Polls = polls
	if err != nil {
		c.Err = err.Error()
		return c
	}
	c.LatencyMS = float64(moved.Sub(t0).Microseconds()) / 1e3
	c.Outside = meter.outside()
	// The sync's restore has ended; give the proxy a moment to finish.
	restoreEnd := time.Now()
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		found := false
		for _, x := range readRestores(logPath) {
			if x.isSync() && !x.start().Before(t0) {
				found, restoreEnd = true, x.end()
			}
		}
		if found {
			break
		}
	}
	time.Sleep(300 * time.Millisecond)
	after, err := sampleProc(pid)
	if err != nil {
		c.Err = err.Error()
		return c
	}
	c.CPUS = (after.cpu() - before.cpu()).Seconds()
	c.Restore = sumRestores(readRestores(logPath), func(x restoreRecord) bool {
		return !x.start().Before(t0) && !x.start().After(restoreEnd)
	})
	return c
}

// waitMoved sends an HTTP request through dst every 10 ms (each on a new
// connection, so each is a first packet) until one is answered by sink-c or
// sink-d, and returns the send time of the earliest such request.
func waitMoved(ctx context.Context, ns *netns.Namespace, dst netip.AddrPort, timeout time.Duration) (time.Time, int, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	hits := make(chan time.Time, 256)
	deadline := time.Now().Add(timeout)
	polls := 0
	for {
		now := time.Now()
		polls++
		go func(sent time.Time) {
			h, err := hostnameVia(ctx, ns, dst, 2*time.Second)
			if err == nil && (h == sinks[2].name || h == sinks[3].name) {
				select {
				case hits <- sent:
				default:
				}
			}
		}(now)
		select {
		case first := <-hits:
			return earliest(first, hits, 100*time.Millisecond), polls, nil
		case <-ctx.Done():
			return time.Time{}, polls, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return time.Time{}, polls, fmt.Errorf("traffic still reaches the old endpoints after %s", timeout)
		}
	}
}

// saveHeapProfile fetches the proxy's heap profile (after a GC, so it shows
// what is live) from inside the node namespace.
func (b *bench) saveHeapProfile(ctx context.Context, nd *node, kind string, n int) {
	status, body, err := nd.ns.HTTPGet(ctx, "http://127.0.0.1:10249/debug/pprof/heap?gc=1", 30*time.Second)
	if err != nil || status != 200 {
		b.logf("  %s: heap profile: status %d, %v", kind, status, err)
		return
	}
	path := filepath.Join(b.opts.profileDir, fmt.Sprintf("heap-%s-%d.pb.gz", kind, n))
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		b.logf("  %s: heap profile: %v", kind, err)
		return
	}
	b.logf("  %s: heap profile in %s", kind, path)
}

// restoreRunning says whether an iptables-restore or nft (or the shim
// standing in for them) child of pid is running.
func restoreRunning(pid int) bool {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, t.Name()))
		if err != nil {
			continue
		}
		for _, c := range strings.Fields(string(b)) {
			comm, _ := os.ReadFile("/proc/" + c + "/comm")
			if c := strings.TrimSpace(string(comm)); strings.Contains(c, "restor") || c == "nft" {
				return true
			}
		}
	}
	return false
}

func tailOf(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
