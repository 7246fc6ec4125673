package dataplane

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

const v4 = iptables.IPv4

// step is one Apply in a test's sequence; the earlier steps of a case bring
// the dataplane where the case's name says, the last one is checked in full.
type step struct {
	rs   *iptables.Ruleset
	full bool
	// before plays another program just before the apply.
	before func(t *testing.T, f *Fake)

	wantFull    bool
	wantReason  string
	wantWritten int
	wantDeleted int
	wantRules   int
	// wantInput is the exact restore input; "" means no restore was run
	// and "-" that the input is not checked (but wantInputHas is).
	wantInput string
	// wantInputHas lists lines the restore input must contain.
	wantInputHas []string
	// wantErr is a substring of the expected error; "" means success.
	wantErr string
	// check looks at the fake afterwards, given the calls of this step.
	check func(t *testing.T, f *Fake, calls []string)
}

// fullInput is what the first apply of testRuleset(v4) writes.
var fullInput = dedent(`
	*filter
	:MP-FORWARD - [0:0]
	:MP-CANARY - [0:0]
	-A MP-FORWARD -m conntrack --ctstate INVALID -j DROP
	-A MP-CANARY -m comment --comment "canary: if this rule is gone, miniproxy rewrites its rules" -j RETURN
	COMMIT
	*nat
	:MP-SERVICES - [0:0]
	:MP-SVC-A - [0:0]
	:MP-SVC-B - [0:0]
	:MP-POSTROUTING - [0:0]
	:MP-CANARY - [0:0]
	-A MP-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j MP-SVC-A
	-A MP-SERVICES -d 10.96.0.2/32 -p udp -m udp --dport 53 -j MP-SVC-B
	-A MP-SVC-A -p tcp -m tcp -j DNAT --to-destination 10.244.1.5:8443
	-A MP-SVC-B -j RETURN
	-A MP-POSTROUTING -m mark --mark 0x4000/0x4000 -m comment --comment "masquerade marked traffic" -j MASQUERADE
	-A MP-CANARY -m comment --comment "canary: if this rule is gone, miniproxy rewrites its rules" -j RETURN
	COMMIT
	`)

// canaryChecks are the calls of a partial apply's canary check, one
// `iptables -C` per canary table.
var canaryChecks = []string{
	`exists IPv4 nat MP-CANARY -m comment --comment "canary: if this rule is gone, miniproxy rewrites its rules" -j RETURN`,
	`exists IPv4 filter MP-CANARY -m comment --comment "canary: if this rule is gone, miniproxy rewrites its rules" -j RETURN`,
}

// foreignState is a node's tables before miniproxy: someone else's chain
// and rules that must survive everything this package does.
func foreignState(t *testing.T) iptables.State {
	s := iptables.NewState()
	s["filter"]["FOREIGN"] = &iptables.Chain{Name: "FOREIGN", Rules: []iptables.Rule{rule(t, "-p tcp --dport 22 -j ACCEPT")}}
	s["filter"]["INPUT"].Rules = []iptables.Rule{rule(t, "-j ACCEPT"), rule(t, "-j FOREIGN")}
	s["nat"]["POSTROUTING"].Rules = []iptables.Rule{rule(t, "-s 10.9.0.0/16 -j MASQUERADE")}
	return s
}

