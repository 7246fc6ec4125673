package parity

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"net/netip"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/miniproxy/miniproxy/pkg/explain"
	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

var (
	agreeScenarios = flag.Int("agree.scenarios", 30, "how many random scenarios the agreement test runs (of -parity.seed)")
	agreeProbes    = flag.Int("agree.probes", 16, "at most this many probes per random scenario, spread over its list (0: all)")
	transcript     = flag.String("agree.transcript", "", "a Markdown file whose transcript section is rewritten with explain's answers for the tutorial's Local-policy LoadBalancer (docs/explain.md)")
)

// agreeTries is how often a probe is asked in the agreement test: every
// answer must agree with explain, so one answer per endpoint is not needed;
// a probe that disagrees is asked confirmTries times again, and those
// answers decide.
const agreeTries = 6

// TestExplainAgreesWithTraffic runs the tutorial's cases and random
// scenarios on a lab of miniproxy nodes and, for each probe, asks
// `miniproxy explain -o json` on the node whose rules decide the packet (the
// client pod's node, the node itself, the node an outside client sends
// through), inside that node's namespace against its running daemon, and
// compares its answer with what the client saw: every endpoint that
// answered is among the candidates; the address the endpoint saw is the
// client's own when explain says the packet is not masqueraded, and the
// node's when it is; a refused connection is a REJECT, a silence a DROP, an
// answer a DNAT (a packet explain passes on unchanged reaches no endpoint).
// Explain must give no warning: nothing changed the rules behind
// miniproxy's back. Then a rule changed behind its back must be named.
func TestExplainAgreesWithTraffic(t *testing.T) {
	labBinaries(t)
	ctx := context.Background()
	bin, err := netns.Build("github.com/miniproxy/miniproxy/cmd/miniproxy")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	s, err := startSide(ctx, miniproxy, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			t.Logf("--- lab:\n%s", s.c.Outputs())
		}
		s.close()
	}()
	t.Logf("lab up in %s", time.Since(start).Round(time.Second))
	a := &agreement{s: s, bin: bin, asked: map[string]int{}}

	run := time.Now()
	clusterPolicies, localPolicies := tutorial()
	a.scenario(t, "tutorial, Cluster policies", clusterPolicies, probes(clusterPolicies), nil)
	a.scenario(t, "tutorial, Local policies", localPolicies, probes(localPolicies), func(t *testing.T) {
		if *transcript != "" {
			a.writeTranscript(t, localPolicies, *transcript)
		}
		a.drift(t, localPolicies)
	})
	for i := 0; i < *agreeScenarios; i++ {
		sc := generate(*seed, i)
		a.scenario(t, fmt.Sprintf("random scenario %d", i), sc, spread(probes(sc), *agreeProbes), nil)
	}
	total := 0
	var kinds []string
	for _, k := range slices.Sorted(maps.Keys(a.asked)) {
		total += a.asked[k]
		kinds = append(kinds, fmt.Sprintf("%s %d", k, a.asked[k]))
	}
	t.Logf("%d probes asked of explain and of the lab in %s (%s), %d transient failures among answers left out",
		total, time.Since(run).Round(time.Second), strings.Join(kinds, ", "), s.transient.Load())
}

// agreement asks explain and the lab the same questions.
type agreement struct {
	s   *side
	bin string // miniproxy
	mu  sync.Mutex
	// asked counts the probes compared, by explain's verdict (and, for a
	// DNAT, its masquerade verdict).
	asked map[string]int
}

