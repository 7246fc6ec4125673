package explain

import (
	"strings"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// KernelRule is one of miniproxy's rules as the kernel holds it, with its
// counters: how many first packets took it (nat) or met it (filter).
type KernelRule struct {
	Family  string `json:"family"`
	Table   string `json:"table"`
	Chain   string `json:"chain"`
	Rule    string `json:"rule"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// ServiceRules lists the rules of miniproxy's chains whose comment names
// the Service svc (namespace and name; every port), family by family
// (IPv4 first), table by table, in the order of the kernel's chains. saved
// is iptables-save -c output read with iptables.ParseSave.
func ServiceRules(saved map[iptables.Family]iptables.Saved, svc endpoints.ServicePortName) []KernelRule {
	out := []KernelRule{}
	for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		s, ok := saved[fam]
		if !ok {
			continue
		}
		for _, table := range s.Tables() {
			st := s[table]
			for _, chain := range st.Chains {
				if !strings.HasPrefix(chain, rules.Prefix) {
					continue
				}
				for i, r := range st.Rules[chain] {
					if name, ok := rules.ServiceOfRule(r.String()); !ok || name != svc.ServiceName() {
						continue
					}
					kr := KernelRule{Family: fam.String(), Table: string(table), Chain: chain, Rule: r.String()}
					if c := st.Counters[chain]; i < len(c) {
						kr.Packets, kr.Bytes = c[i].Packets, c[i].Bytes
					}
					out = append(out, kr)
				}
			}
		}
	}
	return out
}
