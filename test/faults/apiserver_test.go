package faults

import (
	"context"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/miniproxy/miniproxy/test/cluster"
)

// warningLine is a klog warning or error line.
var warningLine = regexp.MustCompile(`(?m)^[WE]\d{4} \d{2}:\d{2}:\d{2}\.\d{6}.*$`)

// Drill 3: the API server is killed for 60 s and started again. Traffic
// keeps flowing; within 10 s each node's miniproxy warns, naming the server
// and the error, and repeats it at a calm interval; /healthz stays 200 as
// kube-proxy's does (no change is waiting); the first change after the
// server is back reaches the rules within 2 s.
func TestDrillAPIServerAway(t *testing.T) {
	ctx := testContext(t, 5*time.Minute)
	l := startLoad(t)
	server, err := url.Parse(lab.Control.Server())
	if err != nil {
		t.Fatal(err)
	}
	node := lab.Nodes[0]
	mark := len(node.Proxy.Output())
	time.Sleep(2 * time.Second) // some load before the fault

	if err := lab.Control.KillAPIServer(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	var warnedAfter time.Duration
	var first string
	for time.Since(killed) < 15*time.Second {
		for _, line := range warningLine.FindAllString(node.Proxy.Output()[mark:], -1) {
			if strings.Contains(line, server.Host) {
				warnedAfter, first = time.Since(killed), line
				break
			}
		}
		if first != "" {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if first == "" || warnedAfter > 10*time.Second {
		t.Errorf("no warning naming %s within 10 s of the API server's death; output since:\n%s", server.Host, node.Proxy.Output()[mark:])
	}
	status, body, _ := lab.Client.HTTPGet(ctx, fmt.Sprintf("http://%s:10256/healthz", node.IP), 2*time.Second)
	if status != 200 {
		t.Errorf("/healthz with the API server away = %d %s; kube-proxy answers 200 while no change waits", status, body)
	}
	time.Sleep(60*time.Second - time.Since(killed))
	away := node.Proxy.Output()[mark:]
	warnings := 0
	for _, line := range warningLine.FindAllString(away, -1) {
		if strings.Contains(line, server.Host) {
			warnings++
		}
	}
	if warnings > 12 {
		t.Errorf("%d warnings in 60 s: not a calm interval", warnings)
	}

	restart := time.Now()
	if err := lab.Control.StartAPIServer(ctx); err != nil {
		t.Fatal(err)
	}
	serverStart := time.Since(restart)
	svc, err := lab.Kube.CoreV1().Services("default").Create(ctx, &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "after-api"},
		Spec: v1.ServiceSpec{Selector: map[string]string{"app": "nobody"},
			Ports: []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		lab.Kube.CoreV1().Services("default").Delete(context.Background(), "after-api", metav1.DeleteOptions{})
	})
	created := time.Now()
	var reached time.Duration
	err = cluster.Eventually(ctx, 60*time.Second, func() error {
		out, _, err := node.NS.Run(ctx, "iptables-save", "-t", "filter")
		if err != nil || !strings.Contains(out, svc.Spec.ClusterIP) {
			return fmt.Errorf("no rule for %s yet", svc.Spec.ClusterIP)
		}
		reached = time.Since(created)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if reached > 2*time.Second {
		t.Errorf("the first change after the API server came back took %s to reach the rules (want at most 2 s)", reached.Round(10*time.Millisecond))
	}
	failed, total := l.stop(t)
	if failed > 0 {
		t.Errorf("%d of %d requests failed while the API server was away", failed, total)
	}
	record(t, figures{
		drill:    "3. API server killed for 60 s",
		failed:   failed,
		total:    total,
		recovery: fmt.Sprintf("the first change after the API server was back (%s to start) in the rules after %s", serverStart.Round(100*time.Millisecond), reached.Round(10*time.Millisecond)),
		operatorSaw: fmt.Sprintf("after %s: `%s`; %d such lines in the 60 s; /healthz %d", warnedAfter.Round(100*time.Millisecond),
			shortLine(first), warnings, status),
	})
}

// shortLine is a log line for the drills table: the error value cut short.
func shortLine(line string) string {
	line = strings.TrimSpace(line)
	if i := strings.Index(line, " err="); i >= 0 && len(line) > i+100 {
		return line[:i+100] + "...\""
	}
	return line
}
