package integration

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"
)

// serveHTTP answers "ok" on port of every address of the node, as the
// healthCheckNodePort server does.
func serveHTTP(t *testing.T, top *topology, port int) {
	t.Helper()
	var l net.Listener
	if err := top.node.Do(func() error {
		var err error
		l, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "ok") })}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
}

// A node whose INPUT policy drops everything it was not told about still
// answers its load balancer's health checks on a Service's
// healthCheckNodePort, as with kube-proxy, for every packet of the
// connection; a port that is no health check port stays dropped, and the
// health check port is dropped again once the Service is gone.
func TestHealthCheckNodePortBehindADroppingFirewall(t *testing.T) {
	top := setUp(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, _, err := top.node.Run(ctx, "iptables", "-w", "-P", "INPUT", "DROP"); err != nil {
		t.Fatal(err)
	}
	serveHTTP(t, top, 32000)
	serveHTTP(t, top, 32001)
	lb := svc("lb-local", "10.96.0.50", 80, nodePort(30090), localPolicy)
	lb.HealthCheckNodePort = 32000
	state := cluster{lb: {ep(pod1IP, 8080, true)}}
	top.apply(t, state.snapshot())

	ask := func(port int) (string, error) {
		return top.client.Curl(ctx, fmt.Sprintf("http://%s:%d/", nodeIP, port), 1500*time.Millisecond)
	}
	if body, err := ask(32000); err != nil || body != "ok" {
		t.Errorf("the health check port should answer through the dropping INPUT policy: %q %v", body, err)
	}
	if _, err := ask(32001); err == nil {
		t.Error("a port that is no health check port should stay dropped by the node's firewall")
	}
	top.apply(t, (cluster{}).snapshot())
	if _, err := ask(32000); err == nil {
		t.Error("once the Service is gone, its health check port should be dropped again")
	}
}
