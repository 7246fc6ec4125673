// Package proxy is the sync loop: it turns the tracker's snapshots into
// rules for each IP family and hands them to the dataplane, no more often
// than --iptables-min-sync-period, at least every --iptables-sync-period,
// again soon after a failure, and at once when the dataplane's canary shows
// that another program flushed the rules.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// Options are the daemon's settings that shape the rules and the loop.
type Options struct {
	// DetectLocal tells this node's pods' traffic from other traffic
	// (--detect-local-mode and the range or interface it uses).
	DetectLocal rules.DetectLocal
	// MasqueradeAll and MasqueradeBit have kube-proxy's meanings.
	MasqueradeAll bool
	MasqueradeBit int
	// NodePortAddresses restricts NodePorts to the local addresses inside
	// these ranges; nil means every local address.
	NodePortAddresses []netip.Prefix
	// LocalhostNodePorts (--iptables-localhost-nodeports) serves NodePorts
	// on 127.0.0.0/8 to the node's own traffic, as upstream, when
	// NodePortAddresses cover IPv4 loopback (nil does); IPv6 never serves
	// them. It sets net.ipv4.conf.all.route_localnet=1 through Sysctl
	// before the first rules that need it, and adds upstream's filter rule
	// against CVE-2020-8558 (rules.Config.LocalhostNodePorts). False leaves
	// loopback out of NodePorts and the sysctl alone.
	LocalhostNodePorts bool
	// Sysctl sets kernel parameters of the daemon's own network namespace
	// (ProcSysctl on a node); needed when LocalhostNodePorts applies, and
	// a sync fails without it.
	Sysctl Sysctl
	// RandomFully adds --random-fully to MASQUERADE.
	RandomFully bool
	// SyncPeriod is the longest time between two syncs; MinSyncPeriod the
	// shortest; FullSyncPeriod how often every chain is rewritten anyway.
	SyncPeriod, MinSyncPeriod, FullSyncPeriod time.Duration
	// UnsupportedProtocols are protocols this node's iptables cannot match;
	// service ports using them are skipped (with one log line each).
	UnsupportedProtocols map[endpoints.Protocol]bool
	// Conntrack is the node's conntrack table (conntrack.OpenKernel). After
	// the first successful sync, and after each successful sync that changed
	// a UDP or SCTP service port's frontends or serving endpoints, the
	// entries to Service frontends that no serving endpoint answers any more
	// are deleted from it (conntrack.Reconcile); nil leaves conntrack alone.
	Conntrack conntrack.Table
	// CanaryInterval is how often, between syncs, the loop asks each
	// family's dataplane whether its canary is still there
	// (Applier.CanaryLost: one `iptables -C` per table); when it is not, another program flushed
	// the rules and a full sync runs at once. 0 means DefaultCanaryInterval;
	// a negative interval turns the check off (the canary is then only
	// checked by the syncs themselves).
	CanaryInterval time.Duration
}

// DefaultCanaryInterval is how often the canary is checked between syncs.
// kube-proxy checks its canary once per --iptables-sync-period (30 s); the
// check costs two `iptables -C` of about 3 ms per family whatever the
// number of Services, so every 5 s costs about 0.1% of a core and bounds
// the outage after a flush to about 5 s plus one sync.
const DefaultCanaryInterval = 5 * time.Second

// MaxRetryInterval bounds the wait before retrying a failed sync when
// nothing else happens: the backoff doubles from --iptables-min-sync-period
// (at least 1 s) up to this or --iptables-sync-period, whichever is shorter,
// so that rules come back within 10 s of iptables working again rather than
// a whole sync period later. A sync that took long to fail waits at least
// twice its own duration (up to the sync period), so that a node whose
// every sync fails spends at most a third of its time on them.
const MaxRetryInterval = 10 * time.Second

// Applier is the dataplane of one family, as the loop uses it.
type Applier interface {
	// Apply puts rs into the kernel (dataplane.Dataplane.Apply).
	Apply(rs *iptables.Ruleset, full bool) (dataplane.Result, error)
	// Check says whether the kernel accepts rs, without touching the live
	// tables (dataplane.Dataplane.Check).
	Check(rs *iptables.Ruleset) error
	// CanaryLost says, cheaply and between syncs, whether another program
	// flushed the rules: what it found missing, or ""
	// (dataplane.Dataplane.CanaryLost). A wrapper must forward it, or
	// flushes go unnoticed until the next sync.
	CanaryLost() (string, error)
}

