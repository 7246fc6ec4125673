package iptables

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
)

// Packet is the first packet of a new connection, as the tracer sees it.
type Packet struct {
	Src, Dst netip.Addr
	Proto    string // "tcp", "udp" or "sctp"
	DPort    int
	// FromNode says the node itself sends it (nat OUTPUT, filter OUTPUT);
	// otherwise it arrives from a network (nat PREROUTING, then filter INPUT
	// or FORWARD).
	FromNode bool
	// InIface is the interface a packet from a network arrives on ("" for
	// none, and always for the node's own packets): what -i matches.
	InIface string
	// Recent names the affinity lists that already hold the source, as if an
	// earlier connection had set them.
	Recent map[string]bool
}

// Outcome is one way a packet can go, with its probability.
type Outcome struct {
	// Verdict is "ACCEPT", "DROP" or "REJECT".
	Verdict string
	// Dst is where the packet goes after DNAT (the original destination when
	// it was not translated).
	Dst netip.AddrPort
	// DNAT says the destination was translated.
	DNAT bool
	// Masquerade says the source is replaced by the node's address.
	Masquerade  bool
	Probability float64
	// RecentSet names the affinity lists this connection adds its source to.
	RecentSet []string
	// Path lists the rules whose target the packet took on its way, in
	// order (jumps, marks, translations, the verdict), so that an
	// explanation can quote the rule that decided. Outcomes merged into
	// one keep the first path.
	Path []Hop
}

// Hop is one rule a traced packet took: where it is and what it says.
type Hop struct {
	Table Table
	Chain string
	// Index is the rule's 0-based position in its chain.
	Index int
	Rule  Rule
}

// String is a short readable form for test failures.
func (o Outcome) String() string {
	s := fmt.Sprintf("%s %s", o.Verdict, o.Dst)
	if o.Masquerade {
		s += " masqueraded"
	}
	return fmt.Sprintf("%s (p=%.3f)", s, o.Probability)
}

// Tracer walks packets through a set of tables, so that tests can assert
// what happens to traffic ("dropped", "to this endpoint, masqueraded")
// rather than the text of the rules.
type Tracer struct {
	State State
	// LocalAddrs are the node's addresses: they decide addrtype LOCAL and
	// whether a packet is delivered locally (INPUT) or forwarded (FORWARD).
	LocalAddrs []netip.Addr
}

// NewTracer loads a ruleset into fresh tables exactly as the dataplane
// would: the full restore text through the restore parser, then the jumps
// at the head of the built-in chains.
func NewTracer(rs *Ruleset, localAddrs []netip.Addr) (*Tracer, error) {
	in, err := ParseRestore(RenderComplete(rs))
	if err != nil {
		return nil, fmt.Errorf("parse rules: %w", err)
	}
	st, err := NewState().Apply(rs.Family, in, true)
	if err != nil {
		return nil, fmt.Errorf("load rules: %w", err)
	}
	return &Tracer{State: st, LocalAddrs: localAddrs}, nil
}

type pstate struct {
	pkt    Packet
	dst    netip.AddrPort
	dnat   bool
	mark   uint32
	masq   bool
	prob   float64
	recent []string
	path   []Hop
}

type result struct {
	s       pstate
	verdict string // "" means the chain fell through (or returned)
}

// Trace gives every way the packet can go, merged and sorted by destination.
func (t *Tracer) Trace(p Packet) ([]Outcome, error) {
	start := pstate{pkt: p, dst: netip.AddrPortFrom(p.Dst, uint16(p.DPort)), prob: 1}
	var final []result
	if p.FromNode {
		for _, r := range t.hook(NAT, "OUTPUT", start) {
			for _, f := range t.hook(Filter, "OUTPUT", r.s) {
				if f.verdict != "ACCEPT" {
					final = append(final, f)
					continue
				}
				final = append(final, t.hook(NAT, "POSTROUTING", f.s)...)
			}
		}
	} else {
		for _, r := range t.hook(NAT, "PREROUTING", start) {
			if t.isLocal(r.s.dst.Addr()) {
				final = append(final, t.hook(Filter, "INPUT", r.s)...)
				continue
			}
			for _, f := range t.hook(Filter, "FORWARD", r.s) {
				if f.verdict != "ACCEPT" {
					final = append(final, f)
					continue
				}
				final = append(final, t.hook(NAT, "POSTROUTING", f.s)...)
			}
		}
	}
	return merge(final), nil
}

