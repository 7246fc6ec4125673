package main

import (
	"encoding/binary"
	"net/netip"
	"strconv"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// natTable is the nat table of an iptables-save output, parsed just enough
// to follow a new TCP connection from a pod to a ClusterIP through it: which
// rules the kernel examines, in order, until the DNAT. Its count ("depth")
// explains the first-packet latency: upstream walks its KUBE-SERVICES list
// linearly, miniproxy its two dispatch levels and one leaf.
type natTable struct {
	chains map[string][]natRule
	dnats  map[string]bool // every --to-destination seen
	rules  int
}

type natRule struct {
	dst, dstMask uint32
	hasDst       bool
	negDst       bool
	src, srcMask uint32
	hasSrc       bool
	negSrc       bool
	proto        string
	negProto     bool
	dportLo      int
	dportHi      int
	hasDport     bool
	negDport     bool
	never        bool // a match a pod's new TCP connection to a ClusterIP never meets (addrtype LOCAL, a mark, recent)
	target       string
}

func parseNAT(save string) *natTable {
	t := &natTable{chains: map[string][]natRule{}, dnats: map[string]bool{}}
	inNAT := false
	for _, line := range strings.Split(save, "\n") {
		switch {
		case strings.HasPrefix(line, "*"):
			inNAT = line == "*nat"
			continue
		case !inNAT:
			continue
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			if _, ok := t.chains[name]; !ok {
				t.chains[name] = nil
			}
			continue
		case !strings.HasPrefix(line, "-A "):
			continue
		}
		toks, err := iptables.SplitArgs(line)
		if err != nil || len(toks) < 2 {
			continue
		}
		chain := toks[1]
		r := natRule{}
		neg := false
		for i := 2; i < len(toks); i++ {
			tok := toks[i]
			next := func() string {
				if i+1 < len(toks) {
					i++
					return toks[i]
				}
				return ""
			}
			switch tok {
			case "!":
				neg = true
				continue
			case "-d", "--destination":
				r.dst, r.dstMask = parseAddrMask(next())
				r.hasDst, r.negDst = true, neg
			case "-s", "--source":
				r.src, r.srcMask = parseAddrMask(next())
				r.hasSrc, r.negSrc = true, neg
			case "-p", "--protocol":
				r.proto, r.negProto = next(), neg
			case "--dport", "--destination-port":
				lo, hi, _ := strings.Cut(next(), ":")
				r.dportLo, _ = strconv.Atoi(lo)
				r.dportHi = r.dportLo
				if hi != "" {
					r.dportHi, _ = strconv.Atoi(hi)
				}
				r.hasDport, r.negDport = true, neg
			case "--dst-type", "--src-type":
				// Service traffic from a pod is neither from nor to a
				// local address.
				if next() == "LOCAL" && !neg {
					r.never = true
				}
			case "--mark", "--rcheck", "--update":
				if !neg {
					r.never = true
				}
			case "-j", "-g":
				r.target = next()
			case "--to-destination":
				t.dnats[next()] = true
			}
			neg = false
		}
		t.chains[chain] = append(t.chains[chain], r)
		t.rules++
	}
	return t
}

// parseAddrMask parses "10.96.0.1/32", "10.244.0.0/16" or a dotted mask as
// in "0.0.0.7/0.0.0.15".
func parseAddrMask(s string) (addr, mask uint32) {
	a, m, hasMask := strings.Cut(s, "/")
	ip, err := netip.ParseAddr(a)
	if err != nil || !ip.Is4() {
		return 0, 0xffffffff
	}
	b := ip.As4()
	addr = binary.BigEndian.Uint32(b[:])
	mask = 0xffffffff
	if hasMask {
		if bits, err := strconv.Atoi(m); err == nil {
			mask = 0
			if bits > 0 {
				mask = ^uint32(0) << (32 - bits)
			}
		} else if mip, err := netip.ParseAddr(m); err == nil && mip.Is4() {
			mb := mip.As4()
			mask = binary.BigEndian.Uint32(mb[:])
		}
	}
	return addr & mask, mask
}

func u32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

// depth walks a new TCP connection from src to dst:port through PREROUTING
// and returns how many rules were examined when its first DNAT rule was
// reached, or found false when none was. statistic matches count as taken,
// so the figure is the walk to the first endpoint's rule.
func (t *natTable) depth(src, dst netip.Addr, port int) (int, bool) {
	n := 0
	s, d := u32(src), u32(dst)
	var walk func(chain string, level int) (done, found bool)
	walk = func(chain string, level int) (bool, bool) {
		if level > 20 {
			return true, false
		}
		rules := t.chains[chain]
		for i := range rules {
			r := &rules[i]
			n++
			if !r.matches(s, d, port) {
				continue
			}
			switch r.target {
			case "DNAT":
				return true, true
			case "RETURN":
				return false, false
			case "ACCEPT", "DROP", "REJECT":
				return true, false
			}
			if _, ok := t.chains[r.target]; ok {
				if done, found := walk(r.target, level+1); done {
					return true, found
				}
			}
		}
		return false, false
	}
	_, found := walk("PREROUTING", 0)
	return n, found
}

func (r *natRule) matches(src, dst uint32, port int) bool {
	if r.never {
		return false
	}
	if r.hasDst && ((dst&r.dstMask == r.dst) == r.negDst) {
		return false
	}
	if r.hasSrc && ((src&r.srcMask == r.src) == r.negSrc) {
		return false
	}
	if r.proto != "" && ((r.proto == "tcp" || r.proto == "6") == r.negProto) {
		return false
	}
	if r.hasDport && ((port >= r.dportLo && port <= r.dportHi) == r.negDport) {
		return false
	}
	return true
}
