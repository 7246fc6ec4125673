// Package image holds the tests of the container image's entrypoint script
// (deploy/image/entrypoint.sh), which cannot be run inside an image here:
// no container engine is available, so the script runs with fake iptables
// tools on PATH instead, which also keeps it away from the machine's own
// tables.
package image

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// fakeSave prints the rules a test gave for one tool, only one table's with
// "-t TABLE", as iptables-*-save does; with no rules given it fails as a
// missing or broken tool does. Every call is logged.
const fakeSave = `#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_DIR/calls.log"
rules="$FAKE_DIR/$(basename "$0").rules"
[ -f "$rules" ] || { echo "$(basename "$0"): not available" >&2; exit 1; }
if [ "${1:-}" = "-t" ]; then
	awk -v t="*$2" '$0 == t {p=1} p {print} p && $0 == "COMMIT" {p=0}' "$rules"
else
	cat "$rules"
fi
`

const fakeAlternatives = `#!/bin/sh
echo "$*" >> "$FAKE_DIR/alternatives.log"
[ ! -f "$FAKE_DIR/alternatives.fail" ]
`

const fakeMiniproxy = `#!/bin/sh
for a in "$@"; do echo "arg: $a"; done
`

// Rules as a node shows them.
var (
	kubeletNFT = `*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
COMMIT
`
	kubeletCanaryOnly = `*nat
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*mangle
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
`
	miniproxyRules = `*nat
:PREROUTING ACCEPT [0:0]
:MP-SERVICES - [0:0]
:MP-POSTROUTING - [0:0]
-A PREROUTING -m comment --comment "miniproxy service portals" -j MP-SERVICES
-A POSTROUTING -j MP-POSTROUTING
COMMIT
`
	kubeProxyRules = `*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
COMMIT
`
	foreignRules = `*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 22 -j ACCEPT
-A INPUT -p tcp --dport 80 -j ACCEPT
-A INPUT -p tcp --dport 443 -j ACCEPT
COMMIT
`
)

func TestEntrypointPicksTheNodesBackend(t *testing.T) {
	tests := []struct {
		name string
		// rules per tool: iptables-nft-save, ip6tables-nft-save,
		// iptables-legacy-save, ip6tables-legacy-save. A tool left out
		// fails.
		rules map[string]string
		env   []string
		want  string // nft or legacy
		// noSave says no save tool may run (the mode was given).
		noSave bool
	}{
		{
			name: "the kubelet's hint chain in nf_tables wins over more rules in legacy",
			rules: map[string]string{
				"iptables-nft-save": kubeletNFT, "ip6tables-nft-save": "",
				"iptables-legacy-save": foreignRules + miniproxyRules, "ip6tables-legacy-save": "",
			},
			want: "nft",
		},
		{
			name: "the kubelet's canary in legacy iptables (IPv6 only) means legacy",
			rules: map[string]string{
				"iptables-nft-save": foreignRules, "ip6tables-nft-save": foreignRules,
				"iptables-legacy-save": "", "ip6tables-legacy-save": kubeletCanaryOnly,
			},
			want: "legacy",
		},
		{
			name: "no kubelet: miniproxy's own chains in legacy iptables win over other rules in nf_tables",
			rules: map[string]string{
				"iptables-nft-save": foreignRules, "ip6tables-nft-save": "",
				"iptables-legacy-save": miniproxyRules, "ip6tables-legacy-save": "",
			},
			want: "legacy",
		},
		{
			name: "no kubelet: kube-proxy's chains in nf_tables mean nft",
			rules: map[string]string{
				"iptables-nft-save": kubeProxyRules, "ip6tables-nft-save": "",
				"iptables-legacy-save": foreignRules, "ip6tables-legacy-save": foreignRules,
			},
			want: "nft",
		},
		{
			name: "no kubelet, no proxy: more rules in legacy iptables mean legacy",
			rules: map[string]string{
				"iptables-nft-save": "", "ip6tables-nft-save": "",
				"iptables-legacy-save": foreignRules, "ip6tables-legacy-save": "",
			},
			want: "legacy",
		},
		{
			name:  "an empty node, or tools that fail, means nf_tables",
			rules: map[string]string{},
			want:  "nft",
		},
		{
			name: "legacy tools missing",
			rules: map[string]string{
				"iptables-nft-save": foreignRules, "ip6tables-nft-save": "",
			},
			want: "nft",
		},
		{
			name: "MINIPROXY_IPTABLES_MODE decides without looking",
			rules: map[string]string{
				"iptables-nft-save": kubeletNFT, "ip6tables-nft-save": "",
			},
			env:    []string{"MINIPROXY_IPTABLES_MODE=legacy"},
			want:   "legacy",
			noSave: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakes(t, tc.rules)
			args := []string{"--config=/var/lib/kube-proxy/config.conf", "--hostname-override=node 1"}
			out, stderr, err := f.run(tc.env, args...)
			if err != nil {
				t.Fatalf("entrypoint: %v\nstderr:\n%s", err, stderr)
			}
			wantAlt := "--set iptables /usr/sbin/iptables-" + tc.want + "\n--set ip6tables /usr/sbin/ip6tables-" + tc.want + "\n"
			if got := f.read("alternatives.log"); got != wantAlt {
				t.Errorf("update-alternatives calls:\n%s\nwant:\n%s\nstderr:\n%s", got, wantAlt, stderr)
			}
			if !strings.Contains(stderr, "using iptables-"+tc.want+" (") {
				t.Errorf("stderr does not say which backend and why:\n%s", stderr)
			}
			wantArgs := "arg: --config=/var/lib/kube-proxy/config.conf\narg: --hostname-override=node 1\n"
			if out != wantArgs {
				t.Errorf("miniproxy got:\n%s\nwant its arguments unchanged:\n%s", out, wantArgs)
			}
			calls := f.read("calls.log")
			if tc.noSave && calls != "" {
				t.Errorf("save tools ran although the mode was given:\n%s", calls)
			}
			if strings.Contains(calls, "legacy-save -t") {
				t.Errorf("iptables-legacy-save was asked for one table, which creates it in the kernel:\n%s", calls)
			}
		})
	}
}

