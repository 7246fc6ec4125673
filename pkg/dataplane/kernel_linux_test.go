package dataplane

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// foreignInput puts another program's rules into a namespace: a user chain
// with a rule, a masquerade rule in nat POSTROUTING, an ACCEPT in filter
// INPUT and a mark in mangle. Everything this package does must leave them
// alone.
func foreignInput(family iptables.Family) string {
	src := "10.9.0.0/16"
	if family == iptables.IPv6 {
		src = "fd00:9::/64"
	}
	return dedent(`
		*mangle
		-A PREROUTING -p tcp -m tcp --dport 7 -j MARK --set-xmark 0x7/0xffffffff
		COMMIT
		*nat
		-A POSTROUTING -s ` + src + ` -j MASQUERADE
		COMMIT
		*filter
		:FOREIGN - [0:0]
		-A INPUT -j ACCEPT
		-A INPUT -j FOREIGN
		-A FOREIGN -p tcp -m tcp --dport 22 -j ACCEPT
		COMMIT
		`)
}

// chainRules returns the "-A" lines of table's chain in a normalised save.
func chainRules(save, table, chain string) []string {
	var out []string
	cur := ""
	for _, l := range strings.Split(save, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			cur = l[1:]
		case cur == table && strings.HasPrefix(l, "-A "+chain+" "):
			out = append(out, l)
		}
	}
	return out
}

// changedRuleset is testRuleset with MP-SVC-A changed, MP-SVC-B gone and
// MP-SVC-C new.
func changedRuleset(t testing.TB, family iptables.Family) *iptables.Ruleset {
	c, port := "10.96.0.3/32", "10.244.2.7:80"
	if family == iptables.IPv6 {
		c, port = "fd00:96::3/128", "[fd00:244::7]:80"
	}
	return testRuleset(t, family, func(rs *iptables.Ruleset) {
		nat := &rs.Tables[0]
		nat.Chains[0].Rules[1] = rule(t, "-d "+c+" -p tcp -m tcp --dport 80 -j MP-SVC-C")
		nat.Chains[1] = chain(t, "MP-SVC-A",
			"-p tcp -m tcp -m statistic --mode random --probability 0.50000000000 -j DNAT --to-destination "+port,
			"-p tcp -m tcp -j DNAT --to-destination "+port)
		nat.Chains[2] = chain(t, "MP-SVC-C", "-p tcp -m tcp -j DNAT --to-destination "+port)
	})
}