// AddrLister returns the node's local addresses of a family; it is read at
// every sync so that NodePorts follow address changes.
type AddrLister func(iptables.Family) ([]netip.Addr, error)

// SyncResult is what one sync did, for health checks and metrics.
type SyncResult struct {
	Snapshot *endpoints.Snapshot
	// Configs are the rules configurations the sync built each family's
	// rules with (nil when it failed before building): with Snapshot, what
	// the kernel's rules should be, for explanations (/debug/trace).
	Configs map[iptables.Family]rules.Config
	// Results has one entry per apply of a family, in order: one per family,
	// or more when the kernel refused an apply and the rest was applied
	// again without the refused Services.
	Results []ApplyResult
	// Err is nil when every family was applied.
	Err error
	// Start and End bound the sync.
	Start, End time.Time
	// QueuedSince is when the oldest change this sync carried arrived (zero
	// for a periodic sync that carried none).
	QueuedSince time.Time
	// Skipped counts service ports left out because this node cannot serve them.
	Skipped int
	// Refusals are the Services whose latest rules the kernel refuses; the
	// kernel holds their last accepted rules (Snapshot has them so).
	Refusals []Refusal
	// FailedApplies counts the applies of a family that failed during the
	// sync, including those that led to finding the refused Services.
	FailedApplies int
	// Conntrack has one entry per family whose conntrack table this sync
	// reconciled (none when nothing conntrack depends on changed).
	Conntrack []ConntrackCleanup
}

// ConntrackCleanup is one family's conntrack reconciliation.
type ConntrackCleanup struct {
	Family iptables.Family
	// Duration is the time the reconciliation took; Seen counts the UDP and
	// SCTP entries read (and the TCP ones, in a sweep after the rules may
	// have been missing) and Deleted those deleted (those deleted before an
	// error included).
	Duration      time.Duration
	Seen, Deleted int
	Err           error
}

// Proxier owns the loop.
type Proxier struct {
	opts     Options
	tracker  *endpoints.Tracker
	planes   map[iptables.Family]Applier
	builders map[iptables.Family]*rules.Builder
	families []iptables.Family
	addrs    AddrLister
	log      *slog.Logger
	// cpu reads the process's CPU time around each apply (processCPU;
	// tests replace it).
	cpu func() time.Duration

	kick chan struct{}

	mu              sync.Mutex
	listeners       []func(SyncResult)
	changeListeners []func()
	// pendingSince survives failed syncs: the changes they carried are
	// still not in the kernel.
	pendingSince time.Time
	lastFull     time.Time
	warned       map[endpoints.ServicePortName]bool
	// applied is the last snapshot whose rules are all in the kernel.
	applied *endpoints.Snapshot
	// refused are the Services whose latest rules the kernel refused.
	refused map[endpoints.ServicePortName]refusal
	// routeLocalnet is set once route_localnet=1 is ensured.
	routeLocalnet bool
	// cfgs are the rules configurations of the last apply.
	cfgs map[iptables.Family]rules.Config
	// ctFronts are the frontends the conntrack table was last reconciled
	// against in full; ctFailed says the last reconciliation failed.
	ctFronts *conntrack.Frontends
	ctFailed bool
	// tcpSwept says the TCP entries that skipped the nat table while the
	// rules were missing have been swept since the rules were last missing
	// (false at start-up: they may have been missing before this process).
	tcpSwept bool
}

