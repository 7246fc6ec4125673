package iptables

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Canonical spells a rule so that the way this project writes it and the
// way iptables-save prints it back compare equal, which is what telling a
// rule changed behind our back from the kernel's own spelling needs. The
// kernel moves -s, -d, -i, -o and -p to the front, reorders a match's
// options, adds defaults (recent's --mask and --rsource, REJECT's
// --reject-with), prints MARK's
// --or-mark and --xor-mark as --set-xmark and a statistic's probability
// with more digits. Canonical puts the address, interface and protocol
// matches first, sorted; keeps the matches in order (their order decides
// side effects such as recent --set) with their options sorted and
// defaults dropped; and spells the target as the kernel does.
func Canonical(r Rule) string {
	var base []string
	var groups [][]string // a match or the target: its name, then options
	cur := -1
	for i := 0; i < len(r); i++ {
		neg := ""
		if r[i] == "!" && i+1 < len(r) {
			neg, i = "! ", i+1
		}
		a := r[i]
		val := ""
		if i+1 < len(r) {
			val = r[i+1]
		}
		switch a {
		case "-s", "--source", "-d", "--destination", "-i", "--in-interface", "-o", "--out-interface", "-p", "--protocol":
			base = append(base, neg+baseFlag(a)+" "+canonicalValue(a, val))
			i++
			continue
		case "-m", "--match", "-j", "--jump", "-g", "--goto":
			groups = append(groups, []string{baseFlag(a) + " " + val})
			cur = len(groups) - 1
			i++
			continue
		}
		opt := neg + a
		for i+1 < len(r) && !isFlag(r[i+1]) {
			i++
			opt += " " + r[i]
		}
		if cur < 0 {
			// An option before any -m belongs to the protocol's match,
			// which iptables loads by itself ("-p tcp --dport 80").
			groups = append(groups, []string{"-m " + protocolOf(r)})
			cur = len(groups) - 1
		}
		groups[cur] = append(groups[cur], opt)
	}
	slices.Sort(base)
	parts := base
	for _, g := range groups {
		parts = append(parts, canonicalGroup(g))
	}
	return strings.Join(parts, " ")
}

// isFlag says whether an argument starts an option (or negates one) rather
// than being an option's value.
func isFlag(a string) bool {
	return a == "!" || (strings.HasPrefix(a, "-") && len(a) > 1 && (a[1] < '0' || a[1] > '9'))
}

// baseFlag gives the short spelling of the flags iptables-save prints short.
func baseFlag(a string) string {
	switch a {
	case "--source":
		return "-s"
	case "--destination":
		return "-d"
	case "--in-interface":
		return "-i"
	case "--out-interface":
		return "-o"
	case "--protocol":
		return "-p"
	case "--match":
		return "-m"
	case "--jump":
		return "-j"
	case "--goto":
		return "-g"
	}
	return a
}

func protocolOf(r Rule) string {
	for i := 0; i+1 < len(r); i++ {
		if r[i] == "-p" || r[i] == "--protocol" {
			return strings.ToLower(r[i+1])
		}
	}
	return ""
}

// canonicalValue spells an address with its prefix length (a host without
// one gets its full length) and a protocol in lower case.
func canonicalValue(flag, v string) string {
	switch baseFlag(flag) {
	case "-p":
		return strings.ToLower(v)
	case "-s", "-d":
		if !strings.Contains(v, "/") {
			if a, err := netip.ParseAddr(v); err == nil {
				return netip.PrefixFrom(a, a.BitLen()).String()
			}
		}
	}
	return v
}

// canonicalGroup spells one match or target: its name, then its options
// sorted, with the kernel's defaults dropped and its numbers in one form.
func canonicalGroup(g []string) string {
	name := strings.Fields(g[0])[1]
	var opts []string
	for _, o := range g[1:] {
		f := strings.Fields(o)
		switch {
		case name == "recent" && (f[0] == "--rsource" || (f[0] == "--mask" && allOnes(f[1:]))):
			continue
		case name == "REJECT" && (o == "--reject-with icmp-port-unreachable" || o == "--reject-with icmp6-port-unreachable"):
			continue
		case name == "statistic" && f[0] == "--probability" && len(f) == 2:
			if p, err := strconv.ParseFloat(f[1], 64); err == nil {
				o = fmt.Sprintf("--probability %.6f", p)
			}
		case name == "MARK":
			o = canonicalMark(f)
		}
		opts = append(opts, o)
	}
	if !strings.HasPrefix(g[0], "-m") {
		// A target's options keep their order: the kernel prints them so.
		return strings.Join(append([]string{g[0]}, opts...), " ")
	}
	slices.Sort(opts)
	return strings.Join(append([]string{g[0]}, opts...), " ")
}

func allOnes(v []string) bool {
	if len(v) != 1 {
		return false
	}
	a, err := netip.ParseAddr(v[0])
	if err != nil {
		return false
	}
	for _, b := range a.AsSlice() {
		if b != 0xff {
			return false
		}
	}
	return true
}

// canonicalMark spells MARK's options as the kernel prints them:
// --set-xmark value/mask.
func canonicalMark(f []string) string {
	if len(f) != 2 {
		return strings.Join(f, " ")
	}
	v, m, hasMask := strings.Cut(f[1], "/")
	val := parseUint(v)
	switch f[0] {
	case "--or-mark":
		return fmt.Sprintf("--set-xmark 0x%x/0x%x", val, val)
	case "--xor-mark":
		return fmt.Sprintf("--set-xmark 0x%x/0x0", val)
	case "--and-mark":
		return fmt.Sprintf("--set-xmark 0x0/0x%x", ^val)
	case "--set-mark", "--set-xmark":
		mask := uint32(0xffffffff)
		if hasMask {
			mask = parseUint(m)
		}
		return fmt.Sprintf("--set-xmark 0x%x/0x%x", val, mask)
	}
	return strings.Join(f, " ")
}
