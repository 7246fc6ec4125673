package explain

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// sendElsewhere plays another program: the last rule of the load balancer
// IP's leaf (its DNAT for a client outside) now sends to 10.244.9.9:8080.
func sendElsewhere(st iptables.State) {
	c := st[iptables.NAT]["MP-VIP-8C"]
	last := append(iptables.Rule{}, c.Rules[len(c.Rules)-1]...)
	last[len(last)-1] = "10.244.9.9:8080"
	c.Rules = append(append([]iptables.Rule{}, c.Rules[:len(c.Rules)-1]...), last)
}

func TestDriftNamesTheChainChangedBehindOurBack(t *testing.T) {
	view := nodeView(sourceIPApp(withLoadBalancer, localPolicy), onNode1, onNode2)
	tests := []struct {
		name   string
		change func(st iptables.State)
		want   []string
	}{
		{"nothing changed", func(iptables.State) {}, nil},
		{"a DNAT rule sent elsewhere", sendElsewhere, []string{"IPv4 nat MP-VIP-8C (different)"}},
		{
			"a chain flushed",
			func(st iptables.State) { st[iptables.Filter]["MP-FORWARD"].Rules = nil },
			[]string{"IPv4 filter MP-FORWARD (different)"},
		},
		{
			"a chain deleted, with the jump to it",
			func(st iptables.State) {
				delete(st[iptables.NAT], "MP-POSTROUTING")
				st[iptables.NAT]["POSTROUTING"].Rules = nil
			},
			[]string{"IPv4 nat MP-POSTROUTING (missing)", "IPv4 nat POSTROUTING (its jumps to MP- chains) (different)"},
		},
		{
			"the tables flushed by another program (iptables -t nat -F): the canary is named too",
			func(st iptables.State) {
				for _, c := range st[iptables.NAT] {
					c.Rules = nil
				}
			},
			[]string{"IPv4 nat MP-SERVICES (different)", "IPv4 nat MP-NODEPORTS (different)", "IPv4 nat MP-MARK-MASQ (different)",
				"IPv4 nat MP-POSTROUTING (different)", "IPv4 nat MP-HAIRPIN (different)", "IPv4 nat MP-HAIRPIN-X5 (different)", "IPv4 nat MP-HAIRPIN-05 (different)", "IPv4 nat MP-VIP-XC (different)", "IPv4 nat MP-VIP-5C (different)",
				"IPv4 nat MP-VIP-8C (different)", "IPv4 nat MP-NP-tcp-30080 (different)", "IPv4 nat MP-CANARY (different)",
				"IPv4 nat PREROUTING (its jumps to MP- chains) (different)", "IPv4 nat OUTPUT (its jumps to MP- chains) (different)",
				"IPv4 nat POSTROUTING (its jumps to MP- chains) (different)"},
		},
		{
			"a chain of our name that we would not write",
			func(st iptables.State) { st[iptables.NAT]["MP-VIP-FF"] = &iptables.Chain{Name: "MP-VIP-FF"} },
			[]string{"IPv4 nat MP-VIP-FF (extra)"},
		},
		{
			"another program's chain and rules are not ours to judge",
			func(st iptables.State) {
				st[iptables.NAT]["DOCKER"] = &iptables.Chain{Name: "DOCKER", Rules: []iptables.Rule{{"-j", "RETURN"}}}
				st[iptables.NAT]["PREROUTING"].Rules = append(st[iptables.NAT]["PREROUTING"].Rules, iptables.Rule{"-j", "DOCKER"})
			},
			nil,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k := kernelOf(t, view)
			st := k[iptables.IPv4].Clone()
			tc.change(st)
			k[iptables.IPv4] = st
			var got []string
			for _, d := range Drift(view, k) {
				got = append(got, d.String())
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("drift (-want +got):\n%s", diff)
			}
			e, err := Explain(view, k, tcpTo(client, lbIP, 80))
			if err != nil {
				t.Fatal(err)
			}
			warned := strings.Join(e.Warnings, "\n")
			for _, name := range tc.want {
				if !strings.Contains(warned, name) {
					t.Errorf("the explanation's warnings do not name %s:\n%s", name, warned)
				}
			}
			if tc.want == nil && len(e.Warnings) > 0 {
				t.Errorf("warnings without drift: %v", e.Warnings)
			}
		})
	}
}

func TestAKernelThatSendsElsewhereIsReported(t *testing.T) {
	view := nodeView(sourceIPApp(withLoadBalancer, localPolicy), onNode1, onNode2)
	k := kernelOf(t, view)
	st := k[iptables.IPv4].Clone()
	sendElsewhere(st)
	k[iptables.IPv4] = st
	e, err := Explain(view, k, tcpTo(client, lbIP, 80))
	if err != nil {
		t.Fatal(err)
	}
	if got := short(e).candidates; !cmp.Equal(got, []string{"10.244.9.9:8080 p=1.00"}) {
		t.Errorf("candidates %v: the answer must be the kernel's", got)
	}
	if len(e.Candidates) != 1 || e.Candidates[0].Known {
		t.Errorf("the kernel's endpoint is not one of the Service's, yet %+v", e.Candidates)
	}
	if !strings.Contains(strings.Join(e.Warnings, "\n"), "miniproxy's rules for its current view would give ACCEPT 10.244.1.5:8080") {
		t.Errorf("no warning that miniproxy's rules answer otherwise: %v", e.Warnings)
	}
}

func TestServiceRulesAreTheServicesOwnWithTheirCounters(t *testing.T) {
	saved := iptables.ParseSave(`*nat
:PREROUTING ACCEPT [0:0]
:MP-VIP-8C - [0:0]
:KUBE-SVC-X - [0:0]
[3:180] -A PREROUTING -m comment --comment "miniproxy service portals" -j MP-SERVICES
[2:120] -A MP-VIP-8C -d 203.0.113.140/32 -p tcp -m comment --comment "default/source-ip-app loadbalancer IP" -m tcp --dport 80 -j DNAT --to-destination 10.244.1.5:8080
[9:540] -A MP-VIP-8C -d 203.0.113.141/32 -p tcp -m comment --comment "default/source-ip-app-2 loadbalancer IP" -m tcp --dport 80 -j DNAT --to-destination 10.244.1.6:8080
[1:60] -A KUBE-SVC-X -m comment --comment "default/source-ip-app:http" -j DNAT --to-destination 10.244.1.7:8080
COMMIT
*filter
:MP-VIPF-8C - [0:0]
[4:240] -A MP-VIPF-8C -d 10.0.170.92/32 -p tcp -m comment --comment "default/source-ip-app:http cluster IP has no endpoints" -m tcp --dport 80 -j REJECT --reject-with tcp-reset
COMMIT
`)
	got := ServiceRules(map[iptables.Family]iptables.Saved{iptables.IPv4: saved}, sourceIPApp().Name)
	var lines []string
	for _, r := range got {
		lines = append(lines, r.Table+" "+r.Chain+" "+r.Rule[strings.LastIndex(r.Rule, "-j "):]+" "+strings.Repeat("*", int(r.Packets)))
	}
	want := []string{"filter MP-VIPF-8C -j REJECT --reject-with tcp-reset ****", "nat MP-VIP-8C -j DNAT --to-destination 10.244.1.5:8080 **"}
	if diff := cmp.Diff(want, lines); diff != "" {
		t.Errorf("rules (-want +got):\n%s", diff)
	}
}
