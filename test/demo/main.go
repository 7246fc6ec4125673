// Command demo walks the Kubernetes "Source IP" tutorial, and the ingress
// path of the X-Forwarded-For write-up, in the namespace lab: a real etcd
// and kube-apiserver, two nodes running miniproxy, a client outside and a
// load balancer that follows healthCheckNodePort. Every step prints the
// command (run for real, with kubectl and curl, inside a lab namespace) and
// what it answered. `make demo` runs it; everything is torn down at the end,
// also on Ctrl-C.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

func main() {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "demo: run as root (it builds network namespaces)")
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

type demo struct {
	ctx context.Context
	c   *cluster.Cluster
	// env starts every command: the admin kubeconfig, and the kubectl
	// scripts/build-k8s.sh built first on PATH (not one the machine has).
	env string
	// checked counts the outcomes checked; wrong lists the ones that
	// differ from the tutorial's, with what was seen.
	checked int
	wrong   []string
}

// expect checks one outcome the tutorial promises and prints the verdict
// with what was observed: explanations come from observations, and a wrong
// outcome makes the demo fail.
func (d *demo) expect(what string, ok bool, saw string) {
	d.checked++
	if ok {
		fmt.Printf("  OK   %s (%s)\n", what, saw)
		return
	}
	fmt.Printf("  FAIL %s: saw %s\n", what, saw)
	d.wrong = append(d.wrong, what+": saw "+saw)
}

// field reads key=value from an echo server answer ("" when absent).
func field(answer, key string) string {
	for _, l := range strings.Split(answer, "\n") {
		l = strings.TrimSpace(l)
		if v, ok := strings.CutPrefix(l, key+"="); ok {
			return v
		}
	}
	return ""
}

// fields reads every value of key in answer, in order.
func fields(answer, key string) []string {
	var out []string
	for _, l := range strings.Split(answer, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), key+"="); ok {
			out = append(out, v)
		}
	}
	return out
}

func run(ctx context.Context) error {
	return runWith(ctx, nil)
}

// runWith is run with extra miniproxy arguments on every node (nil for the
// demo itself; a test makes an outcome wrong this way).
func runWith(ctx context.Context, proxyArgs []string) error {
	step("Bringing up the lab: router, client 198.51.100.79, etcd + kube-apiserver, node1 and node2 running miniproxy")
	start := time.Now()
	c, err := cluster.Start(ctx, cluster.Options{Nodes: 2, Logf: func(f string, a ...any) { fmt.Printf("  lab: "+f+"\n", a...) },
		ProxyArgs: func(*cluster.Node) ([]string, bool) { return proxyArgs, false }})
	if err != nil {
		return err
	}
	defer func() {
		if os.Getenv("DEMO_DEBUG") != "" {
			fmt.Println(c.Outputs())
		}
		step("Tearing the lab down")
		c.Close()
		fmt.Println("  done: no namespace, process or rule of the lab is left")
	}()
	fmt.Printf("  lab ready in %s\n", time.Since(start).Round(100*time.Millisecond))
	bins, err := netns.K8sBinaries()
	if err != nil {
		return err
	}
	d := &demo{ctx: ctx, c: c, env: "export KUBECONFIG=" + c.Control.AdminKubeconfig() + " PATH=" + filepath.Dir(bins.Kubectl) + ":$PATH\n"}
	if err := d.walk(); err != nil {
		return err
	}
	if len(d.wrong) > 0 {
		step("The tutorial's outcomes did not hold")
		for _, w := range d.wrong {
			fmt.Println("  " + w)
		}
		return fmt.Errorf("%d of %d outcomes differ from the tutorial's", len(d.wrong), d.checked)
	}
	step(fmt.Sprintf("All %d outcomes as the tutorial says", d.checked))
	return nil
}

func step(title string) { fmt.Printf("\n=== %s\n", title) }

func note(s string) { fmt.Printf("  (%s)\n", s) }

