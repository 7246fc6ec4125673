package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/explain"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
	"github.com/miniproxy/miniproxy/test/netns"
)

// inNamespace is a Runner that runs every call inside ns, so that a
// server goroutine reads the namespace's tables and never the root's.
type inNamespace struct {
	dataplane.Runner
	ns *netns.Namespace
}

func (r inNamespace) Save(fam iptables.Family, table iptables.Table) (out []byte, err error) {
	err = r.ns.Do(func() error { out, err = r.Runner.Save(fam, table); return err })
	return out, err
}

func (r inNamespace) SaveCounters(fam iptables.Family) (out []byte, err error) {
	err = r.ns.Do(func() error { out, err = r.Runner.SaveCounters(fam); return err })
	return out, err
}

// runExplainCommand runs `miniproxy explain args...` on a goroutine of its
// own: with --netns the command locks its thread into the namespace for
// good, and that thread ends with the goroutine.
func runExplainCommand(t *testing.T, args ...string) (string, error) {
	t.Helper()
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		var out bytes.Buffer
		err := run(append([]string{"explain"}, args...), &out)
		done <- result{out.String(), err}
	}()
	r := <-done
	return r.out, r.err
}

// getInNamespace asks url from inside ns, where the daemon listens.
func getInNamespace(t *testing.T, ns *netns.Namespace, url string) (int, string) {
	t.Helper()
	var code int
	var body []byte
	err := ns.Do(func() error {
		c, err := clientHere(url)
		if err != nil {
			return err
		}
		res, err := c.Get(url)
		if err != nil {
			return err
		}
		defer res.Body.Close()
		code = res.StatusCode
		body, err = io.ReadAll(res.Body)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return code, string(body)
}

// A node of its own: a real sync writes the rules of the tutorial's
// LoadBalancer into a network namespace with the real iptables-restore,
// its debug server listens inside it, and `miniproxy explain --netns`
// reads both from there.
func TestExplainCommandReadsTheNamespacesRulesAndTheDaemonsView(t *testing.T) {
	if os.Getenv("MINIPROXY_UNIT_ONLY") != "" {
		t.Skip("make unit: no test that needs the kernel")
	}
	lab := netns.NewLab(t)
	ns, err := lab.AddNamespace("expl")
	if err != nil {
		t.Fatal(err)
	}
	nodeIP := netip.MustParseAddr("10.240.0.3")
	if err := ns.AddAddr("lo", netip.PrefixFrom(nodeIP, 32)); err != nil {
		t.Fatal(err)
	}
	addrs := func(f iptables.Family) ([]netip.Addr, error) {
		if f == iptables.IPv4 {
			return []netip.Addr{nodeIP}, nil
		}
		return nil, nil
	}

	runner := inNamespace{Runner: dataplane.NewRunner(), ns: ns}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	tracker := endpoints.NewTracker("node1", log, nil)
	var p *proxy.Proxier
	if err := ns.Do(func() error {
		dp, err := dataplane.New(dataplane.NewRunner(), iptables.IPv4, rules.Prefix)
		if err != nil {
			return err
		}
		p = proxy.New(proxy.Options{SyncPeriod: time.Minute, DetectLocal: rules.DetectLocal{Mode: rules.DetectClusterCIDR, CIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}}},
			tracker, map[iptables.Family]proxy.Applier{iptables.IPv4: dp}, addrs, log)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	debug := &debugServer{runner: runner, addrs: bothFamilies(addrs)}
	p.OnSync(debug.onSync)
	tracker.OnServiceAdd(lbService(32000))
	tracker.OnEndpointSliceAdd(webSlice("node1"))
	if err := ns.Do(func() error { return p.Sync(false).Err }); err != nil {
		t.Fatalf("sync in the namespace: %v", err)
	}

	var ln net.Listener
	if err := ns.Do(func() (err error) { ln, err = net.Listen("tcp", "127.0.0.1:0"); return err }); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: debug.handler(http.NotFoundHandler())}
	go srv.Serve(ln)
	defer srv.Shutdown(context.Background())
	daemon := "http://" + ln.Addr().String()
	args := []string{"--netns", ns.Path(), "--daemon", daemon, "--src", "198.51.100.79", "--dst", "203.0.113.140:80/tcp"}

	out, err := runExplainCommand(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Service:    default/web (TCP), by its loadbalancer IP 203.0.113.140:80",
		"spec.externalTrafficPolicy: Local",
		"10.244.1.5:8080          p=1.000  node1 (this node), ready",
		"Masquerade: no: externalTrafficPolicy: Local keeps the client's IP",
		"Outcome:    DNAT",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("explain lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "WARNING") {
		t.Errorf("the namespace holds what the sync wrote, yet:\n%s", out)
	}

	out, err = runExplainCommand(t, append(args, "-o", "json", "--from-node", "--src", nodeIP.String())...)
	var e explain.Explanation
	if err != nil || json.Unmarshal([]byte(out), &e) != nil {
		t.Fatalf("-o json: %v\n%s", err, out)
	}
	if !e.Masquerade.Masqueraded || e.Outcome.Verdict != explain.VerdictDNAT || !e.Query.FromNode {
		t.Errorf("the node's own traffic to its load balancer IP: %+v", e)
	}

	code, body := getInNamespace(t, ns, daemon+"/debug/trace?src=198.51.100.79&dst=203.0.113.140&port=80")
	if code != 200 || !strings.Contains(body, "Outcome:    DNAT") {
		t.Errorf("/debug/trace: %d\n%s", code, body)
	}
	code, body = getInNamespace(t, ns, daemon+"/debug/rules?service=default/web")
	if code != 200 || !strings.Contains(body, `IPv4 nat [0 packets, 0 bytes] -A MP-VIP-8C -d 203.0.113.140/32 -p tcp -m comment --comment "default/web loadbalancer IP"`) {
		t.Errorf("/debug/rules: %d\n%s", code, body)
	}

	// A rule changed behind miniproxy's back, with the real iptables.
	if _, _, err := ns.Run(context.Background(), "iptables", "-t", "nat", "-I", "MP-VIP-8C", "1", "-s", "198.51.100.0/24", "-j", "RETURN"); err != nil {
		t.Fatal(err)
	}
	out, err = runExplainCommand(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Outcome:    ACCEPT", "WARNING:", "IPv4 nat MP-VIP-8C (different)"} {
		if !strings.Contains(out, want) {
			t.Errorf("after the change, explain lacks %q:\n%s", want, out)
		}
	}
}