func TestApplyWithFake(t *testing.T) {
	changedA := testRuleset(t, v4, func(rs *iptables.Ruleset) {
		rs.Tables[0].Chains[1] = chain(t, "MP-SVC-A", "-p tcp -m tcp -j DNAT --to-destination 10.244.2.7:8443")
	})
	withoutB := testRuleset(t, v4, func(rs *iptables.Ruleset) {
		rs.Tables[0].Chains = slices.Delete(rs.Tables[0].Chains, 2, 3)
		rs.Tables[0].Chains[0].Rules = rs.Tables[0].Chains[0].Rules[:1]
	})
	noCalls := func(kinds ...string) func(t *testing.T, f *Fake, calls []string) {
		return func(t *testing.T, f *Fake, calls []string) {
			for _, c := range calls {
				for _, k := range kinds {
					if strings.HasPrefix(c, k+" ") {
						t.Errorf("unexpected call %q; calls: %q", c, calls)
					}
				}
			}
		}
	}
	jumpsAtHead := func(t *testing.T, f *Fake, calls []string) {
		t.Helper()
		s := f.State(v4)
		want := map[string][]string{
			"nat PREROUTING":  {`-m comment --comment "miniproxy service portals" -j MP-SERVICES`},
			"nat OUTPUT":      {`-m comment --comment "miniproxy service portals" -j MP-SERVICES`},
			"nat POSTROUTING": {"-j MP-POSTROUTING", "-s 10.9.0.0/16 -j MASQUERADE"},
			"filter FORWARD":  {"-j MP-FORWARD"},
			"filter INPUT":    {"-j ACCEPT", "-j FOREIGN"},
		}
		for where, rules := range want {
			tc := strings.Fields(where)
			var got []string
			for _, r := range s[iptables.Table(tc[0])][tc[1]].Rules {
				got = append(got, r.String())
			}
			if diff := cmp.Diff(rules, got); diff != "" {
				t.Errorf("%s (-want +got):\n%s", where, diff)
			}
		}
	}

	tests := []struct {
		name  string
		steps []step
	}{
		{
			name: "the first apply is full and writes every chain, the canaries and then the jumps",
			steps: []step{{
				rs: testRuleset(t, v4, nil), wantFull: true, wantReason: ReasonFirst,
				wantWritten: 7, wantRules: 6, wantInput: fullInput,
				check: func(t *testing.T, f *Fake, calls []string) {
					jumpsAtHead(t, f, calls)
					restoreAt := slices.IndexFunc(calls, func(c string) bool { return strings.HasPrefix(c, "restore ") })
					insertAt := slices.IndexFunc(calls, func(c string) bool { return strings.HasPrefix(c, "insert ") })
					if restoreAt < 0 || insertAt < restoreAt {
						t.Errorf("jumps must be inserted after the restore that creates their targets; calls: %q", calls)
					}
				},
			}},
		},
		{
			name: "a second apply with one changed chain writes only that chain and inserts no jumps",
			steps: []step{
				{rs: testRuleset(t, v4, nil), wantFull: true, wantReason: ReasonFirst, wantWritten: 7, wantRules: 6, wantInput: fullInput},
				{
					rs: changedA, wantWritten: 1, wantRules: 1,
					wantInput: dedent(`
						*nat
						:MP-SVC-A - [0:0]
						-A MP-SVC-A -p tcp -m tcp -j DNAT --to-destination 10.244.2.7:8443
						COMMIT
						`),
					check: func(t *testing.T, f *Fake, calls []string) {
						want := append(slices.Clone(canaryChecks), "restore IPv4 (97 bytes)")
						if diff := cmp.Diff(want, calls); diff != "" {
							t.Errorf("calls (-want +got):\n%s", diff)
						}
					},
				},
			},
		},
		{
			name: "an apply with nothing changed runs no restore at all",
			steps: []step{
				{rs: testRuleset(t, v4, nil), wantFull: true, wantReason: ReasonFirst, wantWritten: 7, wantRules: 6, wantInput: fullInput},
				{rs: testRuleset(t, v4, nil), check: func(t *testing.T, f *Fake, calls []string) {
					if diff := cmp.Diff(canaryChecks, calls); diff != "" {
						t.Errorf("calls (-want: the canary checks alone +got):\n%s", diff)
					}
				}},
			},
		},
		{
			name: "a chain no longer wanted is flushed and deleted in the same input that stops jumping to it",
			steps: []step{
				{rs: testRuleset(t, v4, nil), wantFull: true, wantReason: ReasonFirst, wantWritten: 7, wantRules: 6, wantInput: fullInput},
				{
					rs: withoutB, wantWritten: 1, wantDeleted: 1, wantRules: 1,
					wantInput: dedent(`
						*nat
						:MP-SERVICES - [0:0]
						:MP-SVC-B - [0:0]
						-A MP-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j MP-SVC-A
						-X MP-SVC-B
						COMMIT
						`),
					check: func(t *testing.T, f *Fake, calls []string) {
						if _, ok := f.State(v4)["nat"]["MP-SVC-B"]; ok {
							t.Errorf("MP-SVC-B is still there")
						}
					},
				},
			},
		},
		{
			name: "a refused restore leaves the tables as they were and reports the family",
			steps: []step{
				{rs: testRuleset(t, v4, nil), wantFull: true, wantReason: ReasonFirst, wantWritten: 7, wantRules: 6, wantInput: fullInput},
				{
					rs:          changedA,
					before:      func(t *testing.T, f *Fake) { f.FailNext(1) },
					wantWritten: 1, wantRules: 1, wantErr: "restore IPv4 rules: iptables-restore failed",
					wantInput: dedent(`
						*nat
						:MP-SVC-A - [0:0]
						-A MP-SVC-A -p tcp -m tcp -j DNAT --to-destination 10.244.2.7:8443
						COMMIT
						`),
					check: func(t *testing.T, f *Fake, calls []string) {
						got := iptables.ChainText(f.State(v4)["nat"]["MP-SVC-A"])
						if want := "-A MP-SVC-A -p tcp -m tcp -j DNAT --to-destination 10.244.1.5:8443\n"; got != want {
							t.Errorf("MP-SVC-A = %q, want the old %q", got, want)
						}
					},
				},
			},
		},
		{
			name: "the apply after a refused restore is full",
			steps: []step{
				{rs: testRuleset(t, v4, nil), wantFull: true, wantReason: ReasonFirst, wantWritten: 7, wantRules: 6, wantInput: fullInput},
				{rs: changedA, before: func(t *testing.T, f *Fake) { f.FailNext(1) }, wantWritten: 1, wantRules: 1, wantInput: "-", wantErr: "injected"},
				{
					rs: changedA, wantFull: true, wantReason: ReasonFailure, wantWritten: 7, wantRules: 6,
					wantInput: strings.Replace(fullInput, "10.244.1.5", "10.244.2.7", 1),
					check:     noCalls("insert", "delete"),
				},
			},
		},
		{
			name: "a vanished canary makes the apply full and puts the jumps back",
			steps: []step{
				{rs: testRuleset(t, v4, nil), wantFull: true, wantReason: ReasonFirst, wantWritten: 7, wantRules: 6, wantInput: fullInput},
				{
					rs:       testRuleset(t, v4, nil),
					before:   func(t *testing.T, f *Fake) { f.SetState(v4, foreignState(t)) },
					wantFull: true, wantReason: ReasonCanary, wantWritten: 7, wantRules: 6, wantInput: fullInput,
					check: jumpsAtHead,
				},
			},
		},
		{
			name: "an emptied canary (iptables -t nat -F: every chain flushed, none deleted) makes the apply full and puts the jumps back",
			steps: []step{
				{rs: testRuleset(t, v4, nil), wantFull: true, wantReason: ReasonFirst, wantWritten: 7, wantRules: 6, wantInput: fullInput},
				{
					rs: testRuleset(t, v4, nil),
					before: func(t *testing.T, f *Fake) {
						s := f.State(v4)
						for _, c := range s["nat"] {
							c.Rules = nil
						}
						// The foreign rule, as its owner would put it back.
						s["nat"]["POSTROUTING"].Rules = foreignState(t)["nat"]["POSTROUTING"].Rules
						f.SetState(v4, s)
					},
					wantFull: true, wantReason: ReasonCanary, wantWritten: 7, wantRules: 6, wantInput: fullInput,
					check: jumpsAtHead,
				},
			},
		},
		{
			name: "a full apply with everything in place checks each jump once and inserts none",
			steps: []step{
				{rs: testRuleset(t, v4, nil), wantFull: true, wantReason: ReasonFirst, wantWritten: 7, wantRules: 6, wantInput: fullInput},
				{
					rs: testRuleset(t, v4, nil), full: true, wantFull: true, wantReason: ReasonRequested, wantWritten: 7, wantRules: 6, wantInput: fullInput,
					check: func(t *testing.T, f *Fake, calls []string) {
						noCalls("insert", "delete")(t, f, calls)
						n := 0
						for _, c := range calls {
							if strings.HasPrefix(c, "exists ") {
								n++
							}
						}
						if n != 4 {
							t.Errorf("%d jump checks, want 4: %q", n, calls)
						}
					},
				},
			},
		},
		{
			name: "a full apply puts a jump that another program pushed down back at the head",
			steps: []step{
				{rs: testRuleset(t, v4, nil), wantFull: true, wantReason: ReasonFirst, wantWritten: 7, wantRules: 6, wantInput: fullInput},
				{
					rs: testRuleset(t, v4, nil), full: true,
					before: func(t *testing.T, f *Fake) {
						s := f.State(v4)
						c := s["nat"]["POSTROUTING"]
						c.Rules = []iptables.Rule{c.Rules[1], c.Rules[0]}
						f.SetState(v4, s)
					},
					wantFull: true, wantReason: ReasonRequested, wantWritten: 7, wantRules: 6, wantInput: fullInput,
					check: jumpsAtHead,
				},
			},
		},
		{
			name: "the first apply deletes chains and jumps an earlier run left behind, and nothing else",
			steps: []step{{
				rs: testRuleset(t, v4, nil),
				before: func(t *testing.T, f *Fake) {
					s := foreignState(t)
					s["nat"]["MP-OLD"] = &iptables.Chain{Name: "MP-OLD", Rules: []iptables.Rule{rule(t, "-j MP-OLD-2")}}
					s["nat"]["MP-OLD-2"] = &iptables.Chain{Name: "MP-OLD-2", Rules: []iptables.Rule{rule(t, "-j MP-OLD")}}
					s["nat"]["PREROUTING"].Rules = []iptables.Rule{rule(t, "-j MP-OLD"), rule(t, "-j MP-SERVICES-GONE")}
					s["nat"]["MP-SERVICES-GONE"] = &iptables.Chain{Name: "MP-SERVICES-GONE"}
					s["filter"]["FORWARD"].Rules = []iptables.Rule{rule(t, "-j MP-FORWARD"), rule(t, "-j MP-FORWARD")}
					s["filter"]["MP-FORWARD"] = &iptables.Chain{Name: "MP-FORWARD"}
					f.SetState(v4, s)
				},
				wantFull: true, wantReason: ReasonFirst, wantWritten: 7, wantDeleted: 3, wantRules: 6,
				wantInput: "-",
				wantInputHas: append(strings.Split(strings.TrimSpace(fullInput), "\n"),
					":MP-OLD - [0:0]", ":MP-OLD-2 - [0:0]", ":MP-SERVICES-GONE - [0:0]",
					"-X MP-OLD", "-X MP-OLD-2", "-X MP-SERVICES-GONE"),
				check: func(t *testing.T, f *Fake, calls []string) {
					jumpsAtHead(t, f, calls)
					for _, c := range []string{"MP-OLD", "MP-OLD-2", "MP-SERVICES-GONE"} {
						if _, ok := f.State(v4)["nat"][c]; ok {
							t.Errorf("leftover %s is still there", c)
						}
					}
				},
			}},
		},
		{
			name: "changed jumps make the apply full and replace the old jumps",
			steps: []step{
				{rs: testRuleset(t, v4, nil), wantFull: true, wantReason: ReasonFirst, wantWritten: 7, wantRules: 6, wantInput: fullInput},
				{
					rs: testRuleset(t, v4, func(rs *iptables.Ruleset) {
						rs.Jumps = rs.Jumps[1:]
						rs.Jumps[0] = jump(t, "nat", "OUTPUT", "-m addrtype --dst-type LOCAL -j MP-SERVICES")
					}),
					wantFull: true, wantReason: ReasonJumps, wantWritten: 7, wantRules: 6, wantInput: fullInput,
					check: func(t *testing.T, f *Fake, calls []string) {
						s := f.State(v4)
						if n := len(s["nat"]["PREROUTING"].Rules); n != 0 {
							t.Errorf("PREROUTING has %d rules, want the dropped jump gone", n)
						}
						if got := s["nat"]["OUTPUT"].Rules; len(got) != 1 || got[0].String() != "-m addrtype --dst-type LOCAL -j MP-SERVICES" {
							t.Errorf("OUTPUT = %q, want only the new jump", got)
						}
					},
				},
			},
		},
		{
			name: "a ruleset with a chain outside the prefix is refused before anything runs",
			steps: []step{{
				rs: testRuleset(t, v4, func(rs *iptables.Ruleset) {
					rs.Tables[1].Chains = append(rs.Tables[1].Chains, chain(t, "KUBE-FORWARD"))
				}),
				wantErr: `chain "KUBE-FORWARD" in table filter lacks the prefix "MP-"`,
				check:   noCalls("restore", "save", "insert"),
			}},
		},
		{
			name: "a ruleset with a chain name over 28 characters is refused",
			steps: []step{{
				rs: testRuleset(t, v4, func(rs *iptables.Ruleset) {
					rs.Tables[1].Chains = append(rs.Tables[1].Chains, chain(t, "MP-SVC-0123456789ABCDEF0123456"))
				}),
				wantErr: "longer than 28 characters",
			}},
		},
		{
			name: "a jump to a chain the ruleset does not have is refused",
			steps: []step{{
				rs: testRuleset(t, v4, func(rs *iptables.Ruleset) {
					rs.Jumps = append(rs.Jumps, jump(t, "filter", "INPUT", "-j MP-INPUT"))
				}),
				wantErr: `jump from filter INPUT to "MP-INPUT"`,
			}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := NewFake()
			f.SetState(v4, foreignState(t))
			dp, err := New(f, v4, rules.Prefix)
			if err != nil {
				t.Fatal(err)
			}
			for i, st := range tc.steps {
				if st.before != nil {
					st.before(t, f)
				}
				calls0, inputs0 := len(f.Calls()), len(f.Inputs())
				res, err := dp.Apply(st.rs, st.full)
				calls, inputs := f.Calls()[calls0:], f.Inputs()[inputs0:]
				last := i == len(tc.steps)-1
				if st.wantErr == "" && err != nil {
					t.Fatalf("step %d: Apply: %v", i, err)
				}
				if st.wantErr != "" && (err == nil || !strings.Contains(err.Error(), st.wantErr)) {
					t.Fatalf("step %d: Apply error = %v, want one containing %q", i, err, st.wantErr)
				}
				if res.Full != st.wantFull || res.Reason != st.wantReason {
					t.Errorf("step %d: Full, Reason = %v, %q; want %v, %q", i, res.Full, res.Reason, st.wantFull, st.wantReason)
				}
				if res.ChainsWritten != st.wantWritten || res.ChainsDeleted != st.wantDeleted || res.RulesWritten != st.wantRules {
					t.Errorf("step %d: chains written, deleted, rules written = %d, %d, %d; want %d, %d, %d", i,
						res.ChainsWritten, res.ChainsDeleted, res.RulesWritten, st.wantWritten, st.wantDeleted, st.wantRules)
				}
				if res.Bytes > 0 && (len(inputs) != 1 || res.Bytes != len(inputs[0].Text)) {
					t.Errorf("step %d: Bytes = %d, but inputs were %+v", i, res.Bytes, inputs)
				}
				switch {
				case st.wantInput == "-":
				case st.wantInput == "":
					if len(inputs) != 0 {
						t.Errorf("step %d: restores %+v, want none", i, inputs)
					}
				default:
					if len(inputs) != 1 {
						t.Fatalf("step %d: %d restores, want 1: %+v", i, len(inputs), inputs)
					}
					if diff := cmp.Diff(st.wantInput, inputs[0].Text); diff != "" {
						t.Errorf("step %d: restore input (-want +got):\n%s", i, diff)
					}
				}
				if len(st.wantInputHas) > 0 {
					if len(inputs) != 1 {
						t.Fatalf("step %d: %d restores, want 1: %+v", i, len(inputs), inputs)
					}
					have := strings.Split(inputs[0].Text, "\n")
					for _, l := range st.wantInputHas {
						if !slices.Contains(have, l) {
							t.Errorf("step %d: input lacks %q:\n%s", i, l, inputs[0].Text)
						}
					}
				}
				if st.check != nil {
					st.check(t, f, calls)
				}
				if !last && t.Failed() {
					t.FailNow()
				}
			}
		})
	}
}

