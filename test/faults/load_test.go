package faults

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

// generator sends one request every 100 ms and counts the answers.
type generator struct {
	name      string
	request   func(ctx context.Context) error
	ok, fails atomic.Int64
	mu        sync.Mutex
	lastErr   string
	failedAt  []time.Time // when each failed request ended
}

// load is a drill's two generators, hitting Services the fault does not
// concern.
type load struct {
	gens   []*generator
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

var (
	steadyOnce sync.Once
	steadyErr  error
	steadyCIP  string
	steadyNP   string
	steadyPod  *cluster.Pod
)

// steady creates, once per run, the Service the generators use: an echo
// app with a pod on each node, a NodePort Service for it, and a client pod
// on node1.
func steady(t *testing.T) {
	t.Helper()
	steadyOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		for _, n := range lab.Nodes {
			if _, err := lab.AddPod(ctx, cluster.PodSpec{Name: "steady-" + n.Name, Labels: map[string]string{"app": "steady"}, Node: n}); err != nil {
				steadyErr = err
				return
			}
		}
		if steadyPod, steadyErr = lab.AddPod(ctx, cluster.PodSpec{Name: "steady-client", Labels: map[string]string{"app": "steady-client"}, Node: lab.Nodes[0]}); steadyErr != nil {
			return
		}
		svc, err := lab.Kube.CoreV1().Services("default").Create(ctx, &v1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "steady"},
			Spec: v1.ServiceSpec{Type: v1.ServiceTypeNodePort, Selector: map[string]string{"app": "steady"},
				Ports: []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}}},
		}, metav1.CreateOptions{})
		if err != nil {
			steadyErr = err
			return
		}
		steadyCIP = svc.Spec.ClusterIP + ":80"
		steadyNP = fmt.Sprintf("%s:%d", lab.Nodes[0].IP, svc.Spec.Ports[0].NodePort)
		steadyErr = cluster.Eventually(ctx, 30*time.Second, func() error {
			if _, err := steadyPod.NS.Curl(ctx, "http://"+steadyCIP+"/", time.Second); err != nil {
				return err
			}
			_, err := lab.Client.Curl(ctx, "http://"+steadyNP+"/", time.Second)
			return err
		})
	})
	if steadyErr != nil {
		t.Fatalf("the Service the load generators use: %v", steadyErr)
	}
}

// startLoad starts the two generators; stop ends them and says how many
// requests failed out of how many.
func startLoad(t *testing.T) *load {
	t.Helper()
	steady(t)
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{cancel: cancel}
	httpGen := func(name string, ns *netns.Namespace, url string) *generator {
		// Go's client rather than curl: its error names the kernel's
		// answer (refused, no route, timeout), which curl's does not.
		return &generator{name: name, request: func(ctx context.Context) error {
			status, _, err := ns.HTTPGet(ctx, url, time.Second)
			if err == nil && status != 200 {
				err = fmt.Errorf("GET %s: status %d", url, status)
			}
			return err
		}}
	}
	l.gens = []*generator{
		httpGen("pod to ClusterIP", steadyPod.NS, "http://"+steadyCIP+"/"),
		httpGen("outside client to NodePort", lab.Client, "http://"+steadyNP+"/"),
	}
	for _, g := range l.gens {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				if err := g.request(ctx); err != nil {
					if ctx.Err() != nil {
						return
					}
					g.fails.Add(1)
					g.mu.Lock()
					g.lastErr = err.Error()
					g.failedAt = append(g.failedAt, time.Now())
					g.mu.Unlock()
				} else {
					g.ok.Add(1)
				}
			}
		}()
	}
	t.Cleanup(l.stopOnce)
	return l
}

func (l *load) stopOnce() {
	l.cancel()
	l.wg.Wait()
}

// stop ends the generators and returns the failed and total requests,
// logging each generator's figures.
func (l *load) stop(t *testing.T) (failed, total int64) {
	t.Helper()
	l.stopOnce()
	for _, g := range l.gens {
		ok, fails := g.ok.Load(), g.fails.Load()
		failed += fails
		total += ok + fails
		g.mu.Lock()
		var at []string
		for _, f := range g.failedAt {
			at = append(at, f.Format("15:04:05.000"))
		}
		g.mu.Unlock()
		t.Logf("load %s: %d of %d failed%s", g.name, fails, ok+fails, map[bool]string{true: fmt.Sprintf(" at %v (last: %s)", at, g.lastErr)}[fails > 0])
	}
	if failed > 0 {
		first, last := l.failureSpan()
		for _, n := range lab.Nodes {
			if n.Proxy != nil {
				t.Logf("miniproxy on %s from 3 s before the first failed request to 1 s after the last:\n%s", n.Name, logWindow(n.Proxy.Output(), first.Add(-3*time.Second), last.Add(time.Second)))
			}
		}
	}
	return failed, total
}

// failureSpan says when the first and the last failed request ended.
func (l *load) failureSpan() (first, last time.Time) {
	for _, g := range l.gens {
		g.mu.Lock()
		for _, at := range g.failedAt {
			if first.IsZero() || at.Before(first) {
				first = at
			}
			if at.After(last) {
				last = at
			}
		}
		g.mu.Unlock()
	}
	return first, last
}

// logWindow keeps the lines of a klog-format log ("I1202 07:17:47.133...")
// written between from and to (today's date, local time), so that a failed
// drill shows what the proxies did around the failure even when a later
// drill replaced the process.
func logWindow(log string, from, to time.Time) string {
	var b strings.Builder
	for _, line := range strings.Split(log, "\n") {
		if len(line) < 21 {
			continue
		}
		at, err := time.ParseInLocation("0102 15:04:05.000000", line[1:21], time.Local)
		if err != nil {
			continue
		}
		at = at.AddDate(from.Year(), 0, 0)
		if !at.Before(from) && !at.After(to) {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

// failuresAfter counts the requests that failed after since, over both
// generators, and says when the last of them ended (zero when none).
func (l *load) failuresAfter(since time.Time) (n int, last time.Time) {
	for _, g := range l.gens {
		g.mu.Lock()
		for _, at := range g.failedAt {
			if at.After(since) {
				n++
				if at.After(last) {
					last = at
				}
			}
		}
		g.mu.Unlock()
	}
	return n, last
}