func TestKernelApplyAndCleanup(t *testing.T) {
	for _, family := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		t.Run(family.String()+" rules go in, change partially, survive a refused restore and come out without a trace", func(t *testing.T) {
			ns := enterTestNetns(t)
			ns.restore(t, family, foreignInput(family))
			before := ns.save(t, family)
			dp, err := New(NewRunner(), family, rules.Prefix)
			if err != nil {
				t.Fatal(err)
			}

			// The first apply creates everything, jumps at the head.
			res, err := ns.apply(t, dp, testRuleset(t, family, nil), false)
			if err != nil {
				t.Fatalf("first apply: %v", err)
			}
			t.Logf("first apply: %+v", res)
			if !res.Full || res.JumpsInserted != 4 {
				t.Errorf("first apply: Full %v, %d jumps inserted; want full, 4", res.Full, res.JumpsInserted)
			}
			first := ns.save(t, family)
			for _, want := range []struct{ table, chain string }{
				{"nat", "MP-SERVICES"}, {"nat", "MP-SVC-A"}, {"nat", "MP-SVC-B"}, {"nat", "MP-POSTROUTING"},
				{"nat", "MP-CANARY"}, {"filter", "MP-FORWARD"}, {"filter", "MP-CANARY"},
			} {
				if !strings.Contains(first, "\n:"+want.chain+" - [0:0]\n") || chainRules(first, want.table, want.chain) == nil && want.chain != "MP-CANARY" {
					t.Errorf("%s %s is missing from iptables-save:\n%s", want.table, want.chain, first)
				}
			}
			wantHeads := map[string][]string{
				"nat PREROUTING":  {`-A PREROUTING -m comment --comment "miniproxy service portals" -j MP-SERVICES`},
				"nat OUTPUT":      {`-A OUTPUT -m comment --comment "miniproxy service portals" -j MP-SERVICES`},
				"nat POSTROUTING": {"-A POSTROUTING -j MP-POSTROUTING", "-A POSTROUTING -s "},
				"filter FORWARD":  {"-A FORWARD -j MP-FORWARD"},
				"filter INPUT":    {"-A INPUT -j ACCEPT", "-A INPUT -j FOREIGN"},
			}
			for where, want := range wantHeads {
				tc := strings.Fields(where)
				got := chainRules(first, tc[0], tc[1])
				if len(got) != len(want) {
					t.Errorf("%s = %q, want %q", where, got, want)
					continue
				}
				for i := range want {
					if !strings.HasPrefix(got[i], want[i]) {
						t.Errorf("%s = %q, want %q", where, got, want)
					}
				}
			}

			// A partial apply writes the three changed or new chains and
			// deletes the one gone; the kernel then holds exactly what a
			// full apply of the same ruleset leaves.
			res, err = ns.apply(t, dp, changedRuleset(t, family), false)
			if err != nil {
				t.Fatalf("partial apply: %v", err)
			}
			t.Logf("partial apply: %+v", res)
			if res.Full || res.ChainsWritten != 3 || res.ChainsDeleted != 1 || res.JumpsInserted != 0 {
				t.Errorf("partial apply: Full %v, %d chains written, %d deleted, %d jumps inserted; want partial, 3, 1, 0",
					res.Full, res.ChainsWritten, res.ChainsDeleted, res.JumpsInserted)
			}
			partial := ns.save(t, family)
			if strings.Contains(partial, "MP-SVC-B") {
				t.Errorf("MP-SVC-B survived the partial apply:\n%s", partial)
			}
			res, err = ns.apply(t, dp, changedRuleset(t, family), true)
			if err != nil {
				t.Fatalf("full apply: %v", err)
			}
			t.Logf("full apply: %+v", res)
			full := ns.save(t, family)
			if diff := cmp.Diff(full, partial); diff != "" {
				t.Errorf("iptables-save after the partial apply differs from after a full one (-full +partial):\n%s", diff)
			}

			// A restore the kernel refuses changes nothing and names the line.
			bogus := changedRuleset(t, family)
			bogus.Tables[0].Chains[1].Rules[1] = rule(t, "-j RETURN")
			bogus.Tables[0].Chains = append(bogus.Tables[0].Chains, chain(t, "MP-BOGUS", "-m bogus --bogus-opt 1 -j ACCEPT"))
			res, err = ns.apply(t, dp, bogus, false)
			var re *RestoreError
			if !errors.As(err, &re) {
				t.Fatalf("apply with a bogus match: error %v, want a *RestoreError", err)
			}
			t.Logf("refused apply: %+v\n%v", res, err)
			if re.Line == 0 || !strings.Contains(err.Error(), "> ") || !strings.Contains(err.Error(), "-A MP-BOGUS -m bogus --bogus-opt 1 -j ACCEPT") ||
				!strings.Contains(err.Error(), "restore "+family.String()+" rules") {
				t.Errorf("the error does not name and quote the offending line:\n%v", err)
			}
			if got := ns.save(t, family); got != full {
				t.Errorf("a refused restore changed the tables (-before +after):\n%s", cmp.Diff(full, got))
			}
			res, err = ns.apply(t, dp, changedRuleset(t, family), false)
			if err != nil || !res.Full || res.Reason != ReasonFailure {
				t.Errorf("apply after the refused one: %+v, %v; want a full apply after failure", res, err)
			}
			if got := ns.save(t, family); got != full {
				t.Errorf("tables after recovering (-want +got):\n%s", cmp.Diff(full, got))
			}

			// Cleanup leaves the tables exactly as they were before.
			ns.check(t)
			if _, err := Cleanup(NewRunner(), rules.Prefix, family); err != nil {
				t.Fatalf("Cleanup: %v", err)
			}
			after := ns.save(t, family)
			if after != before {
				t.Errorf("iptables-save after cleanup differs from before (-before +after):\n%s", cmp.Diff(before, after))
			}
			ns.check(t)
			if _, err := Cleanup(NewRunner(), rules.Prefix); err != nil {
				t.Errorf("Cleanup with nothing installed: %v", err)
			}
			if again := ns.save(t, family); again != before {
				t.Errorf("a second cleanup changed the tables (-before +after):\n%s", cmp.Diff(before, again))
			}
		})
	}
}

