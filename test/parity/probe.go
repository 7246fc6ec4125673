package parity

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/test/netns"
)

// probe is one kind of request of a scenario: from a source, over a
// protocol, to one address of a Service port.
type probe struct {
	Service, Port string
	Proto         string // "tcp" or "udp"
	// Target says which address: "cluster IP", "node port of node1",
	// "load balancer IP", "external IP".
	Target string
	// From names the source: "pod on node1", "node1", "outside via node1
	// (admitted)", ...
	From     string
	Addr     netip.AddrPort
	Affinity bool
}

func (p probe) String() string {
	return fmt.Sprintf("%s:%s %s %s from %s (%s)", p.Service, p.Port, p.Proto, p.Target, p.From, p.Addr)
}

// Sources, by what they are.
const (
	podOn   = "pod on "
	fromIn  = "outside via %s (admitted)"
	fromOut = "outside via %s (not admitted)"
)

var nodeIPs = map[string]netip.Addr{"node1": netip.MustParseAddr("10.240.0.3"), "node2": netip.MustParseAddr("10.240.0.4")}

// probes lists what to ask of a scenario. Every Service port of TCP or UDP
// is asked at each of its addresses from the sources that reach it: pods
// and nodes for a ClusterIP; a pod on the node, the node and an outside
// client for a node's NodePort; outside clients admitted and not admitted
// by loadBalancerSourceRanges, a pod and a node for load balancer and
// external IPs.
func probes(sc scenario) []probe {
	var out []probe
	for _, svc := range sc.Services {
		if svc.ExternalName || svc.Headless {
			continue
		}
		for _, p := range svc.Ports {
			if p.Protocol == v1.ProtocolSCTP {
				continue
			}
			base := probe{Service: svc.Name, Port: p.Name, Proto: strings.ToLower(string(p.Protocol)), Affinity: svc.Affinity}
			add := func(target, from string, ip netip.Addr, port int32) {
				q := base
				q.Target, q.From, q.Addr = target, from, netip.AddrPortFrom(ip, uint16(port))
				out = append(out, q)
			}
			for _, from := range []string{podOn + "node1", podOn + "node2", "node1", "node2"} {
				add("cluster IP", from, svc.ClusterIP, p.Port)
			}
			if p.NodePort != 0 {
				for _, node := range []string{"node1", "node2"} {
					target := "node port of " + node
					for _, from := range []string{podOn + node, node, fmt.Sprintf(fromIn, node)} {
						add(target, from, nodeIPs[node], p.NodePort)
					}
				}
			}
			external := []string{fmt.Sprintf(fromIn, "node1"), fmt.Sprintf(fromIn, "node2"), fmt.Sprintf(fromOut, "node1"), fmt.Sprintf(fromOut, "node2"), podOn + "node1", "node1"}
			for _, lb := range svc.LoadBalancer {
				for _, from := range external {
					add("load balancer IP", from, lb.IP, p.Port)
				}
			}
			for _, ip := range svc.ExternalIPs {
				for _, from := range external[:2] {
					add("external IP", from, ip, p.Port)
				}
				for _, from := range external[4:] {
					add("external IP", from, ip, p.Port)
				}
			}
		}
	}
	return out
}

// source finds the namespace a probe starts in.
func (s *side) source(from string) (*netns.Namespace, error) {
	switch {
	case strings.HasPrefix(from, podOn):
		return s.clients[strings.TrimPrefix(from, podOn)].NS, nil
	case strings.HasPrefix(from, "outside via "):
		return s.outside[outsideClient(from)], nil
	default:
		if n := s.c.Node(from); n != nil {
			return n.NS, nil
		}
	}
	return nil, fmt.Errorf("no source %q", from)
}

// outsideClient names the outside client of a source "outside via ...",
// as outsideAddr does ("in-node1").
func outsideClient(from string) string {
	var node, kind string
	fmt.Sscanf(from, "outside via %s (%s", &node, &kind)
	if strings.HasPrefix(kind, "admitted") {
		return "in-" + node
	}
	return "out-" + node
}

// Outcomes of one attempt besides an answer ("pod<-source").
const (
	refused = "refused"
	dropped = "dropped"
)

// attemptTimeout bounds one attempt; on the lab's veth links an answer
// takes well under a millisecond, so silence this long is a drop.
const attemptTimeout = 300 * time.Millisecond

var (
	hostnameRE = regexp.MustCompile(`hostname=(\S+)`)
	serverRE   = regexp.MustCompile(`server=(\S+)`)
	clientRE   = regexp.MustCompile(`client_address=(\S+)`)
)