func TestApplyFailureIsARestoreError(t *testing.T) {
	f := NewFake()
	dp, err := New(f, v4, rules.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	f.FailNext(2)
	for i := range 2 {
		_, err := dp.Apply(testRuleset(t, v4, nil), false)
		var re *RestoreError
		if !errors.As(err, &re) || re.Family != v4 {
			t.Fatalf("apply %d: error %v is not a *RestoreError for IPv4", i, err)
		}
	}
	if s := f.State(v4); len(s["nat"]) != 4 {
		t.Errorf("nat has %d chains after two refused restores, want the 4 built-in ones", len(s["nat"]))
	}
	if _, err := dp.Apply(testRuleset(t, v4, nil), false); err != nil {
		t.Fatalf("third apply: %v", err)
	}
}

func TestRestoreErrorNamesTheOffendingLine(t *testing.T) {
	input := []byte("*nat\n:MP-A - [0:0]\n:MP-B - [0:0]\n-A MP-A -j MP-B\n-A MP-B -m bogus -j ACCEPT\n-A MP-B -j RETURN\nCOMMIT\n")
	tests := []struct {
		name     string
		output   string
		wantLine int
		want     []string
	}{
		{
			name:     "the nf_tables backend's \"Error occurred at line\" is understood",
			output:   "iptables-restore v1.8.9 (nf_tables): Couldn't load match `bogus':No such file or directory\n\nError occurred at line: 5\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.\n",
			wantLine: 5,
			want:     []string{"Couldn't load match `bogus'", ">      5 | -A MP-B -m bogus -j ACCEPT", "       3 | :MP-B - [0:0]", "       7 | COMMIT"},
		},
		{
			name:     "the \"line N failed\" form is understood",
			output:   "iptables-restore: line 2 failed: No chain/target/match by that name.\n",
			wantLine: 2,
			want:     []string{">      2 | :MP-A - [0:0]", "       1 | *nat", "       4 | -A MP-A -j MP-B"},
		},
		{
			name:   "output without a line number is passed on without context",
			output: "iptables-restore: unable to initialize table 'nat'\n",
			want:   []string{"unable to initialize table 'nat'"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := newRestoreError(v4, input, tc.output, errors.New("exit status 2"))
			if err.Line != tc.wantLine {
				t.Errorf("Line = %d, want %d", err.Line, tc.wantLine)
			}
			msg := err.Error()
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error lacks %q:\n%s", w, msg)
				}
			}
			if strings.Contains(msg, "Try `") {
				t.Errorf("error keeps the usage hint:\n%s", msg)
			}
		})
	}
}

