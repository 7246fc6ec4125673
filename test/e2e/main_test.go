// Package e2e walks the Source IP tutorial, and what kube-proxy users rely
// on every day, against miniproxy in the namespace lab: a real etcd and
// kube-apiserver, two nodes each running miniproxy as its own process with
// the system:kube-proxy identity, and real TCP and UDP traffic.
package e2e

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/miniproxy/miniproxy/test/cluster"
	"github.com/miniproxy/miniproxy/test/netns"
)

// lab is the cluster every test in this package shares; each test makes its
// own Services and pods.
var lab *cluster.Cluster

func TestMain(m *testing.M) {
	os.Exit(cluster.RunTests(m, "e2e", func(c *cluster.Cluster) { lab = c }))
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// answer is what the echo server told a client.
type answer struct {
	client, server, xff string
	body                string
}

var (
	clientAddressRE = regexp.MustCompile(`client_address=(\S+)`)
	hostnameRE      = regexp.MustCompile(`hostname=(\S+)`)
	xffRE           = regexp.MustCompile(`x-forwarded-for=(.+)`)
)

func parse(body string) answer {
	a := answer{body: body}
	if m := clientAddressRE.FindStringSubmatch(body); m != nil {
		a.client = m[1]
	}
	if m := hostnameRE.FindStringSubmatch(body); m != nil {
		a.server = m[1]
	}
	if m := xffRE.FindStringSubmatch(body); m != nil {
		a.xff = strings.TrimSpace(m[1])
	}
	return a
}

// curl fetches url from ns as the tutorial does (curl, 1s connect timeout)
// and retries for up to 10s while rules are being programmed.
func curl(t *testing.T, ns *netns.Namespace, url string) answer {
	t.Helper()
	var a answer
	err := cluster.Eventually(testContext(t), 10*time.Second, func() error {
		body, err := ns.Curl(context.Background(), url, 2*time.Second)
		if err != nil {
			return err
		}
		a = parse(body)
		if a.client == "" {
			return fmt.Errorf("not an echo server answer: %q", body)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("curl %s from %s: %v", url, ns.Short(), err)
	}
	return a
}

// curlOnce is one attempt, for checks that must fail.
func curlOnce(ns *netns.Namespace, url string, timeout time.Duration) (answer, error) {
	body, err := ns.Curl(context.Background(), url, timeout)
	return parse(body), err
}

type svcOption func(*v1.Service)

func nodePortType(s *v1.Service) { s.Spec.Type = v1.ServiceTypeNodePort }
func lbType(s *v1.Service)       { s.Spec.Type = v1.ServiceTypeLoadBalancer }
func local(s *v1.Service)        { s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal }
func udpPort(s *v1.Service) {
	s.Spec.Ports = []v1.ServicePort{{Name: "udp", Protocol: v1.ProtocolUDP, Port: 53, TargetPort: intstr.FromInt32(8081)}}
}

// expose is `kubectl expose` for the pods labelled app=<app>: port 80 to 8080.
func expose(t *testing.T, name, app string, opts ...svcOption) *v1.Service {
	t.Helper()
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: v1.ServiceSpec{
			Selector: map[string]string{"app": app},
			Ports:    []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	for _, o := range opts {
		o(svc)
	}
	ctx := testContext(t)
	created, err := lab.Kube.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service %s: %v", name, err)
	}
	t.Cleanup(func() {
		lab.Kube.CoreV1().Services("default").Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	return created
}

// runPod starts an echo server pod labelled app=<app> on a node.
func runPod(t *testing.T, name, app, node string, args ...string) *cluster.Pod {
	t.Helper()
	p, err := lab.AddPod(testContext(t), cluster.PodSpec{Name: name, Labels: map[string]string{"app": app}, Node: lab.Node(node), Args: args})
	if err != nil {
		t.Fatalf("start pod %s on %s: %v", name, node, err)
	}
	t.Cleanup(func() { lab.DeletePod(context.Background(), name) })
	return p
}

func patch(t *testing.T, name, body string) *v1.Service {
	t.Helper()
	svc, err := lab.Kube.CoreV1().Services("default").Patch(testContext(t), name, "application/merge-patch+json", []byte(body), metav1.PatchOptions{})
	if err != nil {
		t.Fatalf("patch service %s with %s: %v", name, body, err)
	}
	return svc
}

func nodeAddresses() map[string]bool {
	out := map[string]bool{}
	for _, n := range lab.Nodes {
		out[n.IP.String()] = true
		out[n.Gateway.String()] = true
	}
	return out
}