// hook runs a built-in chain; its policy is ACCEPT, and in nat every
// outcome continues (nat cannot drop).
func (t *Tracer) hook(table Table, chain string, s pstate) []result {
	out := t.walk(table, chain, 0, s, 0)
	for i := range out {
		if out[i].verdict == "" || table == NAT {
			out[i].verdict = "ACCEPT"
		}
	}
	return out
}

func merge(rs []result) []Outcome {
	byKey := map[string]*Outcome{}
	var keys []string
	for _, r := range rs {
		if r.s.prob == 0 {
			continue
		}
		o := Outcome{Verdict: r.verdict, Dst: r.s.dst, DNAT: r.s.dnat, Masquerade: r.s.masq, RecentSet: r.s.recent, Path: r.s.path}
		k := fmt.Sprintf("%s|%s|%v|%v|%v", o.Verdict, o.Dst, o.DNAT, o.Masquerade, o.RecentSet)
		if prev, ok := byKey[k]; ok {
			prev.Probability += r.s.prob
			continue
		}
		o.Probability = r.s.prob
		byKey[k] = &o
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]Outcome, 0, len(keys))
	for _, k := range keys {
		out = append(out, *byKey[k])
	}
	return out
}

const maxDepth = 32

func (t *Tracer) walk(table Table, chain string, i int, s pstate, depth int) []result {
	c := t.State[table][chain]
	if c == nil || depth > maxDepth {
		return []result{{s: s}}
	}
	for ; i < len(c.Rules); i++ {
		r := c.Rules[i]
		p, after := t.match(r, s)
		if p == 0 {
			continue
		}
		if p < 1 {
			no := s
			no.prob *= 1 - p
			rest := t.walk(table, chain, i+1, no, depth)
			yes := after
			yes.prob *= p
			return append(t.target(table, chain, i, r, yes, depth), rest...)
		}
		return t.target(table, chain, i, r, after, depth)
	}
	return []result{{s: s}}
}

// target applies a matched rule's target and continues where iptables would.
func (t *Tracer) target(table Table, chain string, i int, r Rule, s pstate, depth int) []result {
	tgt := r.Target()
	if tgt == "" {
		return t.walk(table, chain, i+1, s, depth)
	}
	s.path = append(s.path[:len(s.path):len(s.path)], Hop{Table: table, Chain: chain, Index: i, Rule: r})
	switch tgt {
	case "RETURN":
		return []result{{s: s}}
	case "ACCEPT", "DROP", "REJECT":
		return []result{{s: s, verdict: tgt}}
	case "DNAT":
		to, err := netip.ParseAddrPort(argAfter(r, "--to-destination"))
		if err == nil {
			s.dst, s.dnat = to, true
		}
		return []result{{s: s, verdict: "ACCEPT"}}
	case "MASQUERADE":
		s.masq = true
		return []result{{s: s, verdict: "ACCEPT"}}
	case "MARK":
		if v := argAfter(r, "--or-mark"); v != "" {
			s.mark |= parseUint(v)
		}
		if v := argAfter(r, "--xor-mark"); v != "" {
			s.mark ^= parseUint(v)
		}
		// The kernel prints every MARK as --set-xmark value/mask:
		// clear the mask's bits, then flip the value's.
		if v := argAfter(r, "--set-xmark"); v != "" {
			val, mask, found := strings.Cut(v, "/")
			m := uint32(0xffffffff)
			if found {
				m = parseUint(mask)
			}
			s.mark = s.mark&^m ^ parseUint(val)
		}
		return t.walk(table, chain, i+1, s, depth)
	}
	var out []result
	for _, sub := range t.walk(table, tgt, 0, s, depth+1) {
		if sub.verdict != "" {
			out = append(out, sub)
			continue
		}
		out = append(out, t.walk(table, chain, i+1, sub.s, depth)...)
	}
	return out
}

func argAfter(r Rule, flag string) string {
	for i := 0; i+1 < len(r); i++ {
		if r[i] == flag {
			return r[i+1]
		}
	}
	return ""
}

func parseUint(s string) uint32 {
	v, _ := strconv.ParseUint(s, 0, 32)
	return uint32(v)
}

