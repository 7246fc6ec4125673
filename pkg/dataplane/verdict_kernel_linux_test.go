package dataplane

import (
	"math/rand/v2"
	"regexp"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/iptables/iptablestest"
	"github.com/miniproxy/miniproxy/pkg/rules"
	"github.com/miniproxy/miniproxy/pkg/rules/rulestest"
)

// The fake refuses what the kernel refuses: every recorded verdict holds
// for the real iptables-restore in a fresh namespace and for the Fake.
func TestFakeAndKernelGiveTheRecordedVerdicts(t *testing.T) {
	cases, err := iptablestest.Verdicts()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			ns := enterTestNetns(t)
			kernel, fake := NewRunner(), NewFake()
			for i, input := range c.Inputs {
				ns.check(t)
				kerr := kernel.Restore(c.Family, []byte(input))
				ferr := fake.Restore(c.Family, []byte(input))
				if i < len(c.Inputs)-1 {
					if kerr != nil || ferr != nil {
						t.Fatalf("input %d of %d must be accepted: kernel %v, fake %v", i+1, len(c.Inputs), kerr, ferr)
					}
					continue
				}
				if (kerr == nil) != c.Accept {
					t.Errorf("kernel: recorded %s, got %v", verdict(c.Accept), kerr)
				}
				if (ferr == nil) != (kerr == nil) {
					t.Errorf("fake and kernel disagree:\n  kernel: %v\n  fake:   %v", kerr, ferr)
				}
			}
		})
	}
}

func verdict(accept bool) string {
	if accept {
		return "accept"
	}
	return "refuse"
}

// shapeInput is the full restore input of one family for one Service of
// every shape under one node setting.
type shapeInput struct {
	setting string
	fam     iptables.Family
	text    string
}

// everyShapeInput renders the rules of one Service of every shape, both
// families, as one full restore input per family and node setting (every
// --detect-local-mode, localhost NodePorts; rulestest.EverySetting), the
// ClusterCIDR mode first.
func everyShapeInput(t *testing.T) []shapeInput {
	t.Helper()
	var out []shapeInput
	for _, set := range rulestest.EverySetting("cni0", "veth") {
		for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
			a, cfg := rulestest.Example(fam)
			set.Apply(&cfg)
			rs := rules.Build(rulestest.Snapshot("zone-a", rulestest.EveryShape(a)...), cfg)
			out = append(out, shapeInput{setting: set.Name, fam: fam, text: iptables.RenderComplete(rs)})
		}
	}
	return out
}

// mutation changes one line of a restore input into something the kernel
// may or may not accept; it returns false when the line does not apply.
type mutation struct {
	name string
	fn   func(fam iptables.Family, line string) (string, bool)
}

var (
	protoRE = regexp.MustCompile(` -p (tcp|udp|sctp)`)
	jumpRE  = regexp.MustCompile(` -j (MP-[A-Za-z0-9-]+)`)
	portRE  = regexp.MustCompile(`--dport (\d+)\b`)
	dstRE   = regexp.MustCompile(` -d ([0-9a-f.:]+)/(\d+)`)
)

