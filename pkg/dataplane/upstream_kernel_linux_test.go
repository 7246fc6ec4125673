package dataplane

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// TestKernelCleanupKubeProxy plays a node where kube-proxy ran next to the
// kubelet, flannel, the portmap plugin, kube-router and miniproxy, in a
// throwaway network namespace: after CleanupKubeProxy, iptables-save prints
// byte for byte what it printed before kube-proxy's rules went in.
func TestKernelCleanupKubeProxy(t *testing.T) {
	for _, family := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		t.Run(family.String(), func(t *testing.T) {
			ns := enterTestNetns(t)
			ns.restore(t, family, kubeletInput(family))
			ns.restore(t, family, otherProgramsInput(family))
			ns.check(t)
			installMiniproxy(t, NewRunner(), family)
			before := ns.save(t, family)
			if !strings.Contains(before, "-j MP-SERVICES") || !strings.Contains(before, "KUBE-KUBELET-CANARY") {
				t.Fatalf("the other programs' rules did not go in:\n%s", before)
			}

			ns.restore(t, family, kubeProxyInput(family))
			with := ns.save(t, family)
			for _, want := range []string{"-j KUBE-SERVICES", ":KUBE-SEP-6E7XQMQ4RAYOWTTM", ":KUBE-PROXY-CANARY", "-j KUBE-PROXY-FIREWALL"} {
				if !strings.Contains(with, want) {
					t.Fatalf("kube-proxy's rules did not go in (no %q):\n%s", want, with)
				}
			}

			ns.check(t)
			if _, err := CleanupKubeProxy(NewRunner(), family); err != nil {
				t.Fatalf("CleanupKubeProxy: %v", err)
			}
			if after := ns.save(t, family); after != before {
				t.Errorf("tables after CleanupKubeProxy differ from before kube-proxy (-before +after):\n%s", cmp.Diff(before, after))
			}

			// Nothing left to do the second time.
			ns.check(t)
			if _, err := CleanupKubeProxy(NewRunner(), family); err != nil {
				t.Errorf("second CleanupKubeProxy: %v", err)
			}
			if after := ns.save(t, family); after != before {
				t.Errorf("tables after the second CleanupKubeProxy changed (-before +after):\n%s", cmp.Diff(before, after))
			}

			// And miniproxy's own cleanup still finds all of its rules.
			ns.check(t)
			if _, err := Cleanup(NewRunner(), rules.Prefix, family); err != nil {
				t.Errorf("Cleanup: %v", err)
			}
			if after := ns.save(t, family); strings.Contains(after, "MP-") || !strings.Contains(after, "KUBE-KUBELET-CANARY") {
				t.Errorf("after miniproxy's Cleanup, want no MP- chain and the kubelet's canary; saw:\n%s", after)
			}
		})
	}
}