func TestEntrypointFailures(t *testing.T) {
	t.Run("a wrong MINIPROXY_IPTABLES_MODE stops before miniproxy", func(t *testing.T) {
		f := newFakes(t, nil)
		out, stderr, err := f.run([]string{"MINIPROXY_IPTABLES_MODE=nftables"})
		if err == nil || out != "" || !strings.Contains(stderr, "must be nft or legacy") {
			t.Errorf("err %v, stdout %q, stderr %q; want exit status 2 naming the variable, miniproxy not run", err, out, stderr)
		}
	})
	t.Run("a failing update-alternatives stops before miniproxy", func(t *testing.T) {
		f := newFakes(t, nil)
		if err := os.WriteFile(filepath.Join(f.dir, "alternatives.fail"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		out, stderr, err := f.run(nil)
		if err == nil || out != "" || !strings.Contains(stderr, "update-alternatives --set iptables") {
			t.Errorf("err %v, stdout %q, stderr %q; want a failure naming update-alternatives, miniproxy not run", err, out, stderr)
		}
	})
}

// fakes is a directory of fake tools and their logs.
type fakes struct {
	t   *testing.T
	dir string
}

func newFakes(t *testing.T, rules map[string]string) *fakes {
	t.Helper()
	f := &fakes{t: t, dir: t.TempDir()}
	bin := filepath.Join(f.dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(path, text string, mode os.FileMode) {
		if err := os.WriteFile(path, []byte(text), mode); err != nil {
			t.Fatal(err)
		}
	}
	for _, tool := range []string{"iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"} {
		write(filepath.Join(bin, tool), fakeSave, 0o755)
		if r, ok := rules[tool]; ok {
			write(filepath.Join(f.dir, tool+".rules"), r, 0o644)
		}
	}
	write(filepath.Join(bin, "update-alternatives"), fakeAlternatives, 0o755)
	write(filepath.Join(bin, "miniproxy"), fakeMiniproxy, 0o755)
	return f
}

// run runs the entrypoint with only the fakes and the basic tools on PATH
// (the real iptables tools are in /usr/sbin, which is left out).
func (f *fakes) run(env []string, args ...string) (stdout, stderr string, err error) {
	f.t.Helper()
	for _, tool := range []string{"sh", "awk", "grep", "timeout", "basename", "cat"} {
		if _, err := exec.LookPath(tool); err != nil {
			f.t.Skipf("%s is not installed", tool)
		}
	}
	cmd := exec.Command("sh", append([]string{"entrypoint.sh"}, args...)...)
	cmd.Env = append([]string{
		"PATH=" + filepath.Join(f.dir, "bin") + ":/usr/bin:/bin",
		"FAKE_DIR=" + f.dir,
	}, env...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err = cmd.Run()
	return so.String(), se.String(), err
}

func (f *fakes) read(name string) string {
	b, err := os.ReadFile(filepath.Join(f.dir, name))
	if err != nil && !os.IsNotExist(err) {
		f.t.Fatal(err)
	}
	return string(b)
}