// match evaluates a rule's matches in order, as the kernel does, and returns
// the probability that all of them match (0, 1, or a statistic's
// probability) and the state after their side effects (recent --set).
func (t *Tracer) match(r Rule, s pstate) (float64, pstate) {
	prob := 1.0
	neg := false
	for i := 0; i < len(r); i++ {
		a := r[i]
		val := func() string {
			if i+1 < len(r) {
				i++
				return r[i]
			}
			return ""
		}
		ok := true
		switch a {
		case "!":
			neg = true
			continue
		case "-j", "-g":
			return prob, s
		case "-m", "--comment", "--mode", "--name", "--seconds":
			val()
			continue
		case "-s":
			ok = addrMatches(s.pkt.Src, val())
		case "-d":
			ok = addrMatches(s.dst.Addr(), val())
		case "-p":
			ok = strings.EqualFold(val(), s.pkt.Proto)
		case "-i":
			ok = ifaceMatches(s.pkt, val())
		case "--dport":
			ok = portMatches(int(s.dst.Port()), val())
		case "--src-type":
			ok = val() == "LOCAL" && t.isLocal(s.pkt.Src)
		case "--dst-type":
			ok = val() == "LOCAL" && t.isLocal(s.dst.Addr())
		case "--ctstate":
			// The first packet of a connection; DNAT once nat translated
			// its destination.
			v := val()
			ok = containsWord(v, "NEW") || (s.dnat && containsWord(v, "DNAT"))
		case "--mark":
			ok = markMatches(s.mark, val())
		case "--probability":
			p, _ := strconv.ParseFloat(val(), 64)
			if neg {
				p = 1 - p
			}
			neg = false
			prob *= p
			continue
		case "--rcheck", "--update":
			ok = s.pkt.Recent[recentName(r, i)]
		case "--set":
			s.recent = append(append([]string{}, s.recent...), recentName(r, i))
		case "--reap", "--random-fully", "--rsource":
			continue
		default:
			// Unknown flags are treated as matching; the tests only feed
			// the tracer what this package writes.
			continue
		}
		if neg {
			ok = !ok
			neg = false
		}
		if !ok {
			return 0, s
		}
	}
	return prob, s
}

// recentName finds the --name of the recent match that flag i belongs to.
func recentName(r Rule, i int) string {
	name := ""
	for j := 0; j < len(r); j++ {
		if r[j] == "-m" && j+1 < len(r) && r[j+1] == "recent" && j > i {
			break
		}
		if r[j] == "--name" && j+1 < len(r) {
			name = r[j+1]
		}
	}
	return name
}

// ifaceMatches is -i: the name, or a prefix when it ends in "+". The
// node's own packets have no input interface and match no name.
func ifaceMatches(p Packet, spec string) bool {
	if p.FromNode || p.InIface == "" {
		return false
	}
	if prefix, ok := strings.CutSuffix(spec, "+"); ok {
		return strings.HasPrefix(p.InIface, prefix)
	}
	return p.InIface == spec
}

func containsWord(list, w string) bool {
	for _, x := range strings.Split(list, ",") {
		if x == w {
			return true
		}
	}
	return false
}

func markMatches(mark uint32, spec string) bool {
	v, m, found := strings.Cut(spec, "/")
	mask := uint32(0xffffffff)
	if found {
		mask = parseUint(m)
	}
	return mark&mask == parseUint(v)&mask
}

func portMatches(port int, spec string) bool {
	lo, hi, found := strings.Cut(spec, ":")
	l, _ := strconv.Atoi(lo)
	h := l
	if found {
		h, _ = strconv.Atoi(hi)
	}
	return port >= l && port <= h
}

// addrMatches handles "a.b.c.d", "prefix/len" and "addr/mask" (also
// non-contiguous masks, which the dispatch uses).
func addrMatches(a netip.Addr, spec string) bool {
	a = a.Unmap()
	addrS, maskS, found := strings.Cut(spec, "/")
	base, err := netip.ParseAddr(addrS)
	if err != nil || base.BitLen() != a.BitLen() {
		return false
	}
	if !found {
		return a == base
	}
	if bits, err := strconv.Atoi(maskS); err == nil {
		p, err := base.Prefix(bits)
		return err == nil && p.Contains(a)
	}
	mask, err := netip.ParseAddr(maskS)
	if err != nil {
		return false
	}
	ab, bb, mb := a.AsSlice(), base.AsSlice(), mask.AsSlice()
	for i := range ab {
		if ab[i]&mb[i] != bb[i]&mb[i] {
			return false
		}
	}
	return true
}

func (t *Tracer) isLocal(a netip.Addr) bool {
	a = a.Unmap()
	if a.IsLoopback() {
		return true
	}
	for _, l := range t.LocalAddrs {
		if l.Unmap() == a {
			return true
		}
	}
	return false
}
