package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

var clientIP = cluster.ClientIP.String()

func TestClusterIPFromPodsKeepsTheClientPodsAddress(t *testing.T) {
	runPod(t, "ci-app", "ci-app", "node1")
	svc := expose(t, "clusterip", "ci-app")
	url := "http://" + svc.Spec.ClusterIP + "/"
	for _, tc := range []struct{ name, node string }{
		{"client pod on the same node", "node1"},
		{"client pod on another node", "node2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client := runPod(t, "ci-client-"+tc.node, "ci-client", tc.node)
			a := curl(t, client.NS, url)
			if a.client != client.IP.String() || a.server != "ci-app" {
				t.Errorf("want client_address=%s answered by ci-app, saw client_address=%s from %s", client.IP, a.client, a.server)
			}
		})
	}
}

func TestPodReachingItselfThroughItsServiceWorks(t *testing.T) {
	p := runPod(t, "hairpin", "hairpin", "node1")
	svc := expose(t, "hairpin", "hairpin")
	a := curl(t, p.NS, "http://"+svc.Spec.ClusterIP+"/")
	if a.server != "hairpin" || a.client != p.Node.Gateway.String() {
		t.Errorf("want the pod to answer itself, masqueraded to its node (%s); saw client_address=%s from %s", p.Node.Gateway, a.client, a.server)
	}
}

