// Package iptablestest holds what the real iptables-restore was seen to
// accept and refuse, so that the model in pkg/iptables (and the dataplane
// fake built on it) can be held to the kernel's verdicts in unit tests, and
// the recorded verdicts held to the kernel in kernel tests.
package iptablestest

import (
	_ "embed"
	"fmt"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

//go:embed verdicts.txt
var verdictsText string

// Case is one recorded verdict: Inputs are applied in order to empty
// tables with --noflush; all but the last must be accepted, and the last
// is accepted exactly when Accept is true.
type Case struct {
	Name   string
	Family iptables.Family
	Accept bool
	Inputs []string
}

// Verdicts returns the recorded cases of verdicts.txt.
func Verdicts() ([]Case, error) {
	var out []Case
	for _, block := range strings.Split(verdictsText, "\n=== ")[1:] {
		name, rest, _ := strings.Cut(block, "\n")
		c := Case{Name: strings.TrimSpace(name)}
		var body []string
		for _, l := range strings.Split(rest, "\n") {
			switch {
			case strings.HasPrefix(l, "family: "):
				if strings.TrimSpace(l[len("family: "):]) == "6" {
					c.Family = iptables.IPv6
				} else {
					c.Family = iptables.IPv4
				}
			case strings.HasPrefix(l, "want: "):
				switch strings.TrimSpace(l[len("want: "):]) {
				case "accept":
					c.Accept = true
				case "refuse":
				default:
					return nil, fmt.Errorf("case %q: want must be accept or refuse", c.Name)
				}
			case strings.HasPrefix(l, "#"):
			default:
				body = append(body, l)
			}
		}
		for _, in := range strings.Split(strings.Join(body, "\n"), "\n---\n") {
			if in = strings.TrimSpace(in); in != "" {
				c.Inputs = append(c.Inputs, in+"\n")
			}
		}
		if c.Family == 0 || len(c.Inputs) == 0 {
			return nil, fmt.Errorf("case %q: needs a family and an input", c.Name)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no cases in verdicts.txt")
	}
	return out, nil
}
