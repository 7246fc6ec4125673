package main

import (
	"bytes"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/miniproxy/miniproxy/test/netns"
)

// upstreamFlag is one flag of kube-proxy --help.
type upstreamFlag struct {
	name, typ, def string
	deprecated     bool
}

var (
	flagLineRE = regexp.MustCompile(`^\s+(?:-\w, )?--([a-z0-9-]+)(?: ([^\s]+))?(?:\s{2,}(.*))?$`)
	defaultRE  = regexp.MustCompile(`\(default (.*)\)\s*$`)
)

// parseHelp reads the flags of a kube-proxy style --help: a line per flag
// ("--name type   text"), its text continued on indented lines.
func parseHelp(help string) map[string]upstreamFlag {
	out := map[string]upstreamFlag{}
	var cur *upstreamFlag
	var text strings.Builder
	flush := func() {
		if cur == nil {
			return
		}
		if m := defaultRE.FindStringSubmatch(strings.TrimSpace(text.String())); m != nil {
			cur.def = strings.Trim(m[1], `"`)
		}
		cur.deprecated = strings.Contains(text.String(), "DEPRECATED")
		out[cur.name] = *cur
		cur = nil
	}
	for _, l := range strings.Split(help, "\n") {
		if m := flagLineRE.FindStringSubmatch(l); m != nil && strings.HasPrefix(strings.TrimSpace(l), "-") {
			flush()
			cur = &upstreamFlag{name: m[1], typ: m[2]}
			text.Reset()
			text.WriteString(m[3])
			continue
		}
		if cur != nil && strings.TrimSpace(l) != "" {
			text.WriteString(" " + strings.TrimSpace(l))
		}
	}
	flush()
	return out
}

// Every flag of the lab's upstream kube-proxy --help is a flag of
// miniproxy, with the same type and default, so that kube-proxy's command
// lines work unchanged.
func TestEveryKubeProxyFlagIsAccepted(t *testing.T) {
	bins, err := netns.K8sBinaries()
	if err != nil {
		t.Skipf("no upstream kube-proxy to compare with (make k8s-binaries): %v", err)
	}
	var stdout bytes.Buffer
	cmd := exec.Command(bins.KubeProxy, "--help")
	cmd.Stdout = &stdout
	if err := cmd.Run(); err != nil {
		t.Fatalf("kube-proxy --help: %v", err)
	}
	upstream := parseHelp(stdout.String())
	if len(upstream) < 50 {
		t.Fatalf("read only %d flags from kube-proxy --help:\n%s", len(upstream), stdout.String())
	}
	fs := newFlagSet(&options{})
	for name, up := range upstream {
		if name == "help" {
			continue
		}
		f := fs.Lookup(name)
		if f == nil {
			t.Errorf("--%s (%s) of kube-proxy is missing", name, up.typ)
			continue
		}
		typ, _ := pflag.UnquoteUsage(f) // the type name --help prints
		if f.NoOptDefVal != "" && typ != "" {
			typ += "[=" + f.NoOptDefVal + "]"
		}
		if typ != up.typ {
			t.Errorf("--%s: type %q, kube-proxy's is %q", name, typ, up.typ)
		}
		if up.def != "" && f.DefValue != up.def {
			t.Errorf("--%s: default %q, kube-proxy's is %q", name, f.DefValue, up.def)
		}
	}
	// And the deprecated port flags, which kube-proxy's help hides.
	for _, name := range []string{"healthz-port", "metrics-port"} {
		if f := fs.Lookup(name); f == nil || f.Deprecated == "" {
			t.Errorf("--%s should be accepted, deprecated, as kube-proxy's", name)
		}
	}
}