func TestCleanupWithFake(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, f *Fake)
		prefix  string
		wantErr string
	}{
		{
			name:    "cleanup of tables that never saw miniproxy changes nothing",
			prepare: func(t *testing.T, f *Fake) {},
			prefix:  rules.Prefix,
		},
		{
			name: "cleanup after an apply leaves exactly the foreign rules",
			prepare: func(t *testing.T, f *Fake) {
				dp, err := New(f, v4, rules.Prefix)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := dp.Apply(testRuleset(t, v4, nil), false); err != nil {
					t.Fatal(err)
				}
			},
			prefix: rules.Prefix,
		},
		{
			name: "cleanup goes on when the batch delete is refused and deletes chain by chain",
			prepare: func(t *testing.T, f *Fake) {
				dp, err := New(f, v4, rules.Prefix)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := dp.Apply(testRuleset(t, v4, nil), false); err != nil {
					t.Fatal(err)
				}
				f.FailNext(1)
			},
			prefix: rules.Prefix,
		},
		{
			name:    "an empty prefix is refused, since it would own every chain",
			prepare: func(t *testing.T, f *Fake) {},
			prefix:  "",
			wantErr: "prefix must not be empty",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := NewFake()
			before := foreignState(t)
			f.SetState(v4, before)
			tc.prepare(t, f)
			_, err := Cleanup(f, tc.prefix, v4, iptables.IPv6)
			if tc.wantErr == "" && err != nil {
				t.Fatalf("Cleanup: %v", err)
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("Cleanup error = %v, want one containing %q", err, tc.wantErr)
			}
			if diff := cmp.Diff(before, f.State(v4)); diff != "" {
				t.Errorf("IPv4 tables after cleanup (-before +after):\n%s", diff)
			}
			if diff := cmp.Diff(iptables.NewState(), f.State(iptables.IPv6)); diff != "" {
				t.Errorf("IPv6 tables after cleanup (-before +after):\n%s", diff)
			}
		})
	}
}