// New makes a Proxier; planes holds one Applier per family to program.
// The Proxier reads tracker at every sync (Snapshot, OldestPending) but
// does not subscribe to it: whoever wires the daemon tells it of changes
// with Changed (tracker.SetOnChange(p.Changed)), so that the flow from
// the informers to the loop is written where it can be read.
func New(opts Options, tracker *endpoints.Tracker, planes map[iptables.Family]Applier, addrs AddrLister, log *slog.Logger) *Proxier {
	p := &Proxier{
		opts:    opts,
		tracker: tracker,
		planes:  planes,
		addrs:   addrs,
		log:     log,
		cpu:     processCPU,
		kick:    make(chan struct{}, 1),
		warned:  map[endpoints.ServicePortName]bool{},
	}
	p.builders = map[iptables.Family]*rules.Builder{}
	for _, f := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		if _, ok := planes[f]; ok {
			p.families = append(p.families, f)
			p.builders[f] = new(rules.Builder)
		}
	}
	return p
}

// OnChange registers a function called at every Changed, before the sync
// it causes (the metrics' "last queued" time).
func (p *Proxier) OnChange(f func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.changeListeners = append(p.changeListeners, f)
}

// Changed says that the tracked state changed: it calls the OnChange
// functions and asks for a sync soon (Kick). It never blocks for long, so
// that the tracker may call it from an informer's handler.
func (p *Proxier) Changed() {
	p.mu.Lock()
	listeners := append([]func(){}, p.changeListeners...)
	p.mu.Unlock()
	for _, f := range listeners {
		f()
	}
	p.Kick()
}

// OnSync registers a function called after every sync, successful or not
// (health checks and metrics follow the kernel, never the API server).
func (p *Proxier) OnSync(f func(SyncResult)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.listeners = append(p.listeners, f)
}

// Kick asks for a sync soon; it never blocks.
func (p *Proxier) Kick() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// Run syncs until ctx is done: at once, then on every change (but no more
// often than MinSyncPeriod), at least every SyncPeriod, after a failure
// again with a backoff (retryAfter), and whenever the canary check, every
// CanaryInterval, finds that another program flushed the rules. Every
// command runs from Run's goroutine.
func (p *Proxier) Run(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	var canary <-chan time.Time
	if every := p.canaryInterval(); every > 0 {
		t := time.NewTicker(every)
		defer t.Stop()
		canary = t.C
	}
	var lastStart time.Time
	backoff := time.Duration(0)
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.kick:
		case <-timer.C:
		case <-canary:
			if !p.canaryLost() {
				continue
			}
		}
		if wait := p.opts.MinSyncPeriod - time.Since(lastStart); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		lastStart = time.Now()
		res := p.Sync(false)
		next := p.opts.SyncPeriod
		if res.Err != nil {
			backoff, next = p.retryAfter(backoff, res.End.Sub(res.Start))
		} else {
			backoff = 0
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(next)
	}
}

// retryAfter is the wait before retrying a sync that failed after took,
// given the previous backoff (0 after a success): the backoff doubles from
// MinSyncPeriod (at least 1 s) up to MaxRetryInterval or SyncPeriod,
// whichever is shorter, and the wait is at least twice took, up to
// SyncPeriod.
func (p *Proxier) retryAfter(backoff, took time.Duration) (nextBackoff, wait time.Duration) {
	backoff = max(backoff*2, p.opts.MinSyncPeriod, time.Second)
	backoff = min(backoff, MaxRetryInterval, p.opts.SyncPeriod)
	return backoff, min(max(backoff, 2*took), max(p.opts.SyncPeriod, backoff))
}

func (p *Proxier) canaryInterval() time.Duration {
	if p.opts.CanaryInterval == 0 {
		return DefaultCanaryInterval
	}
	return p.opts.CanaryInterval
}

// canaryLost asks each family's dataplane whether its canary is gone. A
// check that cannot be made is left to the next sync, which checks the
// canary too and reports what fails.
func (p *Proxier) canaryLost() bool {
	for _, fam := range p.families {
		lost, err := p.planes[fam].CanaryLost()
		if err != nil {
			p.log.Debug("could not check the canary; the next sync checks it again", "family", fam.String(), "err", err)
			continue
		}
		if lost != "" {
			return true
		}
	}
	return false
}

