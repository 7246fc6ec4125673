package iptables

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// This file holds what iptables-restore (1.8, both backends) refuses, so
// that the model refuses the same inputs: a fake that accepts more than the
// kernel hides rules that stall every node. Each refusal below was observed
// with the real tool, and the differential test in pkg/dataplane runs the
// same inputs through both and requires the same verdict. Messages follow
// the tool's wording so that a failing test reads like the kernel's answer.
//
// Matches and targets that this project never writes are not modelled: the
// model refuses them ("Couldn't load match"), which is stricter than the
// kernel but never hides a refusal. Likewise a UDP port over 65535, which
// iptables 1.8.9's udp match takes and truncates (70000 becomes 4464).

// MaxChainName is the longest chain name iptables accepts.
const MaxChainName = 28

// maxIfName is the longest -i/-o argument ("+" included) iptables takes.
const maxIfName = 15

// noInIface and noOutIface are the built-in chains where iptables refuses
// -i or -o: no packet there has an input (output) interface yet. It checks
// only the built-in chain itself; a chain it jumps to may hold -i, which
// then never matches there.
var (
	noInIface  = []string{"OUTPUT", "POSTROUTING"}
	noOutIface = []string{"PREROUTING", "INPUT"}
)

// checkIfaceIn refuses -i or -o in a built-in chain that cannot have them.
func checkIfaceIn(table Table, chain string, p *parsedRule) error {
	if !IsBuiltin(table, chain) {
		return nil
	}
	switch {
	case p.inIface && contains(noInIface, chain):
		return fmt.Errorf("Can't use -i with %s", chain)
	case p.outIface && contains(noOutIface, chain):
		return fmt.Errorf("Can't use -o with %s", chain)
	}
	return nil
}

// maxJumpDepth is how deep jumps from a built-in chain may nest; nf_tables
// and x_tables refuse deeper rulesets as they refuse loops.
const maxJumpDepth = 16

// checkChainName refuses names iptables-restore refuses at declaration.
func checkChainName(name string) error {
	switch {
	case len(name) > MaxChainName:
		return fmt.Errorf("chain name `%s' too long (must be under %d chars)", name, MaxChainName+1)
	case strings.HasPrefix(name, "-"):
		return fmt.Errorf("chain name not allowed to start with `-'")
	}
	return nil
}

// optSpec describes one option of a match or target.
type optSpec struct {
	nargs int
	// check validates the option's arguments; nil accepts anything.
	check func(fam Family, args []string) error
}

// extension is a match or target module: its options under their long
// names (aliases map to the same spec through canonical) and the checks made
// once the whole rule is read.
type extension struct {
	opts      map[string]optSpec
	canonical map[string]string
	final     func(r *parsedRule, e *instance) error
	// tables restricts a target to some tables; nil allows all.
	tables []Table
	// hooks restricts a target to chains reached from these built-in
	// chains (the kernel checks it when a jump links the chain to them).
	hooks []string
}

// instance is one use of an extension in a rule, with the options it got.
type instance struct {
	name string
	ext  *extension
	set  map[string][]string
}

func (e *instance) has(opt string) bool { _, ok := e.set[opt]; return ok }

// parsedRule is what parseRule learnt about a rule.
type parsedRule struct {
	fam      Family
	table    Table
	proto    string // as given to -p, lower case; "" when absent
	protoNeg bool
	matches  []*instance
	target   *instance // nil for a jump to a chain or no target
	jumpTo   string    // the -j/-g argument
	inIface  bool      // has -i
	outIface bool      // has -o
}

// protocols iptables knows by name; numbers 0-255 are accepted too.
var protocols = map[string]bool{
	"tcp": true, "udp": true, "udplite": true, "icmp": true, "icmpv6": true, "ipv6-icmp": true,
	"esp": true, "ah": true, "sctp": true, "dccp": true, "mh": true, "all": true,
}

// portProtocols are the protocols whose ports DNAT, MASQUERADE and
// multiport can use.
var portProtocols = map[string]bool{"tcp": true, "udp": true, "sctp": true, "dccp": true, "udplite": true}

func checkPort(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("invalid port/service `%s' specified", s)
	}
	return nil
}

