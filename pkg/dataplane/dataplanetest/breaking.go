// Package dataplanetest holds test doubles of the dataplane's edge.
package dataplanetest

import (
	"regexp"
	"strings"
	"sync"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// Break is how Breaking spoils a Service's rules.
type Break int

const (
	// DropProtocol removes "-p <protocol>" from the Service's rules, the
	// defect of issue 11: iptables-restore refuses the input and names
	// the line.
	DropProtocol Break = iota
	// JumpNowhere sends the Service's DNAT rules to a chain that does not
	// exist: iptables-restore refuses the input and names only its COMMIT
	// line, so nothing tells which Service is at fault.
	JumpNowhere
)

// Breaking is a dataplane.Runner that makes the rules of one Service rules
// the kernel refuses, as a defect of the rules package would, and passes
// everything else through unchanged. Restores and checks are spoiled
// alike, so the Service is refused in the live tables and in scratch
// namespaces. It lets tests show that one unprogrammable Service affects no
// other without changing the rules package.
type Breaking struct {
	dataplane.Runner

	how Break

	mu       sync.Mutex
	services map[string]bool // "ns/name"
	only     []string
}

// NewBreaking wraps r, breaking nothing until Break is called.
func NewBreaking(r dataplane.Runner, how Break) *Breaking {
	return &Breaking{Runner: r, how: how}
}

// Break spoils the rules of service ("ns/name"), or only those of its rules
// that contain every string of only: a new endpoint's address, say, so that
// the Service's earlier rules stay acceptable, as they are when a change
// to a Service is what the kernel refuses. An empty service spoils nothing.
func (b *Breaking) Break(service string, only ...string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.services, b.only = map[string]bool{}, only
	if service != "" {
		b.services[service] = true
	}
}

// BreakEach spoils every rule of each of services ("ns/name").
func (b *Breaking) BreakEach(services ...string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.services, b.only = map[string]bool{}, nil
	for _, svc := range services {
		b.services[svc] = true
	}
}

var (
	protoRE = regexp.MustCompile(` -p (tcp|udp|sctp)\b`)
	dnatRE  = regexp.MustCompile(`-j DNAT --to-destination \S+`)
)

// spoil rewrites the lines of the broken Service's rules.
func (b *Breaking) spoil(input []byte) []byte {
	b.mu.Lock()
	services, only := b.services, b.only
	b.mu.Unlock()
	if len(services) == 0 {
		return input
	}
	lines := strings.Split(string(input), "\n")
	for i, l := range lines {
		if !strings.HasPrefix(l, "-A ") {
			continue
		}
		svc, ok := rules.ServiceOfRule(l)
		if !ok || !services[svc.String()] || !containsAll(l, only) {
			continue
		}
		switch b.how {
		case DropProtocol:
			lines[i] = protoRE.ReplaceAllString(l, "")
		case JumpNowhere:
			lines[i] = dnatRE.ReplaceAllString(l, "-j MP-NOWHERE")
		}
	}
	return []byte(strings.Join(lines, "\n"))
}

// Restore restores input with the broken Service's rules spoilt.
func (b *Breaking) Restore(family iptables.Family, input []byte) error {
	return b.Runner.Restore(family, b.spoil(input))
}

// Check checks input with the broken Service's rules spoilt.
func (b *Breaking) Check(family iptables.Family, input []byte) error {
	return b.Runner.Check(family, b.spoil(input))
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}
