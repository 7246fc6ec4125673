package main

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/miniproxy/miniproxy/pkg/config"
)

func testNode(podCIDRs []string, addrs ...v1.NodeAddress) *v1.Node {
	return &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}, Spec: v1.NodeSpec{PodCIDRs: podCIDRs},
		Status: v1.NodeStatus{Addresses: addrs}}
}

// shortWaits are kube-proxy's node waits made short for a test.
var shortWaits = nodeWaits{node: 2 * time.Second, podCIDRs: 2 * time.Second, poll: 50 * time.Millisecond}

// NodeCIDR mode waits for the Node's pod CIDRs, as kube-proxy does, and
// fails the start when they never come.
func TestReadNodeWaitsForPodCIDRs(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	ctx := context.Background()

	client := fake.NewClientset(testNode(nil, v1.NodeAddress{Type: v1.NodeInternalIP, Address: "10.240.0.3"}))
	go func() {
		time.Sleep(300 * time.Millisecond)
		client.CoreV1().Nodes().Update(ctx, testNode([]string{"10.244.1.0/24", "fd00:244:1::/64"},
			v1.NodeAddress{Type: v1.NodeInternalIP, Address: "10.240.0.3"}), metav1.UpdateOptions{})
	}()
	facts, err := readNode(ctx, client, "node-1", true, false, shortWaits, log)
	if err != nil {
		t.Fatalf("readNode: %v", err)
	}
	if len(facts.podCIDRs) != 2 || facts.podCIDRs[0] != netip.MustParsePrefix("10.244.1.0/24") {
		t.Errorf("pod CIDRs %v, want the ones the Node got", facts.podCIDRs)
	}

	never := fake.NewClientset(testNode(nil))
	if _, err := readNode(ctx, never, "node-1", true, false, shortWaits, log); err == nil || !strings.Contains(err.Error(), "timeout waiting for PodCIDR allocation on node \"node-1\"") {
		t.Errorf("a Node that never gets pod CIDRs: %v, want kube-proxy's timeout", err)
	}
	if _, err := readNode(ctx, fake.NewClientset(), "node-1", true, false, shortWaits, log); err == nil || !strings.Contains(err.Error(), "timeout waiting for node \"node-1\" to exist") {
		t.Errorf("no Node at all: %v, want kube-proxy's timeout", err)
	}
	// Nothing needed, nothing read: no wait for a Node that does not exist.
	start := time.Now()
	if _, err := readNode(ctx, fake.NewClientset(), "node-1", false, false, shortWaits, log); err != nil || time.Since(start) > time.Second {
		t.Errorf("readNode without a need: %v after %s", err, time.Since(start))
	}
}

// "primary" is the Node's first InternalIP (else ExternalIP) and the first
// of the other family; a specific --bind-address takes its family's place.
func TestPrimaryNodeIPs(t *testing.T) {
	node := testNode(nil,
		v1.NodeAddress{Type: v1.NodeExternalIP, Address: "203.0.113.9"},
		v1.NodeAddress{Type: v1.NodeInternalIP, Address: "10.240.0.3"},
		v1.NodeAddress{Type: v1.NodeInternalIP, Address: "10.240.0.4"},
		v1.NodeAddress{Type: v1.NodeExternalIP, Address: "2001:db8::9"})
	facts := factsOf(node)
	log := slog.New(slog.DiscardHandler)
	c := config.Default()
	c.NodePortAddresses = []string{"primary"}
	if got := primaryNodeIPs(facts, c, "node-1", log); len(got) != 2 || got[0].String() != "10.240.0.3" || got[1].String() != "2001:db8::9" {
		t.Errorf("primary = %v, want [10.240.0.3 2001:db8::9]", got)
	}
	c.BindAddress = netip.MustParseAddr("10.240.0.99")
	if got := primaryNodeIPs(facts, c, "node-1", log); len(got) != 2 || got[0].String() != "10.240.0.99" {
		t.Errorf("primary with --bind-address = %v, want 10.240.0.99 first", got)
	}
	ranges, _ := config.NodePortRanges(c.NodePortAddresses, primaryNodeIPs(facts, c, "node-1", log))
	if len(ranges) != 2 || ranges[0].String() != "10.240.0.99/32" || ranges[1].String() != "2001:db8::9/128" {
		t.Errorf("--nodeport-addresses primary = %v", ranges)
	}
}

// A change of what miniproxy took from its Node at start ends it, so that
// the DaemonSet starts it again with the new value, as kube-proxy.
func TestWatchNodeEndsOnChange(t *testing.T) {
	ctx := context.Background()
	node := testNode([]string{"10.244.1.0/24"}, v1.NodeAddress{Type: v1.NodeInternalIP, Address: "10.240.0.3"})
	client := fake.NewClientset(node)
	ended := make(chan error, 4)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watchNode(wctx, client, "node-1", factsOf(node), true, false, func(err error) { ended <- err })
	// An unrelated change does not end it.
	changed := node.DeepCopy()
	changed.Labels = map[string]string{"x": "y"}
	changed, err := client.CoreV1().Nodes().Update(ctx, changed, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ended:
		t.Fatalf("ended on a label change: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	changed.Spec.PodCIDRs = []string{"10.244.7.0/24"}
	if _, err := client.CoreV1().Nodes().Update(ctx, changed, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ended:
		if !strings.Contains(err.Error(), "pod CIDRs of node node-1 changed") {
			t.Errorf("cause %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a pod CIDR change did not end miniproxy")
	}
}