func checkPortRange(s string) error {
	lo, hi, isRange := strings.Cut(s, ":")
	if err := checkPort(lo); err != nil && !(isRange && lo == "") {
		return err
	}
	if isRange && hi != "" {
		if err := checkPort(hi); err != nil {
			return err
		}
		a, _ := strconv.Atoi(lo)
		b, _ := strconv.Atoi(hi)
		if lo != "" && a > b {
			return fmt.Errorf("invalid portrange (min > max)")
		}
	}
	return nil
}

func oneArg(f func(string) error) func(Family, []string) error {
	return func(_ Family, a []string) error { return f(a[0]) }
}

func checkList(what string, allowed map[string]bool) func(Family, []string) error {
	return func(_ Family, a []string) error {
		for _, v := range strings.Split(a[0], ",") {
			if !allowed[strings.ToUpper(v)] {
				return fmt.Errorf("%s %q", what, v)
			}
		}
		return nil
	}
}

func checkUint(what string) func(Family, []string) error {
	return oneArg(func(s string) error {
		if _, err := strconv.ParseUint(s, 0, 32); err != nil {
			return fmt.Errorf("%s: bad value %q", what, s)
		}
		return nil
	})
}

// checkMark accepts value[/mask], each a 32-bit number (hex or decimal).
func checkMark(what string) func(Family, []string) error {
	return oneArg(func(s string) error {
		v, m, hasMask := strings.Cut(s, "/")
		if _, err := strconv.ParseUint(v, 0, 32); err != nil {
			return fmt.Errorf("%s: bad value %q", what, s)
		}
		if hasMask {
			if _, err := strconv.ParseUint(m, 0, 32); err != nil {
				return fmt.Errorf("%s: bad mask %q", what, s)
			}
		}
		return nil
	})
}

// parseAddr reads an address of the family, as -s, -d and the NAT targets
// take it (no host names: this project never writes them).
func parseAddr(fam Family, s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil || a.Is4() != (fam == IPv4) || a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("host/network `%s' not found", s)
	}
	return a, nil
}

// checkNetwork accepts addr, addr/len and addr/mask (masks need not be
// contiguous) of the family.
func checkNetwork(fam Family, s string) error {
	a, m, hasMask := strings.Cut(s, "/")
	if _, err := parseAddr(fam, a); err != nil {
		return err
	}
	if !hasMask {
		return nil
	}
	bits := 32
	if fam == IPv6 {
		bits = 128
	}
	if n, err := strconv.Atoi(m); err == nil {
		if n < 0 || n > bits {
			return fmt.Errorf("invalid mask `%s' specified", m)
		}
		return nil
	}
	if _, err := parseAddr(fam, m); err != nil {
		return fmt.Errorf("invalid mask `%s' specified", m)
	}
	return nil
}

// checkNATRange reads a DNAT/SNAT range: addr[-addr][:port[-port]], with
// IPv6 addresses in brackets when a port follows. It says whether a port
// was given.
func checkNATRange(fam Family, s string) (hasPort bool, err error) {
	addrs, ports := s, ""
	if fam == IPv6 {
		if strings.HasPrefix(s, "[") {
			end := strings.Index(s, "]")
			if end < 0 {
				return false, fmt.Errorf("Invalid address format")
			}
			addrs, ports = s[1:end], strings.TrimPrefix(s[end+1:], ":")
			if ports == "" && len(s) > end+1 {
				return false, fmt.Errorf("Invalid address format")
			}
		}
	} else if i := strings.Index(s, ":"); i >= 0 {
		addrs, ports = s[:i], s[i+1:]
	}
	if addrs != "" {
		lo, hi, isRange := strings.Cut(addrs, "-")
		for _, a := range []string{lo, hi} {
			if a == hi && !isRange {
				continue
			}
			if _, err := parseAddr(fam, a); err != nil {
				return false, fmt.Errorf("Invalid address format")
			}
		}
	}
	if ports == "" {
		return false, nil
	}
	lo, hi, isRange := strings.Cut(ports, "-")
	if err := checkPort(lo); err != nil {
		return false, fmt.Errorf("Port `%s' not valid", ports)
	}
	if isRange {
		if err := checkPort(hi); err != nil {
			return false, fmt.Errorf("Port `%s' not valid", ports)
		}
	}
	return true, nil
}

func needsProto(name, proto string) func(*parsedRule, *instance) error {
	return func(r *parsedRule, _ *instance) error {
		if r.proto != proto || r.protoNeg {
			return fmt.Errorf("%s match requires '-p %s'", strings.ToUpper(name), proto)
		}
		return nil
	}
}

