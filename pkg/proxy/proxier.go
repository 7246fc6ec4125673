// Package proxy is the sync loop: it turns the tracker's snapshots into
// rules for each IP family and hands them to the dataplane, no more often
// than --min-sync-period, at least every --sync-period, and again soon after
// a failure.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
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
	// ClusterCIDRs holds at most one pod range per family.
	ClusterCIDRs []netip.Prefix
	// MasqueradeAll and MasqueradeBit have kube-proxy's meanings.
	MasqueradeAll bool
	MasqueradeBit int
	// NodePortAddresses restricts NodePorts to the local addresses inside
	// these ranges; nil means every local address.
	NodePortAddresses []netip.Prefix
	// RandomFully adds --random-fully to MASQUERADE.
	RandomFully bool
	// SyncPeriod is the longest time between two syncs; MinSyncPeriod the
	// shortest; FullSyncPeriod how often every chain is rewritten anyway.
	SyncPeriod, MinSyncPeriod, FullSyncPeriod time.Duration
	// UnsupportedProtocols are protocols this node's iptables cannot match;
	// service ports using them are skipped (with one log line each).
	UnsupportedProtocols map[endpoints.Protocol]bool
	// DeleteStaleFlows removes UDP conntrack entries that a successful sync
	// made stale (conntrack.Delete); nil leaves conntrack alone.
	DeleteStaleFlows func([]conntrack.Flow) (uint, error)
}

// Applier is the dataplane of one family, as the loop uses it.
type Applier interface {
	Apply(rs *iptables.Ruleset, full bool) (dataplane.Result, error)
}

// AddrLister returns the node's local addresses of a family; it is read at
// every sync so that NodePorts follow address changes.
type AddrLister func(iptables.Family) ([]netip.Addr, error)

// SyncResult is what one sync did, for health checks and metrics.
type SyncResult struct {
	Snapshot *endpoints.Snapshot
	// Results has one entry per family that was applied.
	Results []dataplane.Result
	// Err is nil when every family was applied.
	Err error
	// Start and End bound the sync.
	Start, End time.Time
	// QueuedSince is when the oldest change this sync carried arrived (zero
	// for a periodic sync that carried none).
	QueuedSince time.Time
	// Skipped counts service ports left out because this node cannot serve them.
	Skipped int
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
}

// New wires a Proxier; planes holds one Applier per family to program.
func New(opts Options, tracker *endpoints.Tracker, planes map[iptables.Family]Applier, addrs AddrLister, log *slog.Logger) *Proxier {
	p := &Proxier{
		opts:    opts,
		tracker: tracker,
		planes:  planes,
		addrs:   addrs,
		log:     log,
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
	tracker.SetOnChange(p.changed)
	return p
}

// OnChange registers a function called whenever a change arrives from the
// API server, before the sync it causes (the metrics' "last queued" time).
func (p *Proxier) OnChange(f func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.changeListeners = append(p.changeListeners, f)
}

func (p *Proxier) changed() {
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
// often than MinSyncPeriod), at least every SyncPeriod, and after a failure
// again with a backoff that starts at MinSyncPeriod (at least one second)
// and doubles up to SyncPeriod.
func (p *Proxier) Run(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	var lastStart time.Time
	backoff := time.Duration(0)
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.kick:
		case <-timer.C:
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
			backoff = max(backoff*2, p.opts.MinSyncPeriod, time.Second)
			backoff = min(backoff, p.opts.SyncPeriod)
			next = backoff
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

// Sync computes and applies the rules once; full forces every chain to be
// rewritten (it is also forced every FullSyncPeriod).
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

	snap, skipped := p.withoutUnsupported(snap)
	res := SyncResult{Snapshot: snap, Start: start, QueuedSince: queued, Skipped: skipped}
	var errs []error
	for _, fam := range p.families {
		cfg, err := p.rulesConfig(fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", fam, err))
			continue
		}
		r, err := p.planes[fam].Apply(p.builders[fam].Build(snap, cfg), full)
		r.Family = fam
		res.Results = append(res.Results, r)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		p.log.Debug("synced rules", "family", fam.String(), "full", r.Full, "reason", r.Reason,
			"chainsWritten", r.ChainsWritten, "chainsDeleted", r.ChainsDeleted, "rules", r.RulesWritten,
			"bytes", r.Bytes, "duration", r.Duration)
	}
	res.Err = errors.Join(errs...)
	res.End = time.Now()

	if res.Err == nil {
		p.deleteStaleFlows(snap)
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
		p.log.Error("sync failed; the previous rules stay in place and the sync is retried", "err", res.Err)
	} else {
		p.log.Info("rules synced", "servicePorts", len(snap.Services), "changed", len(snap.Changed), "duration", res.End.Sub(start).Round(time.Millisecond))
	}
	for _, f := range listeners {
		f(res)
	}
	return res
}

// deleteStaleFlows runs only after the new rules are in, so that the next
// packet of a flow whose entry is deleted meets them.
func (p *Proxier) deleteStaleFlows(snap *endpoints.Snapshot) {
	prev := p.applied
	p.applied = snap.WithoutChanges() // Stale reads no Changed set
	if p.opts.DeleteStaleFlows == nil {
		return
	}
	flows := conntrack.Stale(prev, snap)
	if len(flows) == 0 {
		return
	}
	n, err := p.opts.DeleteStaleFlows(flows)
	if err != nil {
		p.log.Warn("could not delete stale UDP conntrack entries; those flows keep their old endpoint until they idle out", "err", err)
		return
	}
	p.log.Debug("deleted stale UDP conntrack entries", "selectors", len(flows), "deleted", n)
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
	cfg := rules.Config{
		Family:        fam,
		MasqueradeAll: p.opts.MasqueradeAll,
		MasqueradeBit: p.opts.MasqueradeBit,
		RandomFully:   p.opts.RandomFully,
	}
	for _, c := range p.opts.ClusterCIDRs {
		if (c.Addr().Is4()) == (fam == iptables.IPv4) {
			cfg.ClusterCIDR = c
			break
		}
	}
	local, err := p.addrs(fam)
	if err != nil {
		return cfg, fmt.Errorf("list local addresses: %w", err)
	}
	cfg.NodeIPs = local
	if p.opts.NodePortAddresses != nil {
		cfg.NodePortAddresses = []netip.Addr{}
		for _, a := range local {
			for _, r := range p.opts.NodePortAddresses {
				if r.Contains(a) {
					cfg.NodePortAddresses = append(cfg.NodePortAddresses, a)
					break
				}
			}
		}
	}
	return cfg, nil
}