func TestKernelCanary(t *testing.T) {
	for _, family := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		t.Run(family.String()+" tables flushed by someone else are rebuilt by the next apply, jumps included", func(t *testing.T) {
			ns := enterTestNetns(t)
			ns.restore(t, family, foreignInput(family))
			dp, err := New(NewRunner(), family, rules.Prefix)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ns.apply(t, dp, testRuleset(t, family, nil), false); err != nil {
				t.Fatalf("first apply: %v", err)
			}
			want := ns.save(t, family)
			res, err := ns.apply(t, dp, testRuleset(t, family, nil), false)
			if err != nil || res.Full || res.Bytes != 0 {
				t.Errorf("apply of an unchanged ruleset: %+v, %v; want partial with no restore", res, err)
			}
			t.Logf("unchanged apply (canary check only): %v", res.Duration)

			// What a firewall reload does: flush and delete everything.
			tool := "iptables"
			if family == iptables.IPv6 {
				tool = "ip6tables"
			}
			for _, table := range []string{"mangle", "nat", "filter"} {
				ns.run(t, "", tool, "-t", table, "-F")
				ns.run(t, "", tool, "-t", table, "-X")
			}
			ns.restore(t, family, foreignInput(family))
			if strings.Contains(ns.save(t, family), "MP-") {
				t.Fatalf("the flush left our chains behind")
			}

			res, err = ns.apply(t, dp, testRuleset(t, family, nil), false)
			if err != nil {
				t.Fatalf("apply after the flush: %v", err)
			}
			if !res.Full || res.Reason != ReasonCanary || res.JumpsInserted != 4 {
				t.Errorf("apply after the flush: %+v; want full for the canary, 4 jumps inserted", res)
			}
			if got := ns.save(t, family); got != want {
				t.Errorf("tables after the rebuild (-want +got):\n%s", cmp.Diff(want, got))
			}
			ns.check(t)
			if _, err := Cleanup(NewRunner(), rules.Prefix, family); err != nil {
				t.Errorf("Cleanup: %v", err)
			}
		})
	}
}