// portMatch is the tcp, udp or sctp match: ports, plus the options only
// that protocol has.
func portMatch(name string, more map[string]optSpec) *extension {
	port := optSpec{1, oneArg(checkPortRange)}
	opts := map[string]optSpec{"--dport": port, "--sport": port}
	for k, v := range more {
		opts[k] = v
	}
	return &extension{
		opts:      opts,
		canonical: map[string]string{"--destination-port": "--dport", "--source-port": "--sport"},
		final:     needsProto(name, name),
	}
}

var ctStates = map[string]bool{"INVALID": true, "NEW": true, "ESTABLISHED": true, "RELATED": true, "UNTRACKED": true, "SNAT": true, "DNAT": true}

var addrTypes = map[string]bool{
	"UNSPEC": true, "UNICAST": true, "LOCAL": true, "BROADCAST": true, "ANYCAST": true, "MULTICAST": true,
	"BLACKHOLE": true, "UNREACHABLE": true, "PROHIBIT": true, "THROW": true, "NAT": true, "XRESOLVE": true,
}

// matches are the match modules the model knows.
var matches = map[string]*extension{
	"comment": {opts: map[string]optSpec{"--comment": {1, nil}}},
	"tcp":     portMatch("tcp", map[string]optSpec{"--tcp-flags": {2, nil}, "--syn": {0, nil}}),
	"udp":     portMatch("udp", nil),
	"sctp":    portMatch("sctp", nil),
	"multiport": {
		opts: map[string]optSpec{
			"--dports": {1, oneArg(checkPortList)}, "--sports": {1, oneArg(checkPortList)}, "--ports": {1, oneArg(checkPortList)},
		},
		canonical: map[string]string{"--destination-ports": "--dports", "--source-ports": "--sports"},
		final: func(r *parsedRule, _ *instance) error {
			if !portProtocols[r.proto] || r.protoNeg {
				return fmt.Errorf("multiport needs `-p tcp', `-p udp', `-p udplite', `-p sctp' or `-p dccp'")
			}
			return nil
		},
	},
	"conntrack": {opts: map[string]optSpec{
		"--ctstate": {1, checkList("Bad ctstate", ctStates)}, "--ctstatus": {1, nil}, "--ctproto": {1, nil},
		"--ctorigsrc": {1, nil}, "--ctorigdst": {1, nil}, "--ctreplsrc": {1, nil}, "--ctrepldst": {1, nil},
		"--ctorigsrcport": {1, nil}, "--ctorigdstport": {1, nil}, "--ctreplsrcport": {1, nil}, "--ctrepldstport": {1, nil},
		"--ctdir": {1, nil}, "--ctexpire": {1, nil},
	}},
	"state": {opts: map[string]optSpec{"--state": {1, checkList("Bad state", ctStates)}}},
	"mark":  {opts: map[string]optSpec{"--mark": {1, checkMark("mark")}}},
	"addrtype": {opts: map[string]optSpec{
		"--src-type": {1, checkList("addrtype: bad type", addrTypes)}, "--dst-type": {1, checkList("addrtype: bad type", addrTypes)},
		"--limit-iface-in": {0, nil}, "--limit-iface-out": {0, nil},
	}},
	"statistic": {
		opts: map[string]optSpec{
			"--mode":        {1, oneArg(checkStatisticMode)},
			"--probability": {1, oneArg(checkProbability)},
			"--every":       {1, checkUint("statistic: --every")},
			"--packet":      {1, checkUint("statistic: --packet")},
		},
		final: func(_ *parsedRule, e *instance) error {
			switch {
			case !e.has("--mode"):
				return fmt.Errorf("statistic: option \"--mode\" must be specified")
			case e.set["--mode"][0] == "random" && !e.has("--probability"):
				return fmt.Errorf("statistic: option \"--probability\" must be specified with --mode random")
			case e.set["--mode"][0] == "nth" && !e.has("--every"):
				return fmt.Errorf("statistic: option \"--every\" must be specified with --mode nth")
			}
			return nil
		},
	},
	"recent": {
		opts: map[string]optSpec{
			"--name": {1, nil}, "--set": {0, nil}, "--rcheck": {0, nil}, "--update": {0, nil}, "--remove": {0, nil},
			"--seconds": {1, checkUint("recent: --seconds")}, "--reap": {0, nil}, "--hitcount": {1, checkUint("recent: --hitcount")},
			"--rttl": {0, nil}, "--rsource": {0, nil}, "--rdest": {0, nil}, "--mask": {1, nil},
		},
		final: checkRecent,
	},
}

