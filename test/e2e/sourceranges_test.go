package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

// The first field tried beyond the tutorial (issue 11): a LoadBalancer
// with loadBalancerSourceRanges admits the listed clients, refuses the
// others, and follows a change of its ranges within a second, on every
// node. The client sits in 198.51.100.0/24; the router reaches the load
// balancer IP from 10.240.0.1.
func TestLoadBalancerSourceRanges(t *testing.T) {
	runPod(t, "lbsr-app", "lbsr-app", "node1")
	expose(t, "lbsr", "lbsr-app", lbType, func(s *v1.Service) {
		s.Spec.LoadBalancerSourceRanges = []string{cluster.ClientNet.String()}
	})
	vip := waitVIP(t, "lbsr")
	url := fmt.Sprintf("http://%s/", vip)

	a := curl(t, lab.Client, url)
	if a.server != "lbsr-app" {
		t.Fatalf("a client inside the ranges should be served, saw %+v", a)
	}
	if _, err := curlOnce(lab.Router, url, time.Second); err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Errorf("the router (10.240.0.1) is outside the ranges: want its connection dropped, got %v", err)
	}

	// Measured on quiet nodes: a node that synced less than a second ago
	// waits out --iptables-min-sync-period (1s, kube-proxy's default) first, as
	// kube-proxy does.
	waitForQuietNodes(t)
	patch(t, "lbsr", `{"spec":{"loadBalancerSourceRanges":["10.240.0.1/32"]}}`)
	took, err := firstAnswer(lab.Router, vip.String()+":80", 10*time.Second)
	if err != nil {
		t.Fatalf("after the change the router should be admitted: %v", err)
	}
	t.Logf("the new ranges admitted the router %s after the change", took.Round(time.Millisecond))
	if took > time.Second {
		t.Errorf("the new ranges took %s to take effect, want within a second", took.Round(time.Millisecond))
	}
	if _, err := curlOnce(lab.Client, url, time.Second); err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Errorf("the client is outside the new ranges: want its connection dropped, got %v", err)
	}
}

// firstAnswer opens a new TCP connection to address from ns every 20 ms
// (a dropped SYN would only be retried after a second) and returns how long
// after the call the first attempt that got through was started.
func firstAnswer(ns *netns.Namespace, address string, limit time.Duration) (time.Duration, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	won := make(chan time.Duration, 1)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case d := <-won:
			return d, nil
		case <-ctx.Done():
			return 0, fmt.Errorf("no connection to %s from %s got through within %s", address, ns.Short(), limit)
		case <-tick.C:
			began := time.Since(start)
			go func() {
				attempt, stop := context.WithTimeout(ctx, 200*time.Millisecond)
				defer stop()
				if conn, err := ns.DialContext(attempt, "tcp", address); err == nil {
					conn.Close()
					select {
					case won <- began:
					default:
					}
				}
			}()
		}
	}
}

// syncedRE finds the time of each sync in miniproxy's log (klog's text
// format: "I1202 04:45:18.243394   7157 proxier.go:255] "rules synced" ...").
var syncedRE = regexp.MustCompile(`(?m)^I(\d{4} \d{2}:\d{2}:\d{2}\.\d{6})\s+\d+ \S+\] "rules synced"`)

