package faults

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

// udpFlow sends a datagram every 100 ms on one socket (one 5-tuple) and
// counts the ones that got no answer within 500 ms.
type udpFlow struct {
	name       string
	sent, lost atomic.Int64
	done       chan struct{}
}

func startUDPFlow(ctx context.Context, t *testing.T, name string, ns *netns.Namespace, address string) *udpFlow {
	t.Helper()
	conn, err := ns.DialContext(ctx, "udp", address)
	if err != nil {
		t.Fatal(err)
	}
	f := &udpFlow{name: name, done: make(chan struct{})}
	go func() {
		defer close(f.done)
		defer conn.Close()
		buf := make([]byte, 2048)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for seq := 0; ; seq++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			f.sent.Add(1)
			msg := fmt.Sprintf("%s %d", name, seq)
			conn.SetDeadline(time.Now().Add(500 * time.Millisecond))
			if _, err := conn.Write([]byte(msg)); err != nil {
				f.lost.Add(1)
				continue
			}
			// One answer per datagram (the echo server answers each with the
			// sender's address and its name).
			if _, err := conn.Read(buf); err != nil {
				f.lost.Add(1)
			}
		}
	}()
	return f
}

// Drill 6: a graceful restart, as a DaemonSet rollout does it (SIGTERM,
// then a new process): no TCP request fails and established UDP flows (one
// 5-tuple each, a datagram every 100 ms) lose no datagram. Start-up
// reconciles conntrack instead of flushing it.
func TestDrillGracefulRestart(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	l := startLoad(t)
	svc, err := lab.Kube.CoreV1().Services("default").Create(ctx, &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "steady-udp"},
		Spec: v1.ServiceSpec{Type: v1.ServiceTypeNodePort, Selector: map[string]string{"app": "steady"},
			Ports: []v1.ServicePort{{Protocol: v1.ProtocolUDP, Port: 53, TargetPort: intstr.FromInt32(8081)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		lab.Kube.CoreV1().Services("default").Delete(context.Background(), "steady-udp", metav1.DeleteOptions{})
	})
	node := lab.Nodes[0]
	cip := svc.Spec.ClusterIP + ":53"
	np := fmt.Sprintf("%s:%d", node.IP, svc.Spec.Ports[0].NodePort)
	created := time.Now()
	err = cluster.Eventually(ctx, 30*time.Second, func() error {
		if _, err := steadyPod.NS.UDPRequest(ctx, cip, "hello", 500*time.Millisecond); err != nil {
			return err
		}
		_, err := lab.Client.UDPRequest(ctx, np, "hello", 500*time.Millisecond)
		return err
	})
	if err != nil {
		t.Fatalf("%v\n%s%s%s's miniproxy since the Service was created:\n%s", err, serviceRules(ctx, node, svc.Spec.ClusterIP), serviceSlices(ctx, "steady-udp"),
			node.Name, logWindow(node.Proxy.Output(), created.Add(-time.Second), time.Now()))
	}
	flowCtx, stopFlows := context.WithCancel(ctx)
	flows := []*udpFlow{
		startUDPFlow(flowCtx, t, "pod-to-clusterip", steadyPod.NS, cip),
		startUDPFlow(flowCtx, t, "client-to-nodeport", lab.Client, np),
	}
	time.Sleep(2 * time.Second)

	begin := time.Now()
	t.Logf("restarting node1's miniproxy at %s", begin.Format("15:04:05.000"))
	if err := lab.StopProxy(node); err != nil {
		t.Fatal(err)
	}
	if err := lab.StartProxy(ctx, node, nil); err != nil {
		t.Fatal(err)
	}
	restart := time.Since(begin)
	time.Sleep(3 * time.Second)
	stopFlows()
	var sent, lost int64
	for _, f := range flows {
		<-f.done
		sent += f.sent.Load()
		lost += f.lost.Load()
		t.Logf("UDP flow %s: %d of %d datagrams unanswered", f.name, f.lost.Load(), f.sent.Load())
	}
	if lost > 0 {
		t.Errorf("%d of %d datagrams of established UDP flows were lost across the restart", lost, sent)
	}
	failed, total := l.stop(t)
	if failed > 0 {
		t.Errorf("%d of %d TCP requests failed across the restart", failed, total)
	}
	record(t, figures{
		drill:       "6. graceful restart (SIGTERM, new process)",
		failed:      failed,
		total:       total,
		recovery:    fmt.Sprintf("new process synced %s after the SIGTERM; UDP: %d of %d datagrams of 2 established flows lost", restart.Round(100*time.Millisecond), lost, sent),
		operatorSaw: "`stopping; rules are left in place so that traffic keeps flowing`, then the new process's `rules synced`",
	})
}