// scenario puts sc into the lab, compares explain with the traffic of ps,
// runs then (with sc still in place) and clears sc.
func (a *agreement) scenario(t *testing.T, name string, sc scenario, ps []probe, then func(*testing.T)) {
	ctx := context.Background()
	if err := a.s.apply(ctx, sc); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if err := a.s.waitSynced(ctx); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	t.Run(name, func(t *testing.T) {
		a.compare(t, sc, ps)
		if then != nil {
			then(t)
		}
	})
	if err := a.s.clear(ctx, sc); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

// compare asks explain and the lab each probe, several at once, and fails
// on each disagreement that asking the lab confirmTries times confirms.
func (a *agreement) compare(t *testing.T, sc scenario, ps []probe) {
	ctx := context.Background()
	// explain is a process each time: fewer at once than probes alone.
	atOnce(ps, 6, func(_ int, p probe) {
		n, src, fromNode := a.s.handler(p)
		out, err := a.explain(ctx, n, src, p, fromNode, "json")
		if err != nil {
			t.Errorf("%s: %v", p, err)
			return
		}
		var e explain.Explanation
		if err := json.Unmarshal([]byte(out), &e); err != nil {
			t.Errorf("%s: explain -o json: %v\n%s", p, err, out)
			return
		}
		seen, bad, err := a.judge(ctx, &e, p, n, src, agreeTries)
		if err == nil && len(bad) > 0 {
			seen, bad, err = a.judge(ctx, &e, p, n, src, confirmTries)
		}
		if err != nil {
			t.Errorf("%s: %v", p, err)
			return
		}
		kind := e.Outcome.Verdict
		switch {
		case kind != explain.VerdictDNAT:
		case e.Masquerade.Partly:
			kind += " partly masqueraded"
		case e.Masquerade.Masqueraded:
			kind += " masqueraded"
		default:
			kind += " not masqueraded"
		}
		a.mu.Lock()
		a.asked[kind]++
		a.mu.Unlock()
		if len(bad) > 0 {
			text, _ := a.explain(ctx, n, src, p, fromNode, "text")
			t.Errorf("explain disagrees with the traffic: %s\n  %s\n  the client saw: %s\n  explain on %s:\n%s\n%s",
				p, strings.Join(bad, "\n  "), strings.Join(seen, " | "), n.Name, indent(text), sc.describe(p.Service))
		}
	})
}

// judge asks the lab a probe tries times and says how the answers
// disagree with e.
func (a *agreement) judge(ctx context.Context, e *explain.Explanation, p probe, n *cluster.Node, src netip.Addr, tries int) ([]string, []string, error) {
	seen, _, err := a.s.answers(ctx, p, tries)
	if err != nil {
		return nil, nil, err
	}
	return seen, a.s.disagreements(e, p, n, src, seen), nil
}

// explain runs `miniproxy explain` for a probe in node n's namespace,
// against the daemon running there, with output "json" or "text".
func (a *agreement) explain(ctx context.Context, n *cluster.Node, src netip.Addr, p probe, fromNode bool, output string) (string, error) {
	args := explainArgs(src, p, fromNode)
	cmd := exec.CommandContext(ctx, a.bin, append([]string{"explain", "--netns", n.NS.Path(), "-o", output}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("miniproxy explain %s on %s: %w: %s", strings.Join(args, " "), n.Name, err, stderr.String())
	}
	return string(out), nil
}

// explainArgs are the question explain is asked about a probe.
func explainArgs(src netip.Addr, p probe, fromNode bool) []string {
	args := []string{"--src", src.String(), "--dst", p.Addr.String() + "/" + p.Proto}
	if fromNode {
		args = append(args, "--from-node")
	}
	return args
}

// handler says which node's rules decide a probe's packet, and what
// explain is asked there: the client pod's node, with the pod's address;
// the node itself (--from-node), with its address; the node an outside
// client sends through, with the client's address.
func (s *side) handler(p probe) (n *cluster.Node, src netip.Addr, fromNode bool) {
	switch {
	case strings.HasPrefix(p.From, podOn):
		node := strings.TrimPrefix(p.From, podOn)
		return s.c.Node(node), s.clients[node].IP, false
	case strings.HasPrefix(p.From, "outside via "):
		client := outsideClient(p.From)
		return s.c.Node(outsideVia(client)), outsideAddr[client], false
	}
	n = s.c.Node(p.From)
	return n, n.IP, true
}

// disagreements says how what the client saw (answers' set) contradicts
// explain's answer e, asked on node n with source src.
func (s *side) disagreements(e *explain.Explanation, p probe, n *cluster.Node, src netip.Addr, seen []string) []string {
	var bad []string
	if len(e.Warnings) > 0 {
		bad = append(bad, "explain warns, yet nothing changed miniproxy's rules: "+strings.Join(e.Warnings, "; "))
	}
	if e.Service != nil && (e.Service.Name != p.Service || e.Service.Port != p.Port) {
		bad = append(bad, fmt.Sprintf("explain names the Service %s, not %s:%s", e.Service, p.Service, p.Port))
	}
	verdict := e.Outcome.Verdict
	for _, answer := range seen {
		switch answer {
		case refused:
			// The node's own datagram, dropped on its way out, fails its
			// send at once (EPERM), which the probe counts as refused.
			ownDatagram := e.Query.FromNode && e.Query.Protocol == "udp" && verdict == explain.VerdictDrop
			if verdict != explain.VerdictReject && verdict != explain.VerdictAccept && !ownDatagram {
				bad = append(bad, "the client was refused; explain says "+verdict)
			}
		case dropped:
			if verdict != explain.VerdictDrop && verdict != explain.VerdictAccept {
				bad = append(bad, "the client got no answer; explain says "+verdict)
			}
		default:
			pod, client, _ := strings.Cut(answer, "<-")
			if verdict != explain.VerdictDNAT {
				bad = append(bad, fmt.Sprintf("%s answered; explain says %s", pod, verdict))
				continue
			}
			ep := s.c.Pod(pod)
			c := candidate(e, ep.IP)
			if c == nil || c.Probability <= 0 {
				bad = append(bad, fmt.Sprintf("%s (%s) answered; it is not among explain's candidates", pod, ep.IP))
				continue
			}
			masq := e.Masquerade.Masqueraded
			if e.Masquerade.Partly {
				masq = c.Masquerade
			}
			if want := sourceSeen(n, ep, src, masq); client != want.String() {
				bad = append(bad, fmt.Sprintf("%s saw the source %s; explain says masqueraded=%v (partly=%v), so it would see %s",
					pod, client, e.Masquerade.Masqueraded, e.Masquerade.Partly, want))
			}
		}
	}
	return bad
}

// candidate finds the endpoint at ip among e's candidates.
func candidate(e *explain.Explanation, ip netip.Addr) *explain.Candidate {
	for i, c := range e.Candidates {
		if ap, err := netip.ParseAddrPort(c.Endpoint); err == nil && ap.Addr() == ip {
			return &e.Candidates[i]
		}
	}
	return nil
}

// sourceSeen is the address an endpoint pod sees for a packet from src that
// node n decided on: src itself, or, masqueraded, n's address on the way to
// the pod (its address on the pod links for a pod of its own, its LAN
// address for a pod on another node).
func sourceSeen(n *cluster.Node, ep *cluster.Pod, src netip.Addr, masqueraded bool) netip.Addr {
	switch {
	case !masqueraded:
		return src
	case ep.Node == n:
		return n.Gateway
	}
	return n.IP
}

// spread picks at most max of ps, evenly spread over the list, so that
// every kind of address and source keeps a chance (max <= 0: all).
func spread(ps []probe, max int) []probe {
	if max <= 0 || len(ps) <= max {
		return ps
	}
	out := make([]probe, max)
	for i := range out {
		out[i] = ps[i*len(ps)/max]
	}
	return out
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ")
}

// tutorial gives the cases of the Source IP tutorial as two scenarios of
// the lab, with one echo pod (b-node1-0) behind every Service, on node1:
// a ClusterIP asked from pods on both nodes, a NodePort and a LoadBalancer
// with externalTrafficPolicy Cluster; then a NodePort and a LoadBalancer
// (203.0.113.140) with Local, asked from outside through both nodes: the
// node with the endpoint serves and keeps the client's address, the other
// drops. Their addresses and ports are apart from the random scenarios'.
func tutorial() (clusterPolicies, localPolicies scenario) {
	pods := poolNames()
	for i := range pods {
		pods[i].Ready = true
		if pods[i].Name == "b-node1-0" {
			pods[i].Slots = []int{0, 1, 2}
		}
	}
	port := func(nodePort int32) []portSpec {
		return []portSpec{{Protocol: v1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080), NodePort: nodePort}}
	}
	clusterIP := func(i byte) netip.Addr { return netip.AddrFrom4([4]byte{10, 96, 250, i}) }
	lb := func(ip string) []lbIngress { return []lbIngress{{IP: netip.MustParseAddr(ip)}} }
	clusterPolicies = scenario{Index: -1, Pods: pods, Services: []serviceSpec{
		{Slot: 0, Name: "clusterip", Type: v1.ServiceTypeClusterIP, ClusterIP: clusterIP(1), Ports: port(0)},
		{Slot: 1, Name: "nodeport", Type: v1.ServiceTypeNodePort, ClusterIP: clusterIP(2), Ports: port(32701)},
		{Slot: 2, Name: "loadbalancer", Type: v1.ServiceTypeLoadBalancer, ClusterIP: clusterIP(3), Ports: port(32702), LoadBalancer: lb("203.0.113.141")},
	}}
	localPolicies = scenario{Index: -2, Pods: pods, Services: []serviceSpec{
		{Slot: 0, Name: "nodeport-local", Type: v1.ServiceTypeNodePort, ClusterIP: clusterIP(4), Ports: port(32703), ExternalLocal: true},
		{Slot: 1, Name: "loadbalancer-local", Type: v1.ServiceTypeLoadBalancer, ClusterIP: clusterIP(5), Ports: port(32704), ExternalLocal: true,
			HealthCheckNodePort: 32705, LoadBalancer: lb(cluster.FirstVIP.String())},
	}}
	return clusterPolicies, localPolicies
}

// drift changes a rule of the Local LoadBalancer behind miniproxy's back,
// with iptables in node1's namespace (the admitted client via node1 is sent
// back out of the load balancer chain), and wants `miniproxy explain` to
// name the chain in its warning and to agree with the traffic that the
// packet now reaches no endpoint; then it puts the rule back and wants the
// warning gone.
func (a *agreement) drift(t *testing.T, sc scenario) {
	ctx := context.Background()
	var p probe
	for _, q := range probes(sc) {
		if q.Target == "load balancer IP" && q.From == fmt.Sprintf(fromIn, "node1") {
			p = q
		}
	}
	n, src, _ := a.s.handler(p)
	save, _, err := n.NS.Run(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^-A (MP-\S+) .*--comment "default/` + p.Service + ` loadbalancer IP"`).FindStringSubmatch(save)
	if m == nil {
		t.Fatalf("no rule of node1's nat table names default/%s's load balancer IP:\n%s", p.Service, save)
	}
	chain := m[1]
	rule := []string{chain, "-s", src.String() + "/32", "-j", "RETURN"}
	if _, _, err := n.NS.Run(ctx, "iptables", append([]string{"-t", "nat", "-I"}, rule...)...); err != nil {
		t.Fatal(err)
	}
	out, err := a.explain(ctx, n, src, p, false, "text")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"WARNING:", "IPv4 nat " + chain + " (different)", "Outcome:    ACCEPT"} {
		if !strings.Contains(out, want) {
			t.Errorf("after a rule was inserted into %s, explain on node1 lacks %q:\n%s", chain, want, out)
		}
	}
	var e explain.Explanation
	if j, err := a.explain(ctx, n, src, p, false, "json"); err != nil || json.Unmarshal([]byte(j), &e) != nil {
		t.Fatalf("explain -o json: %v\n%s", err, j)
	}
	seen, _, err := a.s.answers(ctx, p, agreeTries)
	if err != nil {
		t.Fatal(err)
	}
	e.Warnings = nil // expected here; the rest must agree
	if bad := a.s.disagreements(&e, p, n, src, seen); len(bad) > 0 {
		t.Errorf("with the drifted rule, explain disagrees with the traffic: %s\n  %s\n  the client saw: %s", p, strings.Join(bad, "\n  "), strings.Join(seen, " | "))
	}
	if _, _, err := n.NS.Run(ctx, "iptables", append([]string{"-t", "nat", "-D"}, rule...)...); err != nil {
		t.Fatal(err)
	}
	if out, err := a.explain(ctx, n, src, p, false, "text"); err != nil || strings.Contains(out, "WARNING") {
		t.Errorf("with the rule put back, explain still warns (%v):\n%s", err, out)
	}
}

// writeTranscript asks explain, as text, about the tutorial's Local
// LoadBalancer from the admitted outside client of each node, with what
// that client saw, and puts both into path between the transcript markers.
func (a *agreement) writeTranscript(t *testing.T, sc scenario, path string) {
	ctx := context.Background()
	var b strings.Builder
	for _, q := range probes(sc) {
		if q.Target != "load balancer IP" || !strings.HasPrefix(q.From, "outside via ") || !strings.HasSuffix(q.From, "(admitted)") {
			continue
		}
		n, src, fromNode := a.s.handler(q)
		out, err := a.explain(ctx, n, src, q, fromNode, "text")
		if err != nil {
			t.Fatal(err)
		}
		seen, _, err := a.s.answers(ctx, q, tries)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s# miniproxy explain %s\n%s", n.Name, strings.Join(explainArgs(src, q, fromNode), " "), out)
		said := make([]string, len(seen))
		for i, answer := range seen {
			pod, client, ok := strings.Cut(answer, "<-")
			said[i] = map[string]string{refused: "refused", dropped: "no answer (dropped)"}[answer]
			if ok {
				said[i] = fmt.Sprintf("answered by %s, which saw client_address=%s", pod, client)
			}
		}
		fmt.Fprintf(&b, "# %d new connections from %s: %s\n\n", tries, src, strings.Join(said, "; "))
	}
	if err := rewriteMarked(path, "transcript", strings.TrimSpace(b.String())); err != nil {
		t.Fatal(err)
	}
}