// Sync computes and applies the rules once; full forces every chain to be
// rewritten (it is also forced every FullSyncPeriod). When the kernel
// refuses the rules, the Services it refuses are found and left at their
// last accepted rules, and everything else is applied (isolate.go).
func (p *Proxier) Sync(full bool) SyncResult {
	start := time.Now()
	queued := p.tracker.OldestPending()
	snap := p.tracker.Snapshot()

	p.mu.Lock()
	if !queued.IsZero() && (p.pendingSince.IsZero() || queued.Before(p.pendingSince)) {
		p.pendingSince = queued
	}
	queued = p.pendingSince
	if p.opts.FullSyncPeriod > 0 && start.Sub(p.lastFull) >= p.opts.FullSyncPeriod {
		full = true
	}
	p.mu.Unlock()

	want, skipped := p.withoutUnsupported(snap)
	res := SyncResult{Start: start, QueuedSince: queued, Skipped: skipped}
	applied, refused, err := p.program(want, full, &res)
	res.Err = err
	res.End = time.Now()

	if applied != nil {
		res.Snapshot = applied
		prev := p.applied
		p.applied = applied.WithoutChanges()
		res.Conntrack = p.reconcileConntrack(applied, prev, rulesWereMissing(res.Results))
		res.Refusals = p.noteRefusals(want, refused, applied, start)
	} else {
		res.Snapshot = want
		res.Refusals = p.currentRefusals()
	}
	p.mu.Lock()
	if res.Err == nil {
		p.pendingSince = time.Time{}
		if full {
			p.lastFull = start
		}
	}
	listeners := append([]func(SyncResult){}, p.listeners...)
	p.mu.Unlock()

	if res.Err != nil {
		p.log.Error("sync failed; it is retried", "err", res.Err)
	} else {
		p.log.Info("rules synced", "servicePorts", len(applied.Services), "changed", len(snap.Changed), "refusedServices", len(res.Refusals), "duration", res.End.Sub(start).Round(time.Millisecond))
	}
	for _, f := range listeners {
		f(res)
	}
	return res
}

// program applies want, less the refused Services that have not changed.
// It returns the snapshot whose rules the kernel now holds (nil when
// nothing is known to be in), the Services newly found refused, and why
// the sync failed, if it did.
func (p *Proxier) program(want *endpoints.Snapshot, full bool, res *SyncResult) (*endpoints.Snapshot, map[endpoints.ServicePortName]string, error) {
	cfgs := map[iptables.Family]rules.Config{}
	for _, fam := range p.families {
		cfg, err := p.rulesConfig(fam)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", fam, err)
		}
		cfgs[fam] = cfg
		p.cfgs = cfgs
		res.Configs = cfgs
		if cfg.LocalhostNodePorts {
			if err := p.ensureRouteLocalnet(); err != nil {
				return nil, nil, err
			}
		}
	}
	base := p.applied
	if base == nil {
		base = &endpoints.Snapshot{Node: want.Node}
	}
	held := p.heldBack(want, full)
	target := want
	if len(held) > 0 {
		target = endpoints.Compose(base, want, held)
	}
	err := p.applyAll(target, cfgs, full, res)
	switch {
	case err == nil:
		return target, nil, nil
	case !refusedByKernel(err):
		return nil, nil, err
	}
	applied, refused, ierr := p.isolate(base, want, held, cfgs, full, err, res)
	return applied, refused, ierr
}

// applyAll builds and applies snap's rules in every family, recording each
// family's result in res.
func (p *Proxier) applyAll(snap *endpoints.Snapshot, cfgs map[iptables.Family]rules.Config, full bool, res *SyncResult) error {
	var errs []error
	for _, fam := range p.families {
		r, err := p.apply(fam, p.builders[fam].Build(snap, cfgs[fam]), full)
		res.Results = append(res.Results, r)
		if r.Reason == dataplane.ReasonCanary {
			p.log.Warn(r.CanaryLost+": another program flushed miniproxy's rules; rewriting all of them", "family", fam.String())
		}
		if err != nil {
			res.FailedApplies++
			errs = append(errs, err)
			continue
		}
		p.log.Debug("synced rules", "family", fam.String(), "full", r.Full, "reason", r.Reason,
			"chainsWritten", r.ChainsWritten, "chainsDeleted", r.ChainsDeleted, "rules", r.RulesWritten,
			"bytes", r.Bytes, "duration", r.Duration)
	}
	return errors.Join(errs...)
}

