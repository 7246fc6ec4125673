package explain

import (
	"fmt"
	"strings"
)

// Text renders an explanation for an operator, in the order of the
// questions it answers.
func (e *Explanation) Text() string {
	var b strings.Builder
	from := "from a network"
	if e.Query.FromNode {
		from = "from this node"
	} else if e.Query.InIface != "" {
		from += " on " + e.Query.InIface
	}
	fmt.Fprintf(&b, "Packet:     %s %s -> %s, %s (%s)\n", e.Query.Protocol, e.Query.Src, e.Query.Dst, from, e.Query.Family)
	if e.Service == nil {
		b.WriteString("Service:    not a Service (no Service has this address and port)\n")
	} else {
		fmt.Fprintf(&b, "Service:    %s (%s), by its %s %s\n", e.Service, e.Service.Protocol, e.Service.Via, e.Service.Address)
	}
	if len(e.Policies) > 0 {
		b.WriteString("Policies:\n")
		for _, p := range e.Policies {
			fmt.Fprintf(&b, "  %s: %s\n      %s\n", p.Field, p.Value, p.Effect)
		}
	}
	if len(e.Candidates) > 0 {
		b.WriteString("Endpoints (from the kernel's rules):\n")
		for _, c := range e.Candidates {
			fmt.Fprintf(&b, "  %-24s p=%.3f  %s\n", c.Endpoint, c.Probability, describe(c))
		}
	}
	yes := "no"
	switch {
	case e.Masquerade.Partly:
		yes = "to some endpoints"
	case e.Masquerade.Masqueraded:
		yes = "yes"
	}
	fmt.Fprintf(&b, "Masquerade: %s: %s\n", yes, e.Masquerade.Reason)
	fmt.Fprintf(&b, "Outcome:    %s: %s\n", e.Outcome.Verdict, e.Outcome.Summary)
	for _, r := range e.Outcome.Rules {
		fmt.Fprintf(&b, "  by %s\n", r)
	}
	for _, w := range e.Warnings {
		fmt.Fprintf(&b, "WARNING:    %s\n", w)
	}
	return b.String()
}

// describe says what the view knows of a candidate endpoint.
func describe(c Candidate) string {
	if !c.Known {
		return "not an endpoint of this Service in miniproxy's view"
	}
	var parts []string
	node := c.Node
	if node == "" {
		node = "node unknown"
	}
	if c.Local {
		node += " (this node)"
	}
	parts = append(parts, node)
	if c.Zone != "" {
		parts = append(parts, "zone "+c.Zone)
	}
	switch {
	case c.Ready:
		parts = append(parts, "ready")
	case c.Serving && c.Terminating:
		parts = append(parts, "serving, terminating")
	default:
		parts = append(parts, "not ready")
	}
	if c.Masquerade {
		parts = append(parts, "masqueraded")
	}
	return strings.Join(parts, ", ")
}
