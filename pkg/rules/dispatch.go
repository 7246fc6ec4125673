package rules

import (
	"fmt"
	"net/netip"
	"sort"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// vipDispatch spreads rules keyed by a destination address over leaf chains
// chosen by the address's last byte, reached through a first level on its
// low nibble. Service addresses are allocated at random, so leaves fill
// evenly: at 10,000 Services a leaf holds about 40 entries and a packet walks
// at most 16 + 16 rules before its leaf. The shape depends only on which
// last bytes are in use, so one Service's change rewrites its leaf alone.
type vipDispatch struct {
	prefix string
	family iptables.Family
	leaves map[byte][]iptables.Rule
}

func newVIPDispatch(prefix string, fam iptables.Family) *vipDispatch {
	return &vipDispatch{prefix: prefix, family: fam, leaves: map[byte][]iptables.Rule{}}
}

func (d *vipDispatch) add(ip netip.Addr, rules ...iptables.Rule) {
	b := ip.As16()[15]
	d.leaves[b] = append(d.leaves[b], rules...)
}

// masked spells "last byte equals value under mask" as an iptables address
// with a (non-contiguous) mask, e.g. 0.0.0.7/0.0.0.15 or ::7/::f.
func (d *vipDispatch) masked(value, mask byte) string {
	if d.family == iptables.IPv6 {
		var v, m [16]byte
		v[15], m[15] = value, mask
		return netip.AddrFrom16(v).String() + "/" + netip.AddrFrom16(m).String()
	}
	return netip.AddrFrom4([4]byte{0, 0, 0, value}).String() + "/" + netip.AddrFrom4([4]byte{0, 0, 0, mask}).String()
}

func (d *vipDispatch) level1Name(low byte) string { return fmt.Sprintf("%sX%X", d.prefix, low) }
func (d *vipDispatch) leafName(b byte) string     { return fmt.Sprintf("%s%02X", d.prefix, b) }

func (d *vipDispatch) usedBytes() []int {
	used := make([]int, 0, len(d.leaves))
	for b := range d.leaves {
		used = append(used, int(b))
	}
	sort.Ints(used)
	return used
}

// topRules are the rules of the entry chain: one per low nibble in use.
func (d *vipDispatch) topRules() []iptables.Rule {
	seen := map[byte]bool{}
	var out []iptables.Rule
	for low := byte(0); low < 16; low++ {
		for _, b := range d.usedBytes() {
			if byte(b)&0xf == low && !seen[low] {
				seen[low] = true
				out = append(out, iptables.Rule{"-d", d.masked(low, 0x0f), "-j", d.level1Name(low)})
			}
		}
	}
	return out
}

// chains are the level-1 chains followed by the leaves.
func (d *vipDispatch) chains() []iptables.Chain {
	level1 := map[byte]*iptables.Chain{}
	var order []byte
	for _, bi := range d.usedBytes() {
		b := byte(bi)
		low := b & 0xf
		c, ok := level1[low]
		if !ok {
			c = &iptables.Chain{Name: d.level1Name(low)}
			level1[low] = c
			order = append(order, low)
		}
		c.Rules = append(c.Rules, iptables.Rule{"-d", d.masked(b, 0xff), "-j", d.leafName(b)})
	}
	sort.Slice(order, func(i, j int) bool { return order[i] < order[j] })
	var out []iptables.Chain
	for _, low := range order {
		out = append(out, *level1[low])
	}
	for _, b := range d.usedBytes() {
		out = append(out, iptables.Chain{Name: d.leafName(byte(b)), Rules: d.leaves[byte(b)]})
	}
	return out
}

// portBlock is the width of a NodePort leaf: the default NodePort range
// (30000-32767) spans 44 blocks.
const portBlock = 64

type portKey struct {
	proto string
	port  int
}

// portDispatch spreads rules keyed by (protocol, destination port) over leaf
// chains of 64 ports each.
type portDispatch struct {
	prefix string
	leaves map[portKey][]iptables.Rule // keyed by protocol and block start
}

func newPortDispatch(prefix string) *portDispatch {
	return &portDispatch{prefix: prefix, leaves: map[portKey][]iptables.Rule{}}
}

func (d *portDispatch) add(k portKey, rules ...iptables.Rule) {
	block := portKey{proto: k.proto, port: k.port / portBlock * portBlock}
	d.leaves[block] = append(d.leaves[block], rules...)
}

func (d *portDispatch) sortedBlocks() []portKey {
	keys := make([]portKey, 0, len(d.leaves))
	for k := range d.leaves {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].proto != keys[j].proto {
			return keys[i].proto < keys[j].proto
		}
		return keys[i].port < keys[j].port
	})
	return keys
}

func (d *portDispatch) leafName(k portKey) string {
	return fmt.Sprintf("%s%s-%d", d.prefix, k.proto, k.port)
}

func (d *portDispatch) topRules() []iptables.Rule {
	var out []iptables.Rule
	for _, k := range d.sortedBlocks() {
		out = append(out, iptables.Rule{"-p", k.proto, "-m", k.proto, "--dport", fmt.Sprintf("%d:%d", k.port, k.port+portBlock-1), "-j", d.leafName(k)})
	}
	return out
}

func (d *portDispatch) chains() []iptables.Chain {
	var out []iptables.Chain
	for _, k := range d.sortedBlocks() {
		out = append(out, iptables.Chain{Name: d.leafName(k), Rules: d.leaves[k]})
	}
	return out
}