func TestNodePort(t *testing.T) {
	runPod(t, "np-app", "np-app", "node1")
	svc := expose(t, "nodeport", "np-app", nodePortType)
	port := svc.Spec.Ports[0].NodePort

	t.Run("Cluster policy: every node answers, the endpoint sees a node address", func(t *testing.T) {
		for _, n := range lab.Nodes {
			a := curl(t, lab.Client, fmt.Sprintf("http://%s:%d/", n.IP, port))
			if !nodeAddresses()[a.client] {
				t.Errorf("via %s: want a node address (SNAT), saw client_address=%s", n.Name, a.client)
			}
		}
	})

	patch(t, "nodeport", `{"spec":{"externalTrafficPolicy":"Local"}}`)
	t.Run("Local policy: the node with the endpoint answers with the client's address", func(t *testing.T) {
		err := cluster.Eventually(testContext(t), 10*time.Second, func() error {
			a, err := curlOnce(lab.Client, fmt.Sprintf("http://%s:%d/", lab.Node("node1").IP, port), 2*time.Second)
			if err != nil || a.client != clientIP {
				return fmt.Errorf("want client_address=%s, saw %q (%v)", clientIP, a.client, err)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	})
	t.Run("Local policy: the node without endpoint drops", func(t *testing.T) {
		err := cluster.Eventually(testContext(t), 10*time.Second, func() error {
			a, err := curlOnce(lab.Client, fmt.Sprintf("http://%s:%d/", lab.Node("node2").IP, port), time.Second)
			if err == nil || !strings.Contains(err.Error(), "timed out") {
				return fmt.Errorf("want a timeout (dropped), saw client_address=%q, %v", a.client, err)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	})
}

// healthz asks a node's healthCheckNodePort from the router, as the cloud
// load balancer does.
func healthz(t *testing.T, node *cluster.Node, port int32) (int, map[string]any) {
	t.Helper()
	status, body, err := lab.Router.HTTPGet(testContext(t), fmt.Sprintf("http://%s:%d/healthz", node.IP, port), 2*time.Second)
	if err != nil {
		return 0, nil
	}
	var m map[string]any
	json.Unmarshal([]byte(body), &m)
	return status, m
}

func waitLB(t *testing.T, vip netip.Addr, want ...string) {
	t.Helper()
	err := cluster.Eventually(testContext(t), 15*time.Second, func() error {
		if got := lab.LBBackends(vip); !slices.Equal(got, want) {
			return fmt.Errorf("load balancer sends %s to %v, want %v", vip, got, want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func waitVIP(t *testing.T, name string) netip.Addr {
	t.Helper()
	var vip netip.Addr
	err := cluster.Eventually(testContext(t), 15*time.Second, func() error {
		svc, err := lab.Kube.CoreV1().Services("default").Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if len(svc.Status.LoadBalancer.Ingress) == 0 {
			return fmt.Errorf("%s has no load balancer IP yet", name)
		}
		vip = netip.MustParseAddr(svc.Status.LoadBalancer.Ingress[0].IP)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return vip
}

func TestLoadBalancer(t *testing.T) {
	runPod(t, "lb-app", "lb-app", "node1")
	expose(t, "loadbalancer", "lb-app", lbType)
	vip := waitVIP(t, "loadbalancer")

	t.Run("Cluster policy: the endpoint sees a node address", func(t *testing.T) {
		waitLB(t, vip, "node1", "node2")
		a := curl(t, lab.Client, "http://"+vip.String()+"/")
		if !nodeAddresses()[a.client] {
			t.Errorf("want a node address (SNAT), saw client_address=%s", a.client)
		}
	})

	svc := patch(t, "loadbalancer", `{"spec":{"externalTrafficPolicy":"Local"}}`)
	hc := svc.Spec.HealthCheckNodePort
	if hc == 0 {
		t.Fatal("the API server allocated no healthCheckNodePort")
	}
	t.Run("Local policy: healthCheckNodePort says 200 where the endpoint is, 503 elsewhere", func(t *testing.T) {
		err := cluster.Eventually(testContext(t), 10*time.Second, func() error {
			s1, b1 := healthz(t, lab.Node("node1"), hc)
			s2, b2 := healthz(t, lab.Node("node2"), hc)
			if s1 != 200 || b1["localEndpoints"] != 1.0 || s2 != 503 || b2["localEndpoints"] != 0.0 {
				return fmt.Errorf("node1: %d %v, node2: %d %v; want 200 with 1 local endpoint, 503 with 0", s1, b1, s2, b2)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	})
	t.Run("Local policy: the load balancer follows the health checks and the client's address arrives", func(t *testing.T) {
		waitLB(t, vip, "node1")
		a := curl(t, lab.Client, "http://"+vip.String()+"/")
		if a.client != clientIP {
			t.Errorf("want client_address=%s, saw %s", clientIP, a.client)
		}
	})
	t.Run("the endpoint moves to the other node: health answers and load balancer follow within 2s", func(t *testing.T) {
		runPod(t, "lb-app-2", "lb-app", "node2")
		if err := lab.DeletePod(testContext(t), "lb-app"); err != nil {
			t.Fatal(err)
		}
		moved := time.Now()
		err := cluster.Eventually(testContext(t), 5*time.Second, func() error {
			s1, _ := healthz(t, lab.Node("node1"), hc)
			s2, _ := healthz(t, lab.Node("node2"), hc)
			if s1 != 503 || s2 != 200 {
				return fmt.Errorf("node1 says %d, node2 says %d; want 503 and 200", s1, s2)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if took := time.Since(moved); took > 2*time.Second {
			t.Errorf("health answers followed after %s, want within 2s", took)
		}
		waitLB(t, vip, "node2")
		if took := time.Since(moved); took > 3*time.Second {
			t.Errorf("the load balancer followed after %s; it re-checks every second, so want within 3s", took)
		}
		a := curl(t, lab.Client, "http://"+vip.String()+"/")
		if a.client != clientIP || a.server != "lb-app-2" {
			t.Errorf("want client_address=%s from lb-app-2, saw %s from %s", clientIP, a.client, a.server)
		}
	})
}

func TestIngressForwardsTheClientAddressInXForwardedFor(t *testing.T) {
	runPod(t, "web", "web", "node2")
	app := expose(t, "web", "web")
	ingress := runPod(t, "ingress", "ingress", "node1", "-proxy-to", "http://"+app.Spec.ClusterIP+":80")
	expose(t, "ingress", "ingress", lbType, local)
	vip := waitVIP(t, "ingress")
	waitLB(t, vip, "node1")
	a := curl(t, lab.Client, "http://"+vip.String()+"/")
	if a.xff != clientIP || a.client != ingress.IP.String() || a.server != "web" {
		t.Errorf("want web to see X-Forwarded-For %s from the ingress pod %s; saw x-forwarded-for=%q, client_address=%s, server %s", clientIP, ingress.IP, a.xff, a.client, a.server)
	}
}

func TestEveryNodeSaysItsProxyMode(t *testing.T) {
	for _, n := range lab.Nodes {
		out, _, err := n.NS.Run(testContext(t), "curl", "-sS", "--max-time", "2", "http://localhost:10249/proxyMode")
		if err != nil || out != "iptables" {
			t.Errorf("%s: curl localhost:10249/proxyMode = %q, %v; want iptables", n.Name, out, err)
		}
	}
}

func TestEveryNodesProxierHealthIsFresh(t *testing.T) {
	for _, n := range lab.Nodes {
		status, body, err := lab.Client.HTTPGet(testContext(t), fmt.Sprintf("http://%s:10256/healthz", n.IP), 2*time.Second)
		var m map[string]any
		json.Unmarshal([]byte(body), &m)
		ipv4, _ := m["status"].(map[string]any)["IPv4"].(map[string]any)
		if err != nil || status != 200 || m["lastUpdated"] == nil || m["currentTime"] == nil || m["healthy"] != true ||
			m["nodeEligible"] != true || ipv4["healthy"] != true || ipv4["lastUpdated"] == nil {
			t.Errorf("%s:10256/healthz = %d %s (%v); want 200 with kube-proxy 1.37's body (lastUpdated, currentTime, nodeEligible, healthy, status per family)", n.Name, status, body, err)
		}
	}
}

func TestPolicyPatchedFromClusterToLocalChangesTheSourceIP(t *testing.T) {
	runPod(t, "patch-app", "patch-app", "node1")
	svc := expose(t, "patchme", "patch-app", nodePortType)
	url := fmt.Sprintf("http://%s:%d/", lab.Node("node1").IP, svc.Spec.Ports[0].NodePort)
	if a := curl(t, lab.Client, url); a.client == clientIP {
		t.Fatalf("Cluster policy: want a node address, saw the client's %s", a.client)
	}
	patch(t, "patchme", `{"spec":{"externalTrafficPolicy":"Local"}}`)
	err := cluster.Eventually(testContext(t), 5*time.Second, func() error {
		if a := curl(t, lab.Client, url); a.client != clientIP {
			return fmt.Errorf("Local policy: want client_address=%s, saw %s", clientIP, a.client)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

func TestUDPThroughClusterIPAndNodePort(t *testing.T) {
	runPod(t, "udp-app", "udp-app", "node2")
	client := runPod(t, "udp-client", "udp-client", "node1")
	svc := expose(t, "udp", "udp-app", nodePortType, udpPort)
	ask := func(ns interface {
		UDPRequest(context.Context, string, string, time.Duration) (string, error)
	}, addr string) string {
		var got string
		err := cluster.Eventually(testContext(t), 10*time.Second, func() error {
			var err error
			got, err = ns.UDPRequest(context.Background(), addr, "hello", time.Second)
			return err
		})
		if err != nil {
			t.Fatalf("UDP to %s: %v", addr, err)
		}
		return got
	}
	if got := ask(client.NS, svc.Spec.ClusterIP+":53"); !strings.Contains(got, "client_address="+client.IP.String()) {
		t.Errorf("UDP ClusterIP from a pod: want client_address=%s, saw %q", client.IP, got)
	}
	np := fmt.Sprintf("%s:%d", lab.Node("node1").IP, svc.Spec.Ports[0].NodePort)
	if got := ask(lab.Client, np); !strings.Contains(got, "server=udp-app") || strings.Contains(got, "client_address="+clientIP) {
		t.Errorf("UDP NodePort, Cluster policy: want udp-app to see a node address, saw %q", got)
	}
}

func TestServiceWithoutEndpointsIsRefusedWithinOneSecond(t *testing.T) {
	svc := expose(t, "nobody", "nobody-has-this-label", nodePortType)
	client := runPod(t, "refused-client", "refused-client", "node1")
	for _, target := range []struct {
		from *netns.Namespace
		addr string
	}{
		{client.NS, svc.Spec.ClusterIP + ":80"},
		{lab.Client, fmt.Sprintf("%s:%d", lab.Node("node2").IP, svc.Spec.Ports[0].NodePort)},
	} {
		// Several connections in a row: each must be refused at once, not
		// only the first (ICMP errors are rate limited per host; resets are not).
		err := cluster.Eventually(testContext(t), 10*time.Second, func() error {
			for i := 0; i < 5; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				start := time.Now()
				conn, err := target.from.DialContext(ctx, "tcp", target.addr)
				took := time.Since(start)
				cancel()
				if conn != nil {
					conn.Close()
				}
				if !errors.Is(err, syscall.ECONNREFUSED) || took > time.Second {
					return fmt.Errorf("connection %d to %s: want refused within 1s, saw %v after %s", i+1, target.addr, err, took)
				}
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	}
}

func TestDeletedServiceLeavesNoRulesAndNoHealthPort(t *testing.T) {
	runPod(t, "gone-app", "gone-app", "node1")
	svc := expose(t, "goner", "gone-app", lbType, local)
	hc := svc.Spec.HealthCheckNodePort
	curl(t, lab.Client, fmt.Sprintf("http://%s:%d/", lab.Node("node1").IP, svc.Spec.Ports[0].NodePort))
	if err := lab.Kube.CoreV1().Services("default").Delete(testContext(t), "goner", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	err := cluster.Eventually(testContext(t), 5*time.Second, func() error {
		for _, n := range lab.Nodes {
			out, _, err := n.NS.Run(context.Background(), "iptables-save")
			if err != nil {
				return err
			}
			if strings.Contains(out, "default/goner") || strings.Contains(out, svc.Spec.ClusterIP+"/32") {
				return fmt.Errorf("%s still has rules for default/goner", n.Name)
			}
			if status, _ := healthz(t, n, hc); status != 0 {
				return fmt.Errorf("%s still answers on the health port %d (%d)", n.Name, hc, status)
			}
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}
