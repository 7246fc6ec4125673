package explain

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
	"github.com/miniproxy/miniproxy/pkg/rules/rulestest"
	"github.com/miniproxy/miniproxy/test/netns"
)

// kernelNamespace gives a network namespace of the test's own lab, or
// skips the test where no kernel may be used.
func kernelNamespace(t *testing.T, short string) *netns.Namespace {
	t.Helper()
	if os.Getenv("MINIPROXY_UNIT_ONLY") != "" {
		t.Skip("make unit: no test that needs the kernel")
	}
	ns, err := netns.NewLab(t).AddNamespace(short)
	if err != nil {
		t.Fatal(err)
	}
	return ns
}

// applyAndRead has miniproxy's dataplane apply rs in the namespace, with
// the real iptables-restore, and reads the family back with iptables-save.
func applyAndRead(t *testing.T, ns *netns.Namespace, rs *iptables.Ruleset) iptables.State {
	t.Helper()
	var out []byte
	err := ns.Do(func() error {
		r := dataplane.NewRunner()
		dp, err := dataplane.New(r, rs.Family, rules.Prefix)
		if err != nil {
			return err
		}
		if _, err := dp.Apply(rs, true); err != nil {
			return err
		}
		out, err = r.Save(rs.Family, "")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return iptables.ParseSave(string(out)).State()
}

// shapeQueries asks, of every port of every shape, what happens to a
// client outside (admitted by the source ranges and not), to a pod of
// another node and to the node itself, at each of its addresses.
func shapeQueries(snap *endpoints.Snapshot, cfg rules.Config) []Query {
	client, refused, pod := netip.MustParseAddr("198.51.100.79"), netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("10.244.2.7")
	if cfg.Family == iptables.IPv6 {
		client, refused, pod = netip.MustParseAddr("fd00:198::79"), netip.MustParseAddr("fd00:192::1"), netip.MustParseAddr("fd00:244:2::7")
	}
	var out []Query
	for _, name := range snap.SortedNames() {
		svc := snap.Services[name]
		var dsts []netip.AddrPort
		for _, list := range [][]netip.Addr{svc.ClusterIPs, svc.LoadBalancerIPs, svc.ExternalIPs} {
			for _, a := range list {
				if iptables.FamilyOf(a) == cfg.Family {
					dsts = append(dsts, netip.AddrPortFrom(a, uint16(svc.Port)))
				}
			}
		}
		if svc.NodePort != 0 {
			dsts = append(dsts, netip.AddrPortFrom(cfg.NodeIPs[0], uint16(svc.NodePort)))
		}
		for _, d := range dsts {
			for _, src := range []netip.Addr{client, refused, pod} {
				out = append(out, Query{Src: src, Dst: d, Protocol: svc.Protocol})
			}
			out = append(out, Query{Src: cfg.NodeIPs[0], Dst: d, Protocol: svc.Protocol, FromNode: true})
		}
	}
	return out
}

func TestTheKernelsRulesExplainAsMiniproxysAndADriftIsNamed(t *testing.T) {
	for i, set := range rulestest.EverySetting("cni0", "veth") {
		t.Run(set.Name, func(t *testing.T) {
			ns := kernelNamespace(t, fmt.Sprintf("ex%d", i))
			for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
				a, cfg := rulestest.Example(fam)
				set.Apply(&cfg)
				snap := rulestest.Snapshot(a.Zone, rulestest.EveryShape(a)...)
				view := View{Snapshot: snap, Configs: map[iptables.Family]rules.Config{fam: cfg}, LocalAddrs: cfg.NodeIPs}
				kernel := Kernel{fam: applyAndRead(t, ns, rules.Build(snap, cfg))}

				// iptables-save's spelling of every construct reads as
				// ours: no drift, and every packet goes as miniproxy's
				// own rules send it (Explain warns otherwise).
				x, err := New(view, kernel)
				if err != nil {
					t.Fatal(err)
				}
				if d := x.Drift(); len(d) > 0 {
					t.Fatalf("%s: drift right after the restore: %v", fam, d)
				}
				n := 0
				for _, q := range shapeQueries(snap, cfg) {
					e, err := x.Explain(q)
					if err != nil {
						t.Fatal(err)
					}
					if len(e.Warnings) > 0 {
						t.Errorf("%s %s -> %s: %v", q.Protocol, q.Src, q.Dst, e.Warnings)
					}
					n++
				}
				t.Logf("%s: %d packets explained from the kernel's rules as from miniproxy's", fam, n)
			}
		})
	}
}

func TestARuleChangedWithIptablesIsNamedByTheDriftWarning(t *testing.T) {
	ns := kernelNamespace(t, "exdrift")
	a, cfg := rulestest.Example(iptables.IPv4)
	snap := rulestest.Snapshot(a.Zone, rulestest.EveryShape(a)...)
	view := View{Snapshot: snap, Configs: map[iptables.Family]rules.Config{iptables.IPv4: cfg}, LocalAddrs: cfg.NodeIPs}
	rs := rules.Build(snap, cfg)
	applyAndRead(t, ns, rs)

	// Another program puts a rule of its own at the head of the leaf that
	// holds the first shape's cluster IP rules.
	leaf := ""
	for _, c := range rs.Tables[1].Chains {
		if strings.HasPrefix(c.Name, "MP-VIP-") && len(c.Rules) > 0 && c.Rules[len(c.Rules)-1].Target() == "DNAT" {
			leaf = c.Name
			break
		}
	}
	if leaf == "" {
		t.Fatal("no leaf chain with DNAT rules")
	}
	if _, _, err := ns.Run(context.Background(), "iptables", "-t", "nat", "-I", leaf, "1", "-s", "198.51.100.0/24", "-j", "RETURN"); err != nil {
		t.Fatal(err)
	}
	var out []byte
	if err := ns.Do(func() (err error) { out, err = dataplane.NewRunner().Save(iptables.IPv4, ""); return err }); err != nil {
		t.Fatal(err)
	}
	kernel := Kernel{iptables.IPv4: iptables.ParseSave(string(out)).State()}
	e, err := Explain(view, kernel, Query{Src: netip.MustParseAddr("198.51.100.79"), Dst: netip.AddrPortFrom(a.ServiceBase, 80), Protocol: endpoints.TCP})
	if err != nil {
		t.Fatal(err)
	}
	want := "IPv4 nat " + leaf + " (different)"
	if len(e.Drift) != 1 || e.Drift[0].String() != want {
		t.Errorf("drift %v, want only %s", e.Drift, want)
	}
	if !strings.Contains(strings.Join(e.Warnings, "\n"), want) {
		t.Errorf("the warnings do not name %s: %v", want, e.Warnings)
	}
	if e.Outcome.Verdict != VerdictAccept {
		t.Errorf("the kernel now returns the packet untranslated, yet the outcome is %+v", e.Outcome)
	}
}