// The names miniproxy had before it took kube-proxy's are gone, and the
// basics of a command-line program hold: --help and --version exit 0 and
// say something, a stray argument or an unknown flag is one clear error.
func TestCommandLine(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		out     string // in the output, when it succeeds
		errText string // in the error, when it fails
	}{
		{args: []string{"--help"}, out: "--iptables-sync-period duration"},
		{args: []string{"-h"}, out: "--proxy-mode ProxyMode"},
		{args: []string{"--version"}, out: "miniproxy"},
		{args: []string{"--version=raw"}, out: "go: go1."},
		{args: []string{"--sync-period", "30s"}, errText: "unknown flag: --sync-period"},
		{args: []string{"--min-sync-period", "1s"}, errText: "unknown flag: --min-sync-period"},
		{args: []string{"--iptables-sync-period", "30s", "stray"}, errText: `unexpected argument "stray"`},
		{args: []string{"--proxy-mode", "ipvs", "--cleanup"}, errText: `--proxy-mode: miniproxy implements only the iptables mode, not "ipvs"`},
		{args: []string{"--iptables-min-sync-period", "1m", "--iptables-sync-period", "30s", "--cleanup"}, errText: "--iptables-min-sync-period: 1m0s is longer than iptables.syncPeriod 30s"},
		{args: []string{"--oom-score-adj", "2000", "--cleanup"}, errText: "--oom-score-adj: 2000 must be within the range [-1000, 1000]"},
		{args: []string{"--iptables-masquerade-bit", "32"}, errText: "--iptables-masquerade-bit: 32 must be within the range [0, 31]"},
		{args: []string{"--conntrack-max-per-core", "-1"}, errText: "--conntrack-max-per-core: -1 must be greater than or equal to 0"},
		{args: []string{"--feature-gates", "NoSuchGate=true"}, errText: "--feature-gates: unrecognized feature gate: NoSuchGate"},
		{args: []string{"--feature-gates", "PreferSameTrafficDistribution=false"}, errText: "--feature-gates: cannot set feature gate PreferSameTrafficDistribution to false, feature is locked to true"},
		{args: []string{"--feature-gates", "AllowServiceExternalIPs=false"}},
		{args: []string{"--detect-local-mode", "BridgeInterface"}, errText: "--pod-bridge-interface: must be set with detectLocalMode BridgeInterface"},
		{args: []string{"--detect-local-mode", "PodCIDR"}, errText: `--detect-local-mode: "PodCIDR" is not one of`},
		{args: []string{"--nodeport-addresses", "10.0.0.1"}, errText: `--nodeport-addresses: "10.0.0.1" must be a valid CIDR or one of the keywords`},
		{args: []string{"--cluster-cidr", "10.0.0.0/8,10.1.0.0/16"}, errText: "--cluster-cidr: \"10.0.0.0/8,10.1.0.0/16\" has more than one range of a family"},
		{args: []string{"--logging-format", "xml"}, errText: `Unsupported log format`},
		{args: []string{"--hostname-override", " "}, errText: "--hostname-override: an empty name is invalid"},
		{args: []string{"--bind-address", "nonsense"}, errText: `invalid argument "nonsense" for "--bind-address"`},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var out bytes.Buffer
			err := runFlagsOnly(tc.args, &out)
			switch {
			case tc.errText == "" && err != nil:
				t.Fatalf("want success, got %v", err)
			case tc.errText != "" && (err == nil || !strings.Contains(err.Error(), tc.errText)):
				t.Fatalf("want an error with %q, got %v", tc.errText, err)
			case tc.out != "" && !strings.Contains(out.String(), tc.out):
				t.Errorf("output lacks %q:\n%s", tc.out, out.String())
			}
		})
	}
}

// runFlagsOnly runs the command line up to what needs no privileges: the
// flags, their checks, --help and --version. Arguments that would start
// the daemon stop before it (proxyOptions is the last check).
func runFlagsOnly(args []string, out *bytes.Buffer) error {
	opts, _, err := commandLine(args, out)
	if err != nil || opts.done {
		return err
	}
	_, err = opts.proxyOptions(nil, nil)
	return err
}

// Logs are kube-proxy's: klog's text format by default, JSON with
// --logging-format=json, -v as the verbosity (through component-base, as
// kube-proxy). The binary is run, since logging is set up once per process.
func TestLogFormats(t *testing.T) {
	bin, err := netns.Build("github.com/miniproxy/miniproxy/cmd/miniproxy")
	if err != nil {
		t.Fatal(err)
	}
	klogLine := regexp.MustCompile(`^W\d{4} \d{2}:\d{2}:\d{2}\.\d{6}\s+\d+ \S+\.go:\d+\] "--ipvs-scheduler is ignored`)
	for _, tc := range []struct {
		args  []string
		check func(string) bool
	}{
		{nil, klogLine.MatchString},
		{[]string{"--logging-format=text"}, klogLine.MatchString},
		{[]string{"--logging-format=json"}, func(l string) bool {
			var m map[string]any
			return json.Unmarshal([]byte(l), &m) == nil && m["msg"] != nil && strings.Contains(m["msg"].(string), "--ipvs-scheduler is ignored")
		}},
	} {
		out := filepath.Join(t.TempDir(), "c.yaml")
		cmd := exec.Command(bin, append([]string{"--write-config-to", out, "--ipvs-scheduler=rr"}, tc.args...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("%v: %v\n%s", tc.args, err, stderr.String())
		}
		first := strings.SplitN(stderr.String(), "\n", 2)[0]
		if !tc.check(first) {
			t.Errorf("%v: first log line %q is not in the expected format", tc.args, first)
		}
	}
}
