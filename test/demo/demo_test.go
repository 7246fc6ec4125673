package main

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/netns"
)

// The demo checks what it shows: with a test double that makes one outcome
// wrong (miniproxy run with --masquerade-all on every node, so that a pod's
// ClusterIP traffic arrives with a node address), it fails and names the
// outcome; the walk itself is the same one `make demo` runs.
func TestDemoFailsWhenAnOutcomeIsWrong(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the demo builds network namespaces: needs root")
	}
	if _, err := netns.K8sBinaries(); err != nil {
		t.Fatalf("kube-apiserver is not available (make k8s-binaries): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	err := runWith(ctx, []string{"--masquerade-all"})
	if err == nil {
		t.Fatal("the demo passed although every ClusterIP answer carried a node address")
	}
	// The two ClusterIP outcomes, and the ingress's, whose pod reaches the
	// app through its ClusterIP; nothing else.
	if !strings.Contains(err.Error(), "3 of 13 outcomes differ") {
		t.Errorf("want the three outcomes that go through a ClusterIP, and only them, reported wrong: %v", err)
	}
}