func TestKernelCanaryAfterFlushWithoutDelete(t *testing.T) {
	ns := enterTestNetns(t)
	ns.restore(t, iptables.IPv4, foreignInput(iptables.IPv4))
	dp, err := New(NewRunner(), iptables.IPv4, rules.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ns.apply(t, dp, testRuleset(t, iptables.IPv4, nil), false); err != nil {
		t.Fatalf("first apply: %v", err)
	}
	want := ns.save(t, iptables.IPv4)
	if lost, err := dp.CanaryLost(); lost != "" || err != nil {
		t.Fatalf("CanaryLost with the rules in place = %q, %v", lost, err)
	}
	// `iptables -t nat -F` empties every chain of nat and deletes none:
	// the canary chain stays, its rule goes, and so do the jumps.
	ns.run(t, "", "iptables", "-t", "nat", "-F")
	ns.run(t, "", "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.9.0.0/16", "-j", "MASQUERADE") // the foreign rule, as its owner would put it back
	lost, err := dp.CanaryLost()
	if err != nil || lost != "the canary chain MP-CANARY of table nat was emptied" {
		t.Errorf("CanaryLost after iptables -t nat -F = %q, %v", lost, err)
	}
	res, err := ns.apply(t, dp, testRuleset(t, iptables.IPv4, nil), false)
	if err != nil || !res.Full || res.Reason != ReasonCanary {
		t.Fatalf("apply after the flush: %+v, %v; want full for the canary", res, err)
	}
	if got := ns.save(t, iptables.IPv4); got != want {
		t.Errorf("tables after the rebuild (-want +got):\n%s", cmp.Diff(want, got))
	}
}

func TestKernelLeftovers(t *testing.T) {
	ns := enterTestNetns(t)
	ns.restore(t, iptables.IPv4, foreignInput(iptables.IPv4))
	before := ns.save(t, iptables.IPv4)
	// An earlier run's chains, one jumping to the other, its jump from a
	// built-in chain to one of them, and a jump inserted twice.
	ns.restore(t, iptables.IPv4, dedent(`
		*nat
		:MP-OLD - [0:0]
		:MP-OLD-2 - [0:0]
		-A MP-OLD -j MP-OLD-2
		-A MP-OLD-2 -p tcp -j RETURN
		-I PREROUTING -j MP-OLD
		COMMIT
		*filter
		:MP-FORWARD - [0:0]
		-A FORWARD -j MP-FORWARD
		-A FORWARD -j MP-FORWARD
		COMMIT
		`))
	dp, err := New(NewRunner(), iptables.IPv4, rules.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	res, err := ns.apply(t, dp, testRuleset(t, iptables.IPv4, nil), false)
	if err != nil {
		t.Fatalf("first apply: %v", err)
	}
	if res.ChainsDeleted != 2 {
		t.Errorf("first apply deleted %d chains, want MP-OLD and MP-OLD-2", res.ChainsDeleted)
	}
	got := ns.save(t, iptables.IPv4)
	if strings.Contains(got, "MP-OLD") {
		t.Errorf("leftovers survived the first apply:\n%s", got)
	}
	if fwd := chainRules(got, "filter", "FORWARD"); !slices.Equal(fwd, []string{"-A FORWARD -j MP-FORWARD"}) {
		t.Errorf("FORWARD = %q, want the jump exactly once", fwd)
	}
	ns.check(t)
	if _, err := Cleanup(NewRunner(), rules.Prefix, iptables.IPv4); err != nil {
		t.Errorf("Cleanup: %v", err)
	}
	if after := ns.save(t, iptables.IPv4); after != before {
		t.Errorf("tables after cleanup (-before +after):\n%s", cmp.Diff(before, after))
	}
}

// Check asks the kernel in a scratch namespace: what it accepts leaves the
// live tables as they were, what it refuses comes back as a RestoreError
// naming the line, and the live tables are not touched either way.
func TestKernelCheckLeavesTheLiveTablesAlone(t *testing.T) {
	ns := enterTestNetns(t)
	ns.restore(t, iptables.IPv4, foreignInput(iptables.IPv4))
	before := ns.save(t, iptables.IPv4)
	dp, err := New(NewRunner(), iptables.IPv4, rules.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	good := testRuleset(t, iptables.IPv4, nil)
	ns.check(t)
	if err := dp.Check(good); err != nil {
		t.Errorf("the kernel should accept the test ruleset: %v", err)
	}
	bad := testRuleset(t, iptables.IPv4, func(rs *iptables.Ruleset) {
		rs.Tables[0].Chains[1].Rules = append(rs.Tables[0].Chains[1].Rules, rule(t, "-j DNAT --to-destination 10.244.9.9:80"))
	})
	ns.check(t)
	err = dp.Check(bad)
	var re *RestoreError
	if !errors.As(err, &re) || !strings.Contains(re.Output, "Need TCP, UDP, SCTP or DCCP") || re.Text != "-A MP-SVC-A -j DNAT --to-destination 10.244.9.9:80" {
		t.Errorf("want the kernel's refusal naming the DNAT line, got %#v", err)
	}
	if after := ns.save(t, iptables.IPv4); after != before {
		t.Errorf("Check changed the live tables:\nbefore:\n%s\nafter:\n%s", before, after)
	}

	// A chain only a check creates is in no namespace afterwards: neither
	// the test's nor the one this process started in (read, not written).
	probe := fmt.Sprintf("MP-CHK-%08x", rand.Uint32())
	ns.check(t)
	if err := NewRunner().Check(iptables.IPv4, []byte("*filter\n:"+probe+" - [0:0]\n-A "+probe+" -j ACCEPT\nCOMMIT\n")); err != nil {
		t.Fatalf("check a one-chain input: %v", err)
	}
	if strings.Contains(ns.save(t, iptables.IPv4), probe) {
		t.Errorf("the check's chain %s is in the test's namespace", probe)
	}
	origNS := fmt.Sprintf("--net=/proc/%d/fd/%d", os.Getpid(), int(ns.orig))
	out, err := exec.Command("nsenter", origNS, "iptables-save", "-t", "filter").CombinedOutput()
	if err != nil {
		t.Fatalf("read the original namespace's filter table: %v: %s", err, out)
	}
	if strings.Contains(string(out), probe) {
		t.Errorf("the check's chain %s is in the namespace this process started in", probe)
	}
}
