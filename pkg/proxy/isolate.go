package proxy

import (
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// One Service whose rules the kernel refuses must not stop every other
// Service's changes (upstream kube-proxy retries the whole restore forever).
// When an apply is refused, the proxy asks the kernel in a scratch
// namespace (Applier.Check, which never touches the live tables) which of
// the Services that changed since the last accepted rules it refuses: first
// the Service whose rule the kernel named, then by bisection. Every other
// Service is programmed; a refused one keeps its last accepted rules (none,
// if it never had any) until it changes again or a full sync retries it.

// maxChecks bounds the scratch checks of one sync. A refused Service the
// kernel names costs two checks, one found by bisection about two per
// halving (28 among 10,000 changed Services); past the bound the Services
// not yet judged keep their last accepted rules and the next sync goes on
// from there.
const maxChecks = 64

// Refusal is a Service whose latest rules the kernel refused; the kernel
// holds its last accepted rules instead (none when it never had any).
type Refusal struct {
	// Service names the Service, without port.
	Service endpoints.ServicePortName
	// Err is what the kernel said, with the line it refused.
	Err string
	// New says this sync found the refusal (or a different error for it);
	// later syncs report it again with New false, for as long as it lasts.
	New bool
}

// refusal is what the proxier remembers of a refused Service.
type refusal struct {
	// at holds the version of the Service that was refused (and nothing
	// else): the Service is retried once it differs from this version.
	at    *endpoints.Snapshot
	err   string
	since time.Time
}

// lineNumberRE finds the line numbers in a refusal's message, which change
// with unrelated Services while the refusal stays the same.
var lineNumberRE = regexp.MustCompile(`(?i)line:? \d+`)

// sameRefusal says whether two messages report the same refusal.
func sameRefusal(a, b string) bool {
	return lineNumberRE.ReplaceAllString(a, "line") == lineNumberRE.ReplaceAllString(b, "line")
}

// heldBack names the refused Services that have not changed since they
// were refused: they keep their last accepted rules without being tried
// again. A full sync tries them all again (the kernel may have changed).
func (p *Proxier) heldBack(want *endpoints.Snapshot, full bool) map[endpoints.ServicePortName]bool {
	keep := map[endpoints.ServicePortName]bool{}
	if full {
		return keep
	}
	for svc, r := range p.refused {
		if endpoints.SameService(r.at, want, svc) {
			keep[svc] = true
		}
	}
	return keep
}

// refusedByKernel says whether err includes a restore the kernel (or
// iptables-restore) refused, the only failure a Service's rules can cause.
func refusedByKernel(err error) bool {
	var re *dataplane.RestoreError
	return errors.As(err, &re)
}

// search finds, by checks in a scratch namespace, which of the changed
// Services the kernel refuses.
type search struct {
	p          *Proxier
	base, want *endpoints.Snapshot
	cfgs       map[iptables.Family]rules.Config
	// held are Services kept at base whatever the search decides.
	held    map[endpoints.ServicePortName]bool
	changed []endpoints.ServicePortName
	checks  int
	// exhausted says a check was wanted after maxChecks, or that a check
	// could not be made at all (broken).
	exhausted bool
	// broken is why a check could not be made (the tool could not be run,
	// the scratch namespace could not be created): no verdict, so the
	// search stops and blames nobody.
	broken error
}

// compose is want with every changed Service not in taken (and every held
// one) as base has it.
func (s *search) compose(taken []endpoints.ServicePortName) *endpoints.Snapshot {
	keep := make(map[endpoints.ServicePortName]bool, len(s.held)+len(s.changed))
	for svc := range s.held {
		keep[svc] = true
	}
	for _, svc := range s.changed {
		keep[svc] = true
	}
	for _, svc := range taken {
		delete(keep, svc)
	}
	return endpoints.Compose(s.base, s.want, keep)
}

// check asks the kernel, family by family, whether it accepts the rules of
// base with the Services in taken changed as want has them.
func (s *search) check(taken []endpoints.ServicePortName) error {
	if s.checks >= maxChecks {
		s.exhausted = true
		return errors.New("no checks left in this sync")
	}
	s.checks++
	snap := s.compose(taken)
	for _, fam := range s.p.families {
		err := s.p.planes[fam].Check(s.p.builders[fam].Build(snap, s.cfgs[fam]))
		if err != nil && !refusedByKernel(err) {
			s.broken, s.exhausted = err, true
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// find returns the changed Services the kernel accepts together, and the
// ones it refuses with what it said. Services neither taken nor refused
// were not judged within maxChecks.
func (s *search) find(firstErr error) (taken []endpoints.ServicePortName, refused map[endpoints.ServicePortName]string) {
	refused = map[endpoints.ServicePortName]string{}
	rest := s.changed
	err := firstErr
	// The kernel usually names the line it refused, and the line's
	// comment its Service: confirm that this Service alone is refused,
	// set it aside, and try the others together again.
	for err != nil && !s.exhausted {
		svc, ok := namedService(err)
		if !ok || !containsName(rest, svc) {
			break
		}
		alone := s.check([]endpoints.ServicePortName{svc})
		if alone == nil || s.exhausted {
			break // the hint misled; bisect instead
		}
		refused[svc] = kernelSaid(alone)
		rest = without(rest, svc)
		err = s.check(rest)
	}
	if err == nil && !s.exhausted {
		return rest, refused
	}
	var accepted []endpoints.ServicePortName
	s.bisect(rest, &accepted, refused)
	return accepted, refused
}

// bisect adds set to accepted if the kernel takes it on top of accepted,
// and otherwise judges its halves; a single Service it refuses is refused.
func (s *search) bisect(set []endpoints.ServicePortName, accepted *[]endpoints.ServicePortName, refused map[endpoints.ServicePortName]string) {
	if len(set) == 0 || s.exhausted {
		return
	}
	try := append(append([]endpoints.ServicePortName(nil), *accepted...), set...)
	err := s.check(try)
	switch {
	case s.exhausted:
		return
	case err == nil:
		*accepted = try
	case len(set) == 1:
		refused[set[0]] = kernelSaid(err)
	default:
		mid := len(set) / 2
		s.bisect(set[:mid], accepted, refused)
		s.bisect(set[mid:], accepted, refused)
	}
}

// isolate is called after the kernel refused the rules of target (want
// with the held Services at base). It finds the refused Services and
// applies everything else. It returns what it applied, the refused
// Services, and an error when the fault is not a Service's, or when not
// every changed Service could be judged (those keep their rules at base;
// the next sync goes on).
func (p *Proxier) isolate(base, want *endpoints.Snapshot, held map[endpoints.ServicePortName]bool,
	cfgs map[iptables.Family]rules.Config, full bool, liveErr error, res *SyncResult) (*endpoints.Snapshot, map[endpoints.ServicePortName]string, error) {
	s := &search{p: p, base: base, want: want, cfgs: cfgs, held: held}
	for _, svc := range endpoints.ChangedServices(base, want) {
		if !held[svc] {
			s.changed = append(s.changed, svc)
		}
	}
	first := s.check(s.changed)
	switch {
	case s.broken != nil:
		return nil, nil, fmt.Errorf("%w (and the kernel could not be asked which Service it refuses: %v)", liveErr, s.broken)
	case first == nil:
		return nil, nil, fmt.Errorf("%w (the same rules pass in a scratch namespace: the fault is in the live tables or the tools, not in a Service)", liveErr)
	}
	if err := s.findBase(base, want); err != nil {
		return nil, nil, fmt.Errorf("%w (%v)", liveErr, err)
	}
	taken, refused := s.find(first)
	if s.broken != nil {
		return nil, nil, fmt.Errorf("%w (and the kernel could not be asked which Service it refuses: %v)", liveErr, s.broken)
	}
	s.changed = without(s.changed, taken...)
	applied := s.compose(nil)
	if err := p.applyAll(applied, cfgs, full, res); err != nil {
		return nil, nil, fmt.Errorf("apply every Service but the %d the kernel refuses: %w", len(refused), err)
	}
	p.log.Info("programmed every Service but those the kernel refuses", "refused", len(refused), "changedServices", len(taken)+len(s.changed), "checks", s.checks)
	if unjudged := len(s.changed) - len(refused); unjudged > 0 {
		return applied, refused, fmt.Errorf("the kernel refused the rules of some of %d changed Services and %d checks could not tell which; until the next sync goes on they keep what the kernel held for them before",
			unjudged, maxChecks)
	}
	return applied, refused, nil
}

// findBase makes sure the rules the search starts from are accepted, and
// widens the search when they are not: first by judging the changed
// Services against their absence (the kernel may now refuse their earlier
// rules too), then by judging every Service from nothing (the kernel, or
// the node's addresses, changed under rules that did not). Only when even
// no Service at all is refused does it give up.
func (s *search) findBase(base, want *endpoints.Snapshot) error {
	empty := &endpoints.Snapshot{Node: base.Node}
	if s.check(nil) == nil {
		return nil
	}
	changed := make(map[endpoints.ServicePortName]bool, len(s.changed))
	for _, svc := range s.changed {
		changed[svc] = true
	}
	s.base = endpoints.Compose(empty, base, changed)
	if s.check(nil) == nil {
		return nil
	}
	s.base, s.held, s.changed = empty, nil, serviceNames(want)
	if err := s.check(nil); err != nil {
		if s.broken != nil {
			return fmt.Errorf("the kernel could not be asked which Service it refuses: %w", s.broken)
		}
		return fmt.Errorf("iptables-restore refuses even an empty ruleset in a scratch namespace, so the fault is in the tool or the kernel, not in a Service: %w", err)
	}
	return nil
}

// serviceNames lists the Services (names without port) of snap, sorted.
func serviceNames(snap *endpoints.Snapshot) []endpoints.ServicePortName {
	var out []endpoints.ServicePortName
	for _, n := range snap.SortedNames() {
		if svc := n.ServiceName(); len(out) == 0 || out[len(out)-1] != svc {
			out = append(out, svc)
		}
	}
	return out
}

// namedService is the Service whose rule the kernel named in err.
func namedService(err error) (endpoints.ServicePortName, bool) {
	var re *dataplane.RestoreError
	if !errors.As(err, &re) || re.Text == "" {
		return endpoints.ServicePortName{}, false
	}
	return rules.ServiceOfRule(re.Text)
}

// kernelSaid is a refusal as a log line or an Event shows it: the tool's
// message and the line it refused.
func kernelSaid(err error) string {
	var re *dataplane.RestoreError
	if !errors.As(err, &re) {
		return err.Error()
	}
	if re.Text == "" {
		return re.Output
	}
	return fmt.Sprintf("%s (refused line: %s)", re.Output, re.Text)
}

func containsName(list []endpoints.ServicePortName, n endpoints.ServicePortName) bool {
	for _, v := range list {
		if v == n {
			return true
		}
	}
	return false
}

// without returns list without the names in drop, as a new slice.
func without(list []endpoints.ServicePortName, drop ...endpoints.ServicePortName) []endpoints.ServicePortName {
	gone := make(map[endpoints.ServicePortName]bool, len(drop))
	for _, d := range drop {
		gone[d] = true
	}
	out := make([]endpoints.ServicePortName, 0, len(list))
	for _, v := range list {
		if !gone[v] {
			out = append(out, v)
		}
	}
	return out
}