// noteRefusals records, once rules were applied, which Services stand
// refused: those found now (logged when new) and those held back unchanged.
// The others are forgotten, with a log line for those whose new rules the
// kernel now holds.
func (p *Proxier) noteRefusals(want *endpoints.Snapshot, found map[endpoints.ServicePortName]string, applied *endpoints.Snapshot, now time.Time) []Refusal {
	next := map[endpoints.ServicePortName]refusal{}
	var out []Refusal
	for svc, msg := range found {
		old, had := p.refused[svc]
		since := now
		if had {
			since = old.since
		}
		next[svc] = refusal{at: want.OnlyService(svc), err: msg, since: since}
		isNew := !had || !sameRefusal(old.err, msg)
		if isNew {
			p.log.Error("the kernel refuses this Service's rules; it keeps its last accepted rules (none if it never had any) until it changes, and every other Service is programmed",
				"service", svc.String(), "err", msg)
		}
		out = append(out, Refusal{Service: svc, Err: msg, New: isNew})
	}
	for svc, r := range p.refused {
		if _, ok := found[svc]; ok {
			continue
		}
		if endpoints.SameService(r.at, want, svc) && !endpoints.SameService(applied, want, svc) {
			next[svc] = r // held back unchanged
			out = append(out, Refusal{Service: svc, Err: r.err})
			continue
		}
		if len(applied.PortsOf(svc)) > 0 && endpoints.SameService(applied, want, svc) {
			p.log.Info("the kernel accepts this Service's rules now", "service", svc.String(), "refusedFor", now.Sub(r.since).Round(time.Second))
		}
	}
	p.refused = next
	sortRefusals(out)
	return out
}

// currentRefusals reports the Services refused so far, for a sync that
// failed before anything was known to be applied.
func (p *Proxier) currentRefusals() []Refusal {
	var out []Refusal
	for svc, r := range p.refused {
		out = append(out, Refusal{Service: svc, Err: r.err})
	}
	sortRefusals(out)
	return out
}

func sortRefusals(rs []Refusal) {
	sort.Slice(rs, func(i, j int) bool { return endpoints.LessName(rs[i].Service, rs[j].Service) })
}

// rulesWereMissing says whether an apply of the sync found that another
// program had flushed or deleted the rules (the canary was lost), so that
// connections begun meanwhile skipped the nat table.
func rulesWereMissing(results []ApplyResult) bool {
	for _, r := range results {
		if r.Reason == dataplane.ReasonCanary {
			return true
		}
	}
	return false
}

// reconcileConntrack runs only after the new rules are in, so that the next
// packet of a flow whose entry is deleted meets them. It runs after the
// first successful sync (a restart reconciles; it never flushes) and after
// each one whose UDP or SCTP frontends or serving endpoints differ from the
// last reconciled ones, or whose predecessor failed to reconcile. Each
// family is reconciled, and timed, on its own.
//
// The TCP entries that never met the rules are swept too (WithTCP): those
// to every TCP frontend at the first reconciliation of the process and
// after rulesMissing (the rules were found flushed), and those to the TCP
// frontends that are new since prev (the rules applied before this sync).
// Then the client's next SYN is translated, instead of matching the
// untranslated entry for its two minutes.
func (p *Proxier) reconcileConntrack(snap, prev *endpoints.Snapshot, rulesMissing bool) []ConntrackCleanup {
	if p.opts.Conntrack == nil {
		return nil
	}
	if rulesMissing {
		p.tcpSwept = false
	}
	nodePorts := map[iptables.Family][]netip.Addr{}
	for fam, cfg := range p.cfgs {
		nodePorts[fam] = cfg.NodePortAddrs()
	}
	cur := conntrack.NewFrontends(snap, nodePorts)
	var newTCP []endpoints.ServicePortName
	if p.tcpSwept {
		newTCP = conntrack.NewTCPFrontends(prev, snap)
	}
	if p.tcpSwept && len(newTCP) == 0 && p.ctFronts != nil && !p.ctFailed && cur.SameServices(p.ctFronts) {
		return nil
	}
	judge := cur.Since(p.ctFronts)
	switch {
	case !p.tcpSwept:
		judge = judge.WithTCP(snap, nil)
	case len(newTCP) > 0:
		judge = judge.WithTCP(snap, newTCP)
	}
	var out []ConntrackCleanup
	failed := false
	for _, fam := range p.families {
		r := conntrack.Reconcile(p.opts.Conntrack, fam, judge, p.log)
		out = append(out, ConntrackCleanup{Family: fam, Duration: r.Duration, Seen: r.Seen, Deleted: r.Deleted, Err: r.Err})
		if r.Err != nil {
			failed = true
			p.log.Warn("could not reconcile the conntrack table; stale UDP/SCTP flows keep their old endpoint until the next sync retries",
				"family", fam.String(), "deleted", r.Deleted, "err", r.Err)
			continue
		}
		p.log.Debug("reconciled conntrack table", "family", fam.String(), "seen", r.Seen, "deleted", r.Deleted, "duration", r.Duration)
	}
	p.ctFailed = failed
	if !failed {
		p.ctFronts = cur
		p.tcpSwept = true
	}
	return out
}