// sh runs a shell command inside a lab namespace, with the admin kubeconfig,
// and prints the command and its answer as the tutorial shows them.
func (d *demo) sh(ns *netns.Namespace, where, command string) string {
	fmt.Printf("\n[%s]$ %s\n", where, command)
	ctx, cancel := context.WithTimeout(d.ctx, 30*time.Second)
	defer cancel()
	out, errOut, err := ns.Run(ctx, "bash", "-c", d.env+command)
	text := strings.TrimRight(out, "\n")
	if err != nil && text == "" {
		text = strings.TrimSpace(errOut)
	}
	for _, l := range strings.Split(text, "\n") {
		if l != "" {
			fmt.Println("  " + l)
		}
	}
	return strings.TrimSpace(out)
}

// waitFor repeats a quiet check until it holds, so the printed step shows
// the settled answer rather than one taken while rules were being written.
func (d *demo) waitFor(what string, f func() bool) {
	deadline := time.Now().Add(20 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			note("still waiting for " + what + " after 20s; showing what is there")
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (d *demo) quiet(ns *netns.Namespace, command string) string {
	ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
	defer cancel()
	out, _, _ := ns.Run(ctx, "bash", "-c", d.env+command)
	return strings.TrimSpace(out)
}

func (d *demo) walk() error {
	c := d.c
	client, node1, node2 := c.Client, c.Node("node1"), c.Node("node2")

	step("Source IP for Services with Type=ClusterIP")
	d.sh(client, "admin", "kubectl get nodes")
	mode := d.sh(node1.NS, "node1", "curl -s http://localhost:10249/proxyMode; echo")
	d.expect("node1 says its proxy mode is iptables", mode == "iptables", mode)
	d.sh(client, "admin", "kubectl create deployment source-ip-app --image=registry.k8s.io/echoserver:1.4")
	note("the lab plays the kubelet: it starts the deployment's pod on node1")
	if _, err := c.AddPod(d.ctx, cluster.PodSpec{Name: "source-ip-app-7d9c8f6b5-x2k4q", Labels: map[string]string{"app": "source-ip-app"}, Node: node1}); err != nil {
		return err
	}
	d.sh(client, "admin", "kubectl expose deployment source-ip-app --name=clusterip --port=80 --target-port=8080")
	d.sh(client, "admin", "kubectl get svc clusterip")
	cip := d.quiet(client, "kubectl get svc clusterip -o jsonpath='{.spec.clusterIP}'")
	note("a busybox pod on node2, and one on node1, ask the ClusterIP")
	busy2, err := c.AddPod(d.ctx, cluster.PodSpec{Name: "busybox", Labels: map[string]string{"run": "busybox"}, Node: node2})
	if err != nil {
		return err
	}
	busy1, err := c.AddPod(d.ctx, cluster.PodSpec{Name: "busybox-1", Labels: map[string]string{"run": "busybox"}, Node: node1})
	if err != nil {
		return err
	}
	d.waitFor("the ClusterIP rules", func() bool { return strings.Contains(d.quiet(busy2.NS, "curl -s --max-time 1 "+cip), "client_address") })
	d.sh(busy2.NS, "busybox on node2", "ip -4 addr show scope global | grep inet")
	a2 := d.sh(busy2.NS, "busybox on node2", "curl -s "+cip+" | head -3")
	a1 := d.sh(busy1.NS, "busybox-1 on node1", "curl -s "+cip+" | head -2")
	d.expect("ClusterIP from a pod on another node keeps the pod's address", field(a2, "client_address") == busy2.IP.String(),
		"client_address="+field(a2, "client_address")+", busybox is "+busy2.IP.String())
	d.expect("ClusterIP from a pod on the same node keeps the pod's address", field(a1, "client_address") == busy1.IP.String(),
		"client_address="+field(a1, "client_address")+", busybox-1 is "+busy1.IP.String())

	step("Source IP for Services with Type=NodePort")
	d.sh(client, "admin", "kubectl expose deployment source-ip-app --name=nodeport --port=80 --target-port=8080 --type=NodePort")
	nodes := `NODEPORT=$(kubectl get -o jsonpath="{.spec.ports[0].nodePort}" services nodeport)
NODES=$(kubectl get nodes -o jsonpath='{ $.items[*].status.addresses[?(@.type=="InternalIP")].address }')
`
	np := d.quiet(client, "kubectl get -o jsonpath='{.spec.ports[0].nodePort}' services nodeport")
	d.waitFor("the NodePort rules", func() bool {
		return strings.Count(d.quiet(client, fmt.Sprintf("for n in %s %s; do curl -s --max-time 1 $n:%s | grep client_address; done", node1.IP, node2.IP, np)), "client_address") == 2
	})
	seen := fields(d.sh(client, "client 198.51.100.79", nodes+"for node in $NODES; do curl -s $node:$NODEPORT | grep -i client_address; done"), "client_address")
	d.expect("NodePort, Cluster policy: both nodes answer, each with a node address (SNAT)",
		len(seen) == 2 && nodeAddress(c, seen[0]) && nodeAddress(c, seen[1]), fmt.Sprintf("client_address %v", seen))
	d.sh(client, "admin", `kubectl patch svc nodeport -p '{"spec":{"externalTrafficPolicy":"Local"}}'`)
	d.waitFor("the Local policy rules on both nodes", func() bool {
		return strings.Contains(d.quiet(client, fmt.Sprintf("curl -s --max-time 1 %s:%s", node1.IP, np)), "client_address=198.51.100.79") &&
			!strings.Contains(d.quiet(client, fmt.Sprintf("curl -s --max-time 1 %s:%s", node2.IP, np)), "client_address")
	})
	seen = fields(d.sh(client, "client 198.51.100.79", nodes+"for node in $NODES; do curl --connect-timeout 1 -s $node:$NODEPORT | grep -i client_address; done"), "client_address")
	d.expect("NodePort, Local policy: one answer (node2 has no endpoint and drops), with the client's own address",
		len(seen) == 1 && seen[0] == cluster.ClientIP.String(), fmt.Sprintf("client_address %v", seen))

	step("Source IP for Services with Type=LoadBalancer")
	d.sh(client, "admin", "kubectl expose deployment source-ip-app --name=loadbalancer --port=80 --target-port=8080 --type=LoadBalancer")
	note("the lab's cloud controller gives the Service its VIP; its load balancer routes the VIP to healthy nodes")
	d.waitFor("the load balancer IP", func() bool { _, ok := c.VIP("loadbalancer"); return ok })
	vip, _ := c.VIP("loadbalancer")
	d.waitFor("the load balancer to use both nodes", func() bool { return len(c.LBBackends(vip)) == 2 })
	d.sh(client, "admin", "kubectl get svc loadbalancer")
	d.waitFor("the load balancer rules", func() bool {
		return strings.Contains(d.quiet(client, "curl -s --max-time 1 "+vip.String()), "client_address")
	})
	lb := d.sh(client, "client 198.51.100.79", "curl -s "+vip.String()+" | head -2")
	d.expect("LoadBalancer, Cluster policy: a node address (SNAT)", nodeAddress(c, field(lb, "client_address")), "client_address="+field(lb, "client_address"))
	d.sh(client, "admin", `kubectl patch svc loadbalancer -p '{"spec":{"externalTrafficPolicy":"Local"}}'`)
	d.sh(client, "admin", "kubectl get svc loadbalancer -o yaml | grep -i healthCheckNodePort")
	hc := d.quiet(client, "kubectl get svc loadbalancer -o jsonpath='{.spec.healthCheckNodePort}'")
	d.sh(client, "admin", "kubectl get pod -o wide -l app=source-ip-app")
	d.waitFor("the health check port on both nodes", func() bool {
		return strings.Contains(d.quiet(node1.NS, "curl -s localhost:"+hc+"/healthz"), `"localEndpoints": 1`) &&
			strings.Contains(d.quiet(node2.NS, "curl -s localhost:"+hc+"/healthz"), `"localEndpoints": 0`)
	})
	h1 := d.sh(node1.NS, "node1", "curl -s -w ' (HTTP %{http_code})\\n' localhost:"+hc+"/healthz")
	h2 := d.sh(node2.NS, "node2", "curl -s -w ' (HTTP %{http_code})\\n' localhost:"+hc+"/healthz")
	d.expect("healthCheckNodePort on node1 (the endpoint's node): 200, one local endpoint",
		strings.Contains(h1, "(HTTP 200)") && strings.Contains(h1, `"localEndpoints": 1`), h1)
	d.expect("healthCheckNodePort on node2: 503, no local endpoint", strings.Contains(h2, "(HTTP 503)") && strings.Contains(h2, `"localEndpoints": 0`), h2)
	d.waitFor("the load balancer to drop node2", func() bool { b := c.LBBackends(vip); return len(b) == 1 && b[0] == "node1" })
	backends := c.LBBackends(vip)
	d.expect("the load balancer follows the health checks: node1 only", len(backends) == 1 && backends[0] == "node1", fmt.Sprintf("%s -> %v", vip, backends))
	lb = d.sh(client, "client 198.51.100.79", "curl -s "+vip.String()+" | head -2")
	d.expect("LoadBalancer, Local policy: the client's own address", field(lb, "client_address") == cluster.ClientIP.String(), "client_address="+field(lb, "client_address"))

	step("Behind an ingress: client -> LB -> ingress pod -> app Service -> pod (X-Forwarded-For)")
	if _, err := c.AddPod(d.ctx, cluster.PodSpec{Name: "ingress-nginx", Labels: map[string]string{"app": "ingress"}, Node: node2, Args: []string{"-proxy-to", "http://" + cip + ":80"}}); err != nil {
		return err
	}
	d.sh(client, "admin", "kubectl expose pod ingress-nginx --name=ingress --port=80 --target-port=8080 --type=LoadBalancer")
	d.sh(client, "admin", `kubectl patch svc ingress -p '{"spec":{"externalTrafficPolicy":"Local"}}'`)
	d.waitFor("the ingress load balancer", func() bool { _, ok := c.VIP("ingress"); return ok })
	ivip, _ := c.VIP("ingress")
	d.waitFor("the ingress load balancer to pick node2", func() bool { b := c.LBBackends(ivip); return len(b) == 1 && b[0] == "node2" })
	d.waitFor("the ingress rules", func() bool {
		return strings.Contains(d.quiet(client, "curl -s --max-time 1 "+ivip.String()), "x-forwarded-for=198.51.100.79")
	})
	in := d.sh(client, "client 198.51.100.79", "curl -s "+ivip.String()+" | grep -E 'client_address|x-forwarded-for'")
	ingressIP := c.Pod("ingress-nginx").IP.String()
	d.expect("behind the ingress: the app sees the ingress pod, and the client in X-Forwarded-For",
		field(in, "client_address") == ingressIP && field(in, "x-forwarded-for") == cluster.ClientIP.String(),
		fmt.Sprintf("client_address=%s (ingress pod %s), x-forwarded-for=%s", field(in, "client_address"), ingressIP, field(in, "x-forwarded-for")))

	step("Proxier health on every node")
	for _, n := range c.Nodes {
		h := d.sh(client, "client 198.51.100.79", fmt.Sprintf("curl -s %s:10256/healthz; echo", n.IP))
		d.expect(n.Name+"'s proxier is healthy", strings.Contains(h, `"healthy":true`), h)
	}

	step("Cleaning up, as the tutorial does")
	d.sh(client, "admin", "kubectl delete svc -l app=source-ip-app; kubectl delete svc clusterip nodeport loadbalancer ingress --ignore-not-found; kubectl delete deployment source-ip-app")
	return nil
}

// nodeAddress says whether a is one of the lab's node addresses: a node's
// IP, or its address on its pods' links, which a masqueraded packet to a
// pod on that node carries (the tutorial shows such a 10.180.0.x address).
func nodeAddress(c *cluster.Cluster, a string) bool {
	for _, n := range c.Nodes {
		if n.IP.String() == a || n.Gateway.String() == a {
			return true
		}
	}
	return false
}