// attempt makes one new connection (or datagram exchange) and says what
// came back: the answering pod and the source it saw, refused or dropped.
func attempt(ctx context.Context, ns *netns.Namespace, proto string, addr netip.AddrPort) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, attemptTimeout)
	defer cancel()
	conn, err := ns.DialContext(ctx, proto, addr.String())
	if err != nil {
		return classify(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(attemptTimeout))
	var body string
	if proto == "tcp" {
		fmt.Fprintf(conn, "GET / HTTP/1.0\r\nHost: parity\r\n\r\n")
		b, err := io.ReadAll(conn)
		if err != nil && len(b) == 0 {
			return classify(err)
		}
		body = string(b)
	} else {
		if _, err := conn.Write([]byte("parity")); err != nil {
			return classify(err)
		}
		buf := make([]byte, 4096)
		n, err := conn.Read(buf)
		if err != nil {
			return classify(err)
		}
		body = string(buf[:n])
	}
	server := hostnameRE.FindStringSubmatch(body)
	if proto == "udp" {
		server = serverRE.FindStringSubmatch(body)
	}
	client := clientRE.FindStringSubmatch(body)
	if server == nil || client == nil {
		return "", fmt.Errorf("not an echo server's answer: %q", body)
	}
	return server[1] + "<-" + client[1], nil
}

func classify(err error) (string, error) {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return refused, nil
	case errors.Is(err, syscall.ECONNRESET):
		return refused, nil
	case errors.Is(err, syscall.EPERM):
		// The node's own packet hit a REJECT in OUTPUT: the kernel
		// refuses the send itself.
		return refused, nil
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return dropped, nil
	}
	return "", err
}

// answers asks a probe tries times (a silence is confirmed twice, not
// asked tries times) and returns the set of what came back, sorted, and the
// namespace it was asked from.
func (s *side) answers(ctx context.Context, p probe, tries int) ([]string, *netns.Namespace, error) {
	ns, err := s.source(p.From)
	if err != nil {
		return nil, nil, err
	}
	seen := map[string]int{}
	n := 0
	for ; n < tries; n++ {
		got, err := attempt(ctx, ns, p.Proto, p.Addr)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %s: %w", s.proxy, p, err)
		}
		seen[got]++
		if got == dropped && n == 2 && len(seen) == 1 {
			n++
			break
		}
	}
	var set []string
	for k, c := range seen {
		// A failure among answers, in under 5% of the attempts, is the
		// network's, not the rules' (a masqueraded source port meeting an
		// old connection's, say): rules that send traffic nowhere do it
		// for a whole endpoint's share. It is counted, not compared.
		if (k == refused || k == dropped) && len(seen) > 1 && c*20 < n {
			s.transient.Add(1)
			continue
		}
		set = append(set, k)
	}
	sort.Strings(set)
	return set, ns, nil
}

// outcome is a probe's answers as the proxies are compared on them: a
// Service with session affinity must always give the same answer, so its
// answer is reduced to the source the endpoint saw.
func (s *side) outcome(ctx context.Context, p probe, tries int) (string, error) {
	set, ns, err := s.answers(ctx, p, tries)
	if err != nil {
		return "", err
	}
	if p.Affinity && len(set) == 1 && set[0] != dropped && set[0] != refused {
		// Which endpoint a client sticks to is chance, and so is the node
		// address a masqueraded packet leaves with (the LAN's or the pod
		// link's): what must agree is that it sticks and whose address the
		// endpoint sees.
		_, source, _ := strings.Cut(set[0], "<-")
		return "always the same endpoint <-" + s.whose(source, ns), nil
	}
	return strings.Join(set, " | "), nil
}

// whose says whose address source is: the client's own, a node's, or
// another (given as is).
func (s *side) whose(source string, from *netns.Namespace) string {
	for _, n := range s.c.Nodes {
		if source == n.IP.String() || source == n.Gateway.String() {
			if n.NS == from {
				return "the node's own"
			}
			return "a node's"
		}
	}
	for name, ns := range s.outside {
		if ns == from && source == outsideAddr[name].String() {
			return "the client's own"
		}
	}
	for _, p := range s.clients {
		if p.NS == from && source == p.IP.String() {
			return "the client's own"
		}
	}
	return source
}

// outcomes asks every probe on the side, several at once.
func (s *side) outcomes(ctx context.Context, ps []probe, tries int) ([]string, error) {
	out := make([]string, len(ps))
	errs := make([]error, len(ps))
	atOnce(ps, 12, func(i int, p probe) { out[i], errs[i] = s.outcome(ctx, p, tries) })
	return out, errors.Join(errs...)
}

// atOnce calls f for every probe, at most n at a time, and returns when
// all calls have.
func atOnce(ps []probe, n int, f func(i int, p probe)) {
	sem := make(chan struct{}, n)
	var wg sync.WaitGroup
	for i, p := range ps {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			f(i, p)
		}()
	}
	wg.Wait()
}