// withoutUnsupported drops service ports whose protocol this node cannot
// match, so that one such Service never makes the whole restore fail.
func (p *Proxier) withoutUnsupported(snap *endpoints.Snapshot) (*endpoints.Snapshot, int) {
	if len(p.opts.UnsupportedProtocols) == 0 {
		return snap, 0
	}
	out := &endpoints.Snapshot{Node: snap.Node, Services: map[endpoints.ServicePortName]*endpoints.ServicePort{}, Endpoints: snap.Endpoints, Changed: snap.Changed}
	skipped := 0
	for n, s := range snap.Services {
		if p.opts.UnsupportedProtocols[s.Protocol] {
			skipped++
			if !p.warned[n] {
				p.warned[n] = true
				p.log.Warn("skipping service port: this node's iptables cannot match its protocol", "servicePort", n.String(), "protocol", string(s.Protocol))
			}
			continue
		}
		out.Services[n] = s
	}
	return out, skipped
}

func (p *Proxier) rulesConfig(fam iptables.Family) (rules.Config, error) {
	local, err := p.addrs(fam)
	if err != nil {
		return rules.Config{Family: fam}, fmt.Errorf("list local addresses: %w", err)
	}
	return p.opts.RulesConfig(fam, local), nil
}

// RulesConfig is the configuration of fam's rules under these options on
// a node with the local addresses local (of fam): what every sync builds
// with, and what `miniproxy explain` rebuilds from the API server.
func (o Options) RulesConfig(fam iptables.Family, local []netip.Addr) rules.Config {
	cfg := rules.Config{
		Family:        fam,
		DetectLocal:   o.DetectLocal,
		MasqueradeAll: o.MasqueradeAll,
		MasqueradeBit: o.MasqueradeBit,
		RandomFully:   o.RandomFully,
		NodeIPs:       local,
	}
	cfg.LocalhostNodePorts = rules.LocalhostNodePorts(o.LocalhostNodePorts, fam, o.NodePortAddresses)
	cfg.NodePortAddresses = rules.NodePortAddresses(local, o.NodePortAddresses, cfg.LocalhostNodePorts)
	return cfg
}

// ensureRouteLocalnet sets route_localnet=1 once: without it the kernel
// drops, as martian, the replies to the node's own connections from
// 127.0.0.1 that a localhost NodePort sent elsewhere.
func (p *Proxier) ensureRouteLocalnet() error {
	if p.routeLocalnet {
		return nil
	}
	if p.opts.Sysctl == nil {
		return errors.New("localhost NodePorts need route_localnet=1, and no Sysctl was given to set it")
	}
	changed, err := p.opts.Sysctl.Ensure(RouteLocalnet, 1)
	if err != nil {
		return fmt.Errorf("localhost NodePorts (--iptables-localhost-nodeports) need %s=1: %w", RouteLocalnet, err)
	}
	if changed {
		p.log.Info("set route_localnet=1 to serve NodePorts on localhost; to avoid it, set --iptables-localhost-nodeports=false or --nodeport-addresses without 127.0.0.0/8",
			"sysctl", RouteLocalnet)
	}
	p.routeLocalnet = true
	return nil
}
