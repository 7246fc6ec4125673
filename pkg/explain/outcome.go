package explain

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// candidates are the kernel's translated outcomes, with what the view
// knows of each endpoint.
func candidates(kernel []iptables.Outcome, m *matched, snap *endpoints.Snapshot) []Candidate {
	out := []Candidate{}
	for _, o := range kernel {
		if o.Verdict != "ACCEPT" || !o.DNAT {
			continue
		}
		c := Candidate{Endpoint: o.Dst.String(), Probability: o.Probability, Masquerade: o.Masquerade}
		if m != nil {
			for _, ep := range snap.Endpoints[m.svc.Name] {
				if ep.IP == o.Dst.Addr() && ep.Port == int32(o.Dst.Port()) {
					c.Known, c.Node, c.Zone, c.Local = true, ep.NodeName, ep.Zone, ep.Local
					c.Ready, c.Serving, c.Terminating = ep.Ready, ep.Serving, ep.Terminating
				}
			}
		}
		out = append(out, c)
	}
	return out
}

// kind sorts a traced outcome into a verdict.
func kind(o iptables.Outcome) string {
	switch {
	case o.Verdict == "ACCEPT" && o.DNAT:
		return VerdictDNAT
	case o.Verdict == "ACCEPT":
		return VerdictAccept
	}
	return o.Verdict
}

// outcome sums the kernel's outcomes up: one verdict (MIXED when the
// packet may meet several), a sentence, and the rules that decided. A
// UDP datagram the node itself sends is dropped on its way out, so the
// kernel fails the send at once (EPERM); a TCP connection just waits.
func outcome(kernel []iptables.Outcome, cands []Candidate, q Query) Outcome {
	out := Outcome{Rules: []string{}}
	for _, o := range kernel {
		k := kind(o)
		switch out.Verdict {
		case "":
			out.Verdict = k
		case k:
		default:
			out.Verdict = VerdictMixed
		}
		if r := deciding(o); r != "" && !slices.Contains(out.Rules, r) {
			out.Rules = append(out.Rules, r)
		}
	}
	switch out.Verdict {
	case VerdictDNAT:
		parts := make([]string, len(cands))
		for i, c := range cands {
			parts[i] = fmt.Sprintf("%s (p=%.2f)", c.Endpoint, c.Probability)
		}
		out.Summary = "DNAT to " + strings.Join(parts, ", ")
	case VerdictReject:
		out.Summary = "rejected: the client is refused at once"
	case VerdictDrop:
		out.Summary = "dropped: the client gets no answer"
		if q.FromNode && q.Protocol == endpoints.UDP {
			out.Summary = "dropped on its way out of the node: the sending program's send fails at once (EPERM)"
		}
	case VerdictAccept, "":
		out.Verdict = VerdictAccept
		out.Summary = "accepted unchanged: no rule translates it"
	default:
		parts := make([]string, len(kernel))
		for i, o := range kernel {
			parts[i] = o.String()
		}
		out.Summary = "several outcomes: " + strings.Join(parts, ", ")
	}
	return out
}

// deciding quotes the rule that decided an outcome: the DNAT for a
// translated packet, the last rule taken otherwise.
func deciding(o iptables.Outcome) string {
	for i := len(o.Path) - 1; i >= 0; i-- {
		h := o.Path[i]
		if !o.DNAT || h.Rule.Target() == "DNAT" {
			return hopText(h)
		}
	}
	return ""
}

// hopText spells a rule of the trace: "nat MP-VIP-8C #3: -m comment ...".
func hopText(h iptables.Hop) string {
	return fmt.Sprintf("%s %s #%d: %s", h.Table, h.Chain, h.Index+1, h.Rule)
}

// masquerade gives the kernel's verdict with the view's reason. A
// candidate that is the source itself is a hairpin, masqueraded by
// MP-HAIRPIN whatever the policy.
func masquerade(kernel []iptables.Outcome, cands []Candidate, sit situation, q Query, out Outcome) Masquerade {
	var m Masquerade
	accepted, masqueraded := 0, 0
	var rule string
	for _, o := range kernel {
		if o.Verdict != "ACCEPT" {
			continue
		}
		accepted++
		if o.Masquerade {
			masqueraded++
			if rule == "" {
				rule = masqueradeRule(o)
			}
		}
	}
	m.Masqueraded = accepted > 0 && masqueraded == accepted
	m.Partly = masqueraded > 0 && masqueraded < accepted
	switch {
	case out.Verdict == VerdictDrop || out.Verdict == VerdictReject:
		m.Reason = "the packet goes nowhere"
		return m
	case sit.masqReason == "":
		m.Reason = "not a Service: miniproxy does not masquerade it"
	default:
		m.Reason = sit.masqReason
	}
	for _, c := range cands {
		if ap, err := netip.ParseAddrPort(c.Endpoint); err == nil && c.Masquerade && ap.Addr() == q.Src {
			m.Reason = fmt.Sprintf("hairpin: to %s the packet comes from that endpoint itself, so it is masqueraded whatever the policy (MP-HAIRPIN); otherwise: %s", c.Endpoint, m.Reason)
		}
	}
	if rule != "" {
		m.Reason += " (kernel: " + rule + ")"
	}
	return m
}

// masqueradeRule quotes the MASQUERADE rule an outcome took.
func masqueradeRule(o iptables.Outcome) string {
	for _, h := range o.Path {
		if h.Rule.Target() == "MASQUERADE" {
			return hopText(h)
		}
	}
	return ""
}
