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
}

func run(ctx context.Context) error {
	step("Bringing up the lab: router, client 198.51.100.79, etcd + kube-apiserver, node1 and node2 running miniproxy")
	start := time.Now()
	c, err := cluster.Start(ctx, cluster.Options{Nodes: 2, Logf: func(f string, a ...any) { fmt.Printf("  lab: "+f+"\n", a...) }})
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
	return d.walk()
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
	d.sh(node1.NS, "node1", "curl -s http://localhost:10249/proxyMode; echo")
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
	d.sh(busy2.NS, "busybox on node2", "curl -s "+cip+" | head -3")
	d.sh(busy1.NS, "busybox-1 on node1", "curl -s "+cip+" | head -2")
	note("client_address is always the client pod's IP, on the same node or another")

	step("Source IP for Services with Type=NodePort")
	d.sh(client, "admin", "kubectl expose deployment source-ip-app --name=nodeport --port=80 --target-port=8080 --type=NodePort")
	nodes := `NODEPORT=$(kubectl get -o jsonpath="{.spec.ports[0].nodePort}" services nodeport)
NODES=$(kubectl get nodes -o jsonpath='{ $.items[*].status.addresses[?(@.type=="InternalIP")].address }')
`
	np := d.quiet(client, "kubectl get -o jsonpath='{.spec.ports[0].nodePort}' services nodeport")
	d.waitFor("the NodePort rules", func() bool {
		return strings.Count(d.quiet(client, fmt.Sprintf("for n in %s %s; do curl -s --max-time 1 $n:%s | grep client_address; done", node1.IP, node2.IP, np)), "client_address") == 2
	})
	d.sh(client, "client 198.51.100.79", nodes+"for node in $NODES; do curl -s $node:$NODEPORT | grep -i client_address; done")
	note("node addresses, not the client's: each node masqueraded (SNAT)")
	d.sh(client, "admin", `kubectl patch svc nodeport -p '{"spec":{"externalTrafficPolicy":"Local"}}'`)
	d.waitFor("the Local policy rules", func() bool {
		return strings.Contains(d.quiet(client, fmt.Sprintf("curl -s --max-time 1 %s:%s", node1.IP, np)), "client_address=198.51.100.79")
	})
	d.sh(client, "client 198.51.100.79", nodes+"for node in $NODES; do curl --connect-timeout 1 -s $node:$NODEPORT | grep -i client_address; done")
	note("one answer, with the client's own address, from node1; node2 has no endpoint and dropped the packet")

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
	d.sh(client, "client 198.51.100.79", "curl -s "+vip.String()+" | head -2")
	note("a node address: Cluster policy masquerades")
	d.sh(client, "admin", `kubectl patch svc loadbalancer -p '{"spec":{"externalTrafficPolicy":"Local"}}'`)
	d.sh(client, "admin", "kubectl get svc loadbalancer -o yaml | grep -i healthCheckNodePort")
	hc := d.quiet(client, "kubectl get svc loadbalancer -o jsonpath='{.spec.healthCheckNodePort}'")
	d.sh(client, "admin", "kubectl get pod -o wide -l app=source-ip-app")
	d.waitFor("the health check port on both nodes", func() bool {
		return strings.Contains(d.quiet(node1.NS, "curl -s localhost:"+hc+"/healthz"), `"localEndpoints": 1`) &&
			strings.Contains(d.quiet(node2.NS, "curl -s localhost:"+hc+"/healthz"), `"localEndpoints": 0`)
	})
	d.sh(node1.NS, "node1", "curl -s -w ' (HTTP %{http_code})\\n' localhost:"+hc+"/healthz")
	d.sh(node2.NS, "node2", "curl -s -w ' (HTTP %{http_code})\\n' localhost:"+hc+"/healthz")
	d.waitFor("the load balancer to drop node2", func() bool { b := c.LBBackends(vip); return len(b) == 1 && b[0] == "node1" })
	note(fmt.Sprintf("the load balancer now sends %s only to %v", vip, c.LBBackends(vip)))
	d.sh(client, "client 198.51.100.79", "curl -s "+vip.String()+" | head -2")
	note("the client's own address: node1 delivered it without SNAT")

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
	d.sh(client, "client 198.51.100.79", "curl -s "+ivip.String()+" | grep -E 'client_address|x-forwarded-for'")
	note("the app sees the ingress pod as client_address and the client in X-Forwarded-For")

	step("Proxier health on every node")
	for _, n := range c.Nodes {
		d.sh(client, "client 198.51.100.79", fmt.Sprintf("curl -s %s:10256/healthz; echo", n.IP))
	}

	step("Cleaning up, as the tutorial does")
	d.sh(client, "admin", "kubectl delete svc -l app=source-ip-app; kubectl delete svc clusterip nodeport loadbalancer ingress --ignore-not-found; kubectl delete deployment source-ip-app")
	return nil
}