func checkPortList(s string) error {
	ports := strings.Split(s, ",")
	if len(ports) > 15 {
		return fmt.Errorf("too many ports specified")
	}
	for _, p := range ports {
		if err := checkPortRange(p); err != nil {
			return err
		}
	}
	return nil
}

func checkStatisticMode(s string) error {
	if s != "random" && s != "nth" {
		return fmt.Errorf("statistic: bad mode %q", s)
	}
	return nil
}

func checkProbability(s string) error {
	p, err := strconv.ParseFloat(s, 64)
	if err != nil || p < 0 || p > 1 {
		return fmt.Errorf("statistic: bad value for option \"--probability\", or out of range (0-1).")
	}
	return nil
}

func checkRecent(_ *parsedRule, e *instance) error {
	var cmds []string
	for _, c := range []string{"--set", "--rcheck", "--update", "--remove"} {
		if e.has(c) {
			cmds = append(cmds, c)
		}
	}
	switch {
	case len(cmds) > 1:
		return fmt.Errorf("recent: option %q cannot be used together with %q.", cmds[1], cmds[0])
	case len(cmds) == 0:
		return fmt.Errorf("recent: you must specify one of `--set', `--rcheck' `--update' or `--remove'")
	case e.has("--reap") && !e.has("--seconds"):
		return fmt.Errorf("recent: option \"--reap\" also requires \"--seconds\".")
	}
	return nil
}

var rejectTypes = map[Family]map[string]bool{
	IPv4: {
		"icmp-net-unreachable": true, "net-unreach": true, "icmp-host-unreachable": true, "host-unreach": true,
		"icmp-proto-unreachable": true, "proto-unreach": true, "icmp-port-unreachable": true, "port-unreach": true,
		"icmp-net-prohibited": true, "net-prohib": true, "icmp-host-prohibited": true, "host-prohib": true,
		"icmp-admin-prohibited": true, "admin-prohib": true, "tcp-reset": true, "tcp-rst": true,
	},
	IPv6: {
		"icmp6-no-route": true, "no-route": true, "icmp6-adm-prohibited": true, "adm-prohibited": true,
		"icmp6-addr-unreachable": true, "addr-unreach": true, "icmp6-port-unreachable": true, "port-unreach": true,
		"icmp6-policy-fail": true, "policy-fail": true, "icmp6-reject-route": true, "reject-route": true,
		"tcp-reset": true, "tcp-rst": true,
	},
}

// natPortNeedsProto is the check DNAT, SNAT and MASQUERADE make: a port in
// the translation needs a protocol that has ports.
func natPortNeedsProto(r *parsedRule) error {
	if !portProtocols[r.proto] || r.protoNeg {
		return fmt.Errorf("Need TCP, UDP, SCTP or DCCP with port specification")
	}
	return nil
}

func natTarget(opt string, hooks ...string) *extension {
	return &extension{
		opts:   map[string]optSpec{opt: {1, nil}, "--random": {0, nil}, "--persistent": {0, nil}, "--random-fully": {0, nil}},
		tables: []Table{NAT},
		hooks:  hooks,
		final: func(r *parsedRule, e *instance) error {
			v, ok := e.set[opt]
			if !ok {
				return fmt.Errorf("%s: option %q is required", strings.ToUpper(e.name), opt)
			}
			hasPort, err := checkNATRange(r.fam, v[0])
			if err != nil {
				return err
			}
			if hasPort {
				return natPortNeedsProto(r)
			}
			return nil
		},
	}
}