func TestCanaryLost(t *testing.T) {
	v4 := iptables.IPv4
	f := NewFake()
	f.SetState(v4, foreignState(t))
	dp, err := New(f, v4, rules.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	lost := func(want string) {
		t.Helper()
		got, err := dp.CanaryLost()
		if err != nil || got != want {
			t.Errorf("CanaryLost() = %q, %v; want %q", got, err, want)
		}
	}
	calls0 := len(f.Calls())
	lost("") // nothing applied yet: the first apply is full anyway
	if calls := f.Calls()[calls0:]; len(calls) != 0 {
		t.Errorf("CanaryLost before the first apply ran %q; want nothing", calls)
	}
	if _, err := dp.Apply(testRuleset(t, v4, nil), false); err != nil {
		t.Fatal(err)
	}
	calls0 = len(f.Calls())
	lost("")
	if diff := cmp.Diff(canaryChecks, f.Calls()[calls0:]); diff != "" {
		t.Errorf("CanaryLost with every canary in place: calls (-want +got):\n%s", diff)
	}

	s := f.State(v4)
	delete(s["filter"], "MP-CANARY")
	f.SetState(v4, s)
	lost("the canary chain MP-CANARY of table filter is gone")
	s = f.State(v4)
	s["nat"]["MP-CANARY"].Rules = nil
	f.SetState(v4, s)
	lost("the canary chain MP-CANARY of table nat was emptied")

	res, err := dp.Apply(testRuleset(t, v4, nil), false)
	if err != nil || res.Reason != ReasonCanary || res.CanaryLost != "the canary chain MP-CANARY of table nat was emptied" {
		t.Errorf("apply after the loss: Reason %q, CanaryLost %q, err %v; want %q naming the nat canary", res.Reason, res.CanaryLost, err, ReasonCanary)
	}
	lost("")

	// After a failed apply nothing is known to be in the kernel: the next
	// apply is full whatever the canary says, so there is nothing to check.
	f.FailNext(1)
	if _, err := dp.Apply(testRuleset(t, v4, nil), true); err == nil {
		t.Fatal("the injected failure did not fail the apply")
	}
	s = f.State(v4)
	delete(s["nat"], "MP-CANARY")
	f.SetState(v4, s)
	lost("")
}

// Cleanup says what it removed, per family and table: the chains, and the
// rules in them plus the jumps to them, so that --cleanup can tell the
// operator.
func TestCleanupSaysWhatItRemoved(t *testing.T) {
	v4 := iptables.IPv4
	f := NewFake()
	f.SetState(v4, foreignState(t))
	dp, err := New(f, v4, rules.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	rs := testRuleset(t, v4, nil)
	if _, err := dp.Apply(rs, false); err != nil {
		t.Fatal(err)
	}
	want := map[iptables.Table][2]int{}
	st := f.State(v4)
	for _, table := range []iptables.Table{iptables.NAT, iptables.Filter} {
		chains, nrules := 0, 0
		for name, chain := range st[table] {
			if strings.HasPrefix(name, rules.Prefix) {
				chains++
				nrules += len(chain.Rules)
				continue
			}
			for _, r := range chain.Rules {
				if strings.HasPrefix(r.Target(), rules.Prefix) {
					nrules++
				}
			}
		}
		want[table] = [2]int{chains, nrules}
	}
	removed, err := Cleanup(f, rules.Prefix, v4)
	if err != nil {
		t.Fatal(err)
	}
	got := map[iptables.Table][2]int{}
	for _, r := range removed {
		if r.Family != v4 {
			t.Errorf("a removal in %s, only IPv4 was asked for", r.Family)
		}
		got[r.Table] = [2]int{r.Chains, r.Rules}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("removed chains and rules per table (-in the tables before +reported):\n%s", diff)
	}
	if c, _ := removed.Total(); c == 0 {
		t.Error("nothing reported removed after an apply")
	}
}
