package iptables

import (
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// dump lists a table's chains and rules in a stable form, leaving out
// built-in chains that hold no rule.
func dump(s State, table Table) string {
	names := make([]string, 0, len(s[table]))
	for n := range s[table] {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []string
	for _, name := range names {
		c := s[table][name]
		if IsBuiltin(table, name) && len(c.Rules) == 0 {
			continue
		}
		out = append(out, ":"+name)
		for _, r := range c.Rules {
			out = append(out, "-A "+name+" "+r.String())
		}
	}
	return strings.Join(out, "\n")
}

func mustApply(t *testing.T, s State, text string, noflush bool) State {
	t.Helper()
	in, err := ParseRestore(text)
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	next, err := s.Apply(IPv4, in, noflush)
	if err != nil {
		t.Fatalf("apply: %v", err)
	}
	return next
}

func TestApplyFollowsIptablesRestoreSemantics(t *testing.T) {
	base := mustApply(t, NewState(), `*nat
:FOREIGN - [0:0]
:MP-A - [0:0]
-A FOREIGN -j RETURN
-A MP-A -d 10.0.0.1/32 -p tcp -j DNAT --to-destination 10.1.0.1:80
-A PREROUTING -j MP-A
COMMIT
`, true)

	tests := []struct {
		name    string
		input   string
		noflush bool
		want    string // the nat table afterwards, or the error
	}{
		{
			name:    "with --noflush, declaring a chain flushes only that chain",
			noflush: true,
			input:   "*nat\n:MP-A - [0:0]\n-A MP-A -j RETURN\nCOMMIT\n",
			want:    ":FOREIGN\n-A FOREIGN -j RETURN\n:MP-A\n-A MP-A -j RETURN\n:PREROUTING\n-A PREROUTING -j MP-A",
		},
		{
			name:    "without --noflush, the whole table is replaced",
			noflush: false,
			input:   "*nat\n:MP-B - [0:0]\n-A MP-B -j RETURN\nCOMMIT\n",
			want:    ":MP-B\n-A MP-B -j RETURN",
		},
		{
			name:    "a chain still referenced cannot be deleted",
			noflush: true,
			input:   "*nat\n:MP-A - [0:0]\n-X MP-A\nCOMMIT\n",
			want:    `error: line 3: CHAIN_DEL failed (Device or resource busy): chain MP-A is referenced`,
		},
		{
			name:    "a rule may not jump to a chain that does not exist",
			noflush: true,
			input:   "*nat\n:MP-C - [0:0]\n-A MP-C -j MP-NOWHERE\nCOMMIT\n",
			want:    `error: line 4: Chain 'MP-NOWHERE' does not exist`,
		},
		{
			name:    "a built-in chain cannot be deleted",
			noflush: true,
			input:   "*nat\n-X PREROUTING\nCOMMIT\n",
			want:    `error: line 2: CHAIN_DEL failed (Device or resource busy): chain PREROUTING is built in`,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in, err := ParseRestore(tc.input)
			if err != nil {
				t.Fatal(err)
			}
			next, err := base.Apply(IPv4, in, tc.noflush)
			got := dump(next, "nat")
			if err != nil {
				got = "error: " + err.Error()
				if dump(next, "nat") != dump(base, "nat") {
					t.Error("a refused input must leave the tables as they were")
				}
			}
			want := tc.want
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseRestoreSplitsQuotedArguments(t *testing.T) {
	in, err := ParseRestore("*nat\n-A MP-A -m comment --comment \"ns/svc:http cluster IP\" -j RETURN\nCOMMIT\n")
	if err != nil {
		t.Fatal(err)
	}
	want := Rule{"-m", "comment", "--comment", "ns/svc:http cluster IP", "-j", "RETURN"}
	if diff := cmp.Diff(want, in[0].Ops[0].Rule); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if got := want.String(); got != `-m comment --comment "ns/svc:http cluster IP" -j RETURN` {
		t.Errorf("rendering back: %s", got)
	}
}

func TestParseRestoreRefusesBrokenInput(t *testing.T) {
	for _, text := range []string{
		"-A MP-A -j RETURN\n",                                 // outside a table
		"*nat\n-A MP-A -j RETURN\n",                           // no COMMIT
		"*nat\n-Z MP-A\nCOMMIT\n",                             // unknown operation
		"*nat\n-A MP-A -m comment --comment \"open\nCOMMIT\n", // unterminated quote
	} {
		if _, err := ParseRestore(text); err == nil {
			t.Errorf("ParseRestore(%q) should fail", text)
		}
	}
}