// targets are the non-chain targets the model knows.
var targets = map[string]*extension{
	"ACCEPT": {},
	"DROP": {final: func(r *parsedRule, _ *instance) error {
		if r.table == NAT {
			return fmt.Errorf("The \"nat\" table is not intended for filtering, the use of DROP is therefore inhibited.")
		}
		return nil
	}},
	"RETURN": {},
	"REJECT": {
		opts: map[string]optSpec{"--reject-with": {1, func(fam Family, a []string) error {
			if !rejectTypes[fam][a[0]] {
				return fmt.Errorf("unknown reject type %q", a[0])
			}
			return nil
		}}},
		tables: []Table{Filter},
		hooks:  []string{"INPUT", "FORWARD", "OUTPUT"},
		final: func(r *parsedRule, e *instance) error {
			if w := e.set["--reject-with"]; w != nil && (w[0] == "tcp-reset" || w[0] == "tcp-rst") && (r.proto != "tcp" || r.protoNeg) {
				return fmt.Errorf("RULE_APPEND failed (Invalid argument): REJECT --reject-with tcp-reset needs -p tcp")
			}
			return nil
		},
	},
	"DNAT": natTarget("--to-destination", "PREROUTING", "OUTPUT"),
	"SNAT": natTarget("--to-source", "POSTROUTING", "INPUT"),
	"MASQUERADE": {
		opts:   map[string]optSpec{"--to-ports": {1, nil}, "--random": {0, nil}, "--random-fully": {0, nil}},
		tables: []Table{NAT},
		hooks:  []string{"POSTROUTING"},
		final: func(r *parsedRule, e *instance) error {
			if e.has("--to-ports") {
				return natPortNeedsProto(r)
			}
			return nil
		},
	},
	"MARK": {
		opts: map[string]optSpec{
			"--set-xmark": {1, checkMark("MARK")}, "--set-mark": {1, checkMark("MARK")},
			"--and-mark": {1, checkMark("MARK")}, "--or-mark": {1, checkMark("MARK")}, "--xor-mark": {1, checkMark("MARK")},
		},
		final: func(_ *parsedRule, e *instance) error {
			if len(e.set) != 1 {
				return fmt.Errorf("MARK: One of the --set-xmark, --{and,or,xor,set}-mark options is required")
			}
			return nil
		},
	},
}

func (e *extension) option(name string) (string, optSpec, bool) {
	if c, ok := e.canonical[name]; ok {
		name = c
	}
	spec, ok := e.opts[name]
	return name, spec, ok
}

func parseRule(fam Family, table Table, args Rule) (*parsedRule, error) {
	r := &parsedRule{fam: fam, table: table}
	value := func(i int, opt string) (string, error) {
		if i >= len(args) {
			return "", fmt.Errorf("option %q requires an argument", opt)
		}
		return args[i], nil
	}
	for i := 0; i < len(args); i++ {
		a := args[i]
		neg := false
		if a == "!" {
			neg = true
			i++
			if i >= len(args) {
				return nil, fmt.Errorf("unexpected end of rule after `!'")
			}
			a = args[i]
		}
		switch a {
		case "-p", "--protocol":
			i++
			v, err := value(i, a)
			if err != nil {
				return nil, err
			}
			v = strings.ToLower(v)
			if n, err := strconv.Atoi(v); !protocols[v] && (err != nil || n < 0 || n > 255) {
				return nil, fmt.Errorf("unknown protocol %q specified", v)
			}
			if v == "6" {
				v = "tcp"
			} else if v == "17" {
				v = "udp"
			} else if v == "132" {
				v = "sctp"
			}
			r.proto, r.protoNeg = v, neg
		case "-s", "--source", "-d", "--destination":
			i++
			v, err := value(i, a)
			if err != nil {
				return nil, err
			}
			if err := checkNetwork(fam, v); err != nil {
				return nil, err
			}
		case "-i", "--in-interface", "-o", "--out-interface":
			i++
			v, err := value(i, a)
			if err != nil {
				return nil, err
			}
			if len(v) > maxIfName {
				return nil, fmt.Errorf("interface name `%s' must be shorter than IFNAMSIZ (%d)", v, maxIfName)
			}
			if a == "-i" || a == "--in-interface" {
				r.inIface = true
			} else {
				r.outIface = true
			}
		case "-m", "--match":
			i++
			v, err := value(i, a)
			if err != nil {
				return nil, err
			}
			ext, ok := matches[v]
			if !ok {
				return nil, fmt.Errorf("Couldn't load match `%s':No such file or directory", v)
			}
			r.matches = append(r.matches, &instance{name: v, ext: ext, set: map[string][]string{}})
		case "-j", "--jump", "-g", "--goto":
			i++
			v, err := value(i, a)
			if err != nil {
				return nil, err
			}
			if r.jumpTo != "" {
				return nil, fmt.Errorf("multiple -j flags not allowed")
			}
			r.jumpTo = v
			if ext, ok := targets[v]; ok && (a == "-j" || a == "--jump") {
				r.target = &instance{name: v, ext: ext, set: map[string][]string{}}
			}
		default:
			if !strings.HasPrefix(a, "-") {
				return nil, fmt.Errorf("Bad argument `%s'", a)
			}
			owner, name, spec := r.ownerOf(a)
			if owner == nil {
				return nil, fmt.Errorf("unknown option %q", a)
			}
			if i+spec.nargs > len(args)-1 {
				return nil, fmt.Errorf("option %q requires an argument", a)
			}
			vals := append([]string(nil), args[i+1:i+1+spec.nargs]...)
			i += spec.nargs
			if _, dup := owner.set[name]; dup {
				return nil, fmt.Errorf("%s: option %q can only be used once", owner.name, a)
			}
			if spec.check != nil {
				if err := spec.check(fam, vals); err != nil {
					return nil, err
				}
			}
			owner.set[name] = vals
		}
	}
	// The target is checked before the matches, as iptables does.
	if r.target != nil {
		if t := r.target.ext.tables; t != nil && !contains(t, table) {
			return nil, fmt.Errorf("RULE_APPEND failed (Invalid argument): target %s is not valid in table %s", r.target.name, table)
		}
		if r.target.ext.final != nil {
			if err := r.target.ext.final(r, r.target); err != nil {
				return nil, err
			}
		}
	}
	for _, m := range r.matches {
		if m.ext.final != nil {
			if err := m.ext.final(r, m); err != nil {
				return nil, err
			}
		}
	}
	return r, nil
}