// waitForQuietNodes waits until no node's miniproxy has synced for 1.2 s,
// so that the next change is not held back by --iptables-min-sync-period.
func waitForQuietNodes(t *testing.T) {
	t.Helper()
	err := cluster.Eventually(testContext(t), 20*time.Second, func() error {
		for _, n := range lab.Nodes {
			m := syncedRE.FindAllStringSubmatch(n.Proxy.Output(), -1)
			if len(m) == 0 {
				continue
			}
			// klog writes local time without the year.
			last, err := time.ParseInLocation("0102 15:04:05.000000", m[len(m)-1][1], time.Local)
			if err != nil {
				return err
			}
			now := time.Now()
			last = last.AddDate(now.Year(), 0, 0)
			if since := time.Since(last); since < 1200*time.Millisecond {
				return fmt.Errorf("%s synced %s ago", n.Name, since)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// refusingRestore is an iptables-restore for a node's PATH that spoils the
// rules of one Service as a defect of the rules package would (it drops
// the protocol from them, the defect of issue 11) and hands everything to
// the real iptables-restore, so that the kernel itself refuses them.
func refusingRestore(t *testing.T, service string) (dir string) {
	t.Helper()
	pattern := strings.ReplaceAll(service, "/", `\/`)
	return cluster.WrapTool(t, "iptables-restore", func(real string) string {
		return fmt.Sprintf("#!/bin/sh\n# Spoils the rules of %s; see refusingRestore.\nsed '/--comment \"%s[ :]/ s/ -p tcp//' | %s \"$@\"\n", service, pattern, real)
	})
}

// A Service the kernel refuses on a node affects no other Service there:
// the others keep following their changes, the node's health stays 200,
// and the node says so: an error in its log naming the Service and the
// kernel's words, a Warning event on the Service, and
// miniproxy_refused_services. Other nodes, whose kernels take the
// Service, serve it.
func TestAServiceTheKernelRefusesAffectsNoOther(t *testing.T) {
	ctx := testContext(t)
	node := lab.Node("node1")
	takeOverProxy(t, node)
	dir := refusingRestore(t, "default/refused")
	err := lab.StartProxyCmd(ctx, node, func(bin string, args []string) *exec.Cmd {
		cmd := exec.Command(bin, args...)
		cmd.Env = append(netns.CleanEnv(), "PATH="+dir+":"+os.Getenv("PATH"))
		return cmd
	})
	if err != nil {
		t.Fatal(err)
	}

	runPod(t, "bystander-a", "bystander", "node2")
	bystander := expose(t, "bystander", "bystander", nodePortType)
	runPod(t, "refused-app", "refused-app", "node2")
	refused := expose(t, "refused", "refused-app", nodePortType)
	node1Port := func(svc *v1.Service) string {
		return fmt.Sprintf("http://%s:%d/", node.IP, svc.Spec.Ports[0].NodePort)
	}
	if a := curl(t, lab.Client, node1Port(bystander)); a.server != "bystander-a" {
		t.Errorf("the bystander should be served through node1: %+v", a)
	}
	if a := curl(t, lab.Client, fmt.Sprintf("http://%s:%d/", lab.Node("node2").IP, refused.Spec.Ports[0].NodePort)); a.server != "refused-app" {
		t.Errorf("node2's kernel takes the refused Service: it should serve it, saw %+v", a)
	}

	// The log line, the event, the metric.
	wait, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := node.Proxy.WaitForOutput(wait, `service="default/refused"`); err != nil {
		t.Fatalf("node1's miniproxy should log the refused Service: %v\n%s", err, node.Proxy.Output())
	}
	var logLine string
	for _, l := range strings.Split(node.Proxy.Output(), "\n") {
		if strings.Contains(l, `service="default/refused"`) && strings.HasPrefix(l, "E") {
			logLine = l
		}
	}
	if !strings.Contains(logLine, "TCP match requires '-p tcp'") || !strings.Contains(logLine, `default/refused cluster IP`) {
		t.Errorf("the log line should carry the kernel's words: %q", logLine)
	}
	err = cluster.Eventually(ctx, 20*time.Second, func() error {
		evs, err := lab.Kube.CoreV1().Events("default").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=refused,reason=RulesRefused"})
		if err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.Type == v1.EventTypeWarning && e.Source.Host == "node1" && strings.Contains(e.Message, "TCP match requires '-p tcp'") {
				return nil
			}
		}
		return fmt.Errorf("no RulesRefused Warning event from node1 on default/refused yet (%d events)", len(evs.Items))
	})
	if err != nil {
		t.Error(err)
	}
	_, metrics, err := node.NS.HTTPGet(ctx, "http://127.0.0.1:10249/metrics", 2*time.Second)
	if err != nil || !strings.Contains(metrics, "\nminiproxy_refused_services 1\n") {
		t.Errorf("node1's metrics should count one refused Service (err %v):\n%s", err, grepLines(metrics, "refused"))
	}
	status, body, err := lab.Router.HTTPGet(ctx, fmt.Sprintf("http://%s:10256/healthz", node.IP), 2*time.Second)
	if err != nil || status != 200 {
		t.Errorf("one refused Service must not make node1 unhealthy: %d %s %v", status, body, err)
	}

	// The bystander's endpoint moves; node1 follows.
	runPod(t, "bystander-b", "bystander", "node1")
	if err := lab.DeletePod(ctx, "bystander-a"); err != nil {
		t.Fatal(err)
	}
	err = cluster.Eventually(ctx, 10*time.Second, func() error {
		a, err := curlOnce(lab.Client, node1Port(bystander), 2*time.Second)
		if err != nil || a.server != "bystander-b" {
			return fmt.Errorf("want bystander-b through node1, saw %q (%v)", a.server, err)
		}
		return nil
	})
	if err != nil {
		t.Errorf("node1 should follow the bystander's change while the other Service is refused: %v", err)
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
