package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/netns"
)

// miniproxyAndLab builds miniproxy and a lab of namespaces for a test that
// runs the binary in them.
func miniproxyAndLab(t *testing.T) (string, *netns.Lab, context.Context) {
	t.Helper()
	bin, err := netns.Build("github.com/miniproxy/miniproxy/cmd/miniproxy")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return bin, netns.NewLab(t), ctx
}

// The conntrack parameters a node's namespace has, by sysctl name.
func conntrackSysctls(t *testing.T, ns *netns.Namespace) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, k := range []string{"nf_conntrack_tcp_timeout_established", "nf_conntrack_tcp_timeout_close_wait",
		"nf_conntrack_tcp_be_liberal", "nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"} {
		v, err := ns.Sysctl("net/netfilter/" + k)
		if err != nil {
			t.Fatal(err)
		}
		out[k] = v
	}
	return out
}

// miniproxy sets the conntrack parameters at start from its flags, as
// kube-proxy does, with kube-proxy's defaults; --config gives the same
// settings from a file; and --init-only does this and exits, as
// kube-proxy's init container pattern expects. Every namespace is the
// test's own: only the per-namespace timeouts are set (--conntrack-max-per-core=0
// leaves nf_conntrack_max and the hash size, which belong to the machine,
// alone).
func TestConntrackParametersFromFlagsAndFile(t *testing.T) {
	bin, lab, ctx := miniproxyAndLab(t)
	conf := filepath.Join(t.TempDir(), "config.conf")
	os.WriteFile(conf, []byte(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 3h
  tcpCloseWaitTimeout: 20m
  tcpBeLiberal: true
  udpTimeout: 44s
  udpStreamTimeout: 170s
`), 0o600)
	for i, tc := range []struct {
		name string
		args []string
		want map[string]string // the parameters that must differ from the kernel's
	}{
		{"flags: kube-proxy's defaults", []string{"--conntrack-max-per-core=0"},
			map[string]string{"nf_conntrack_tcp_timeout_established": "86400", "nf_conntrack_tcp_timeout_close_wait": "3600"}},
		{"flags: every setting", []string{"--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=2h",
			"--conntrack-tcp-timeout-close-wait=10m", "--conntrack-tcp-be-liberal", "--conntrack-udp-timeout=33s",
			"--conntrack-udp-timeout-stream=150s"},
			map[string]string{"nf_conntrack_tcp_timeout_established": "7200", "nf_conntrack_tcp_timeout_close_wait": "600",
				"nf_conntrack_tcp_be_liberal": "1", "nf_conntrack_udp_timeout": "33", "nf_conntrack_udp_timeout_stream": "150"}},
		{"flags: zeros leave everything as it is", netns.LeaveConntrackAlone, map[string]string{}},
		{"--config", []string{"--config", conf},
			map[string]string{"nf_conntrack_tcp_timeout_established": "10800", "nf_conntrack_tcp_timeout_close_wait": "1200",
				"nf_conntrack_tcp_be_liberal": "1", "nf_conntrack_udp_timeout": "44", "nf_conntrack_udp_timeout_stream": "170"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns, err := lab.AddNamespace("ct" + string(rune('a'+i)))
			if err != nil {
				t.Fatal(err)
			}
			before := conntrackSysctls(t, ns)
			_, stderr, err := ns.Run(ctx, bin, append([]string{"--init-only"}, tc.args...)...)
			if err != nil {
				t.Fatalf("miniproxy --init-only %s: %v\n%s", strings.Join(tc.args, " "), err, stderr)
			}
			after := conntrackSysctls(t, ns)
			for k, v := range after {
				want, set := tc.want[k]
				if !set {
					want = before[k]
				}
				if v != want {
					t.Errorf("%s = %s, want %s (before: %s)", k, v, want, before[k])
				}
			}
		})
	}
}

// As kube-proxy 1.37, a node that refuses the conntrack parameters (here a
// read-only /proc/sys, as in an unprivileged container) stops the start
// with an error naming the parameter, instead of running with settings the
// operator did not get.
func TestConntrackParametersRefusedStopTheStart(t *testing.T) {
	bin, lab, ctx := miniproxyAndLab(t)
	ns, err := lab.AddNamespace("ctro")
	if err != nil {
		t.Fatal(err)
	}
	// A private mount namespace in which /proc/sys is read-only; the
	// machine's mounts are not touched.
	script := `mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$0" "$@"`
	_, stderr, err := ns.Run(ctx, "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
		bin, "--init-only", "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=2h")
	if err == nil {
		t.Fatalf("miniproxy started although /proc/sys is read-only:\n%s", stderr)
	}
	if !strings.Contains(stderr, "could not set conntrack parameters") || !strings.Contains(stderr, "nf_conntrack_tcp_timeout_established") {
		t.Errorf("the error should say which conntrack parameter could not be set:\n%s", stderr)
	}
	// Asking for nothing (no conntrack setting, no localhost NodePorts and
	// so no route_localnet) needs no writable /proc/sys.
	args := append([]string{"--mount", "--propagation", "private", "--", "sh", "-c", script, bin, "--init-only",
		"--iptables-localhost-nodeports=false"}, netns.LeaveConntrackAlone...)
	if _, stderr, err := ns.Run(ctx, "unshare", args...); err != nil {
		t.Errorf("with every conntrack setting at 0 a read-only /proc/sys must not matter: %v\n%s", err, stderr)
	}
}

// --init-only also sets route_localnet, as kube-proxy's iptables proxier
// does at start, when localhost NodePorts apply (the default); not when
// they are off or --nodeport-addresses leaves loopback out.
func TestInitOnlySetsRouteLocalnet(t *testing.T) {
	bin, lab, ctx := miniproxyAndLab(t)
	for i, tc := range []struct {
		args []string
		want string
	}{
		{nil, "1"},
		{[]string{"--iptables-localhost-nodeports=false"}, "0"},
		{[]string{"--nodeport-addresses=10.0.0.0/8"}, "0"},
		{[]string{"--nodeport-addresses=localhost"}, "1"},
	} {
		ns, err := lab.AddNamespace("rl" + string(rune('a'+i)))
		if err != nil {
			t.Fatal(err)
		}
		args := append(append([]string{"--init-only"}, netns.LeaveConntrackAlone...), tc.args...)
		if _, stderr, err := ns.Run(ctx, bin, args...); err != nil {
			t.Fatalf("miniproxy %s: %v\n%s", strings.Join(args, " "), err, stderr)
		}
		if got, _ := ns.Sysctl("net/ipv4/conf/all/route_localnet"); got != tc.want {
			t.Errorf("%v: route_localnet = %s, want %s", tc.args, got, tc.want)
		}
	}
}