var mutations = []mutation{
	{"drop the protocol", func(_ iptables.Family, l string) (string, bool) {
		return protoRE.ReplaceAllString(l, ""), protoRE.MatchString(l)
	}},
	{"drop the protocol but keep the port match", func(_ iptables.Family, l string) (string, bool) {
		return strings.Replace(l, " -p tcp -m tcp", " -m tcp", 1), strings.Contains(l, " -p tcp -m tcp")
	}},
	{"jump to an undeclared chain", func(_ iptables.Family, l string) (string, bool) {
		return jumpRE.ReplaceAllString(l, " -j MP-UNDECLARED"), jumpRE.MatchString(l)
	}},
	{"jump to an unknown target", func(_ iptables.Family, l string) (string, bool) {
		return strings.Replace(l, "-j DNAT", "-j DNATX", 1), strings.Contains(l, "-j DNAT")
	}},
	{"a chain name over 28 characters", func(_ iptables.Family, l string) (string, bool) {
		if !strings.HasPrefix(l, ":MP-") {
			return l, false
		}
		return ":MP-A-CHAIN-NAME-MUCH-TOO-LONG-FOR-IPTABLES - [0:0]", true
	}},
	{"a declaration left out", func(_ iptables.Family, l string) (string, bool) {
		return "", strings.HasPrefix(l, ":MP-")
	}},
	{"masquerade where DNAT was", func(_ iptables.Family, l string) (string, bool) {
		i := strings.Index(l, "-j DNAT")
		if i < 0 {
			return l, false
		}
		return l[:i] + "-j MASQUERADE", true
	}},
	{"DNAT where masquerade was", func(fam iptables.Family, l string) (string, bool) {
		to := "10.244.9.9:80"
		if fam == iptables.IPv6 {
			to = "[fd00:244::9]:80"
		}
		return strings.Replace(l, "-j MASQUERADE", "-p tcp -j DNAT --to-destination "+to, 1), strings.Contains(l, "-j MASQUERADE") && !protoRE.MatchString(l)
	}},
	{"drop in nat", func(_ iptables.Family, l string) (string, bool) {
		return strings.Replace(l, "-j DNAT", "-j DROP #", 1), strings.Contains(l, "-j DNAT")
	}},
	{"a TCP reset for UDP", func(_ iptables.Family, l string) (string, bool) {
		return strings.Replace(l, "-j REJECT", "-j REJECT --reject-with tcp-reset", 1), strings.Contains(l, "-p udp") && strings.HasSuffix(l, "-j REJECT")
	}},
	{"a probability above 1", func(_ iptables.Family, l string) (string, bool) {
		return regexp.MustCompile(`--probability [0-9.]+`).ReplaceAllString(l, "--probability 1.5"), strings.Contains(l, "--probability")
	}},
	{"reap without seconds", func(_ iptables.Family, l string) (string, bool) {
		return regexp.MustCompile(` --seconds \d+`).ReplaceAllString(l, ""), strings.Contains(l, "--reap")
	}},
	// TCP only: iptables 1.8.9's udp match takes a port over 65535 and
	// truncates it (70000 becomes 4464); the model refuses it, stricter
	// than the tool for a port miniproxy never writes.
	{"a TCP port out of range", func(_ iptables.Family, l string) (string, bool) {
		return portRE.ReplaceAllString(l, "--dport 70000"), portRE.MatchString(l) && strings.Contains(l, "-p tcp")
	}},
	{"an address of the other family", func(fam iptables.Family, l string) (string, bool) {
		other := " -d fd00::1/128"
		if fam == iptables.IPv6 {
			other = " -d 10.0.0.1/32"
		}
		return dstRE.ReplaceAllString(l, other), dstRE.MatchString(l)
	}},
	{"a rule jumping to its own chain", func(_ iptables.Family, l string) (string, bool) {
		f := strings.Fields(l)
		if len(f) < 2 || f[0] != "-A" || !strings.HasPrefix(f[1], "MP-") || !jumpRE.MatchString(l) {
			return l, false
		}
		return jumpRE.ReplaceAllString(l, " -j "+f[1]), true
	}},
	{"an interface name over 15 characters", func(_ iptables.Family, l string) (string, bool) {
		return regexp.MustCompile(` -i \S+`).ReplaceAllString(l, " -i a-name-too-long-for-linux"), strings.Contains(l, " -i ")
	}},
	{"-i in the built-in chain that jumps to ours", func(_ iptables.Family, l string) (string, bool) {
		return strings.Replace(l, "-A OUTPUT ", "-A OUTPUT -i cni0 ", 1), strings.HasPrefix(l, "-A OUTPUT ")
	}},
	{"a harmless new comment", func(_ iptables.Family, l string) (string, bool) {
		return strings.Replace(l, "-j ", `-m comment --comment "changed by the test" -j `, 1), strings.HasPrefix(l, "-A ") && strings.Contains(l, "-j ")
	}},
}

// The fake and the kernel agree on every rule miniproxy writes and on
// broken variants of them: one Service of every shape, rendered, then one
// line at a time changed in a way the kernel may refuse. Both see the same
// sequence of inputs, so their tables stay alike as long as they agree.
func TestFakeAndKernelAgreeOnEveryShapeAndItsMutations(t *testing.T) {
	ns := enterTestNetns(t)
	kernel, fake := NewRunner(), NewFake()
	rng := rand.New(rand.NewPCG(11, 2026))
	counts := map[bool]int{}
	for n, in := range everyShapeInput(t) {
		fam, base := in.fam, in.text
		ns.check(t)
		if err := kernel.Restore(fam, []byte(base)); err != nil {
			t.Fatalf("%s, %s: the kernel refuses the rules of every shape: %v", fam, in.setting, err)
		}
		if err := fake.Restore(fam, []byte(base)); err != nil {
			t.Fatalf("%s, %s: the fake refuses the rules of every shape: %v", fam, in.setting, err)
		}
		// A few lines per mutation under the first setting, one under
		// each other setting.
		perMutation := 1
		if n < 2 {
			perMutation = 4
		}
		lines := strings.Split(strings.TrimSuffix(base, "\n"), "\n")
		for _, m := range mutations {
			var candidates []int
			for i, l := range lines {
				if _, ok := m.fn(fam, l); ok {
					candidates = append(candidates, i)
				}
			}
			// Chosen reproducibly.
			rng.Shuffle(len(candidates), func(i, j int) { candidates[i], candidates[j] = candidates[j], candidates[i] })
			for _, i := range candidates[:min(perMutation, len(candidates))] {
				mutated := append([]string(nil), lines...)
				mutated[i], _ = m.fn(fam, lines[i])
				input := strings.Join(mutated, "\n") + "\n"
				ns.check(t)
				kerr := kernel.Restore(fam, []byte(input))
				ferr := fake.Restore(fam, []byte(input))
				counts[kerr == nil]++
				if (kerr == nil) != (ferr == nil) {
					t.Errorf("%s, %s, %s, line %d %q -> %q:\n  kernel: %v\n  fake:   %v", fam, in.setting, m.name, i+1, lines[i], mutated[i], kerr, ferr)
				}
			}
		}
	}
	t.Logf("mutations accepted by the kernel: %d, refused: %d", counts[true], counts[false])
	if counts[true] == 0 || counts[false] < 20 {
		t.Errorf("the mutations should include both verdicts, refusals above all: %v", counts)
	}
}