// ownerOf finds the extension an option belongs to: the target first, then
// the matches from the last one loaded; failing that, iptables loads the
// match named after the rule's protocol (so "-p tcp --dport 80" works
// without "-m tcp").
func (r *parsedRule) ownerOf(opt string) (*instance, string, optSpec) {
	if r.target != nil {
		if name, spec, ok := r.target.ext.option(opt); ok {
			return r.target, name, spec
		}
	}
	for i := len(r.matches) - 1; i >= 0; i-- {
		if name, spec, ok := r.matches[i].ext.option(opt); ok {
			return r.matches[i], name, spec
		}
	}
	if ext, ok := matches[r.proto]; ok && r.proto != "" && r.target == nil {
		if name, spec, ok := ext.option(opt); ok {
			m := &instance{name: r.proto, ext: ext, set: map[string][]string{}}
			r.matches = append(r.matches, m)
			return m, name, spec
		}
	}
	return nil, "", optSpec{}
}

func contains[T comparable](list []T, s T) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// checkReach makes the checks the kernel makes on the chains reachable from
// the built-in chains of a table: no loops, no deeper nesting than it
// allows, and targets only where they are valid (DNAT only on the way from
// PREROUTING or OUTPUT, for example). Chains nothing jumps to are checked
// once something does, as in the kernel.
func checkReach(table Table, tab Chains) error {
	for _, base := range builtinChains[table] {
		if _, ok := tab[base]; !ok {
			continue
		}
		w := reachWalk{table: table, tab: tab, hook: base, onPath: map[string]bool{}, done: map[string]bool{}}
		if err := w.walk(base, 0); err != nil {
			return err
		}
	}
	return nil
}

// reachWalk visits the chains reachable from one built-in chain.
type reachWalk struct {
	table        Table
	hook         string
	tab          Chains
	onPath, done map[string]bool
}

func (w *reachWalk) walk(chain string, depth int) error {
	if w.onPath[chain] || depth > maxJumpDepth {
		return fmt.Errorf("RULE_APPEND failed (Too many links): chain %s loops or nests too deep below %s", chain, w.hook)
	}
	if w.done[chain] {
		return nil
	}
	hook := w.hook
	w.onPath[chain] = true
	defer delete(w.onPath, chain)
	for _, r := range w.tab[chain].Rules {
		t := r.Target()
		if ext, ok := targets[t]; ok {
			if ext.hooks != nil && !contains(ext.hooks, hook) {
				return fmt.Errorf("RULE_APPEND failed (Invalid argument): %s in chain %s is reached from %s, where it is not valid", t, chain, hook)
			}
			continue
		}
		if _, ok := w.tab[t]; ok && t != "" {
			if err := w.walk(t, depth+1); err != nil {
				return err
			}
		}
	}
	w.done[chain] = true
	return nil
}
