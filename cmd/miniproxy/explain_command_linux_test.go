package main

import (
	"errors"
	"io"
	"strings"
	"testing"
)

// explain is a subcommand: the daemon's command line, which tests compare
// with kube-proxy's, gains no flag from it.
func TestExplainAddsNoFlagToTheDaemon(t *testing.T) {
	fs := newFlagSet(&options{})
	var eo explainOptions
	efs := explainFlagSet(&options{}, &eo)
	for _, name := range []string{"src", "dst", "from-node", "iface", "output", "daemon", "netns"} {
		if fs.Lookup(name) != nil {
			t.Errorf("the daemon has --%s", name)
		}
		if efs.Lookup(name) == nil {
			t.Errorf("explain lacks --%s", name)
		}
	}
	if _, _, err := commandLine([]string{"--src", "10.0.0.1"}, io.Discard); err == nil {
		t.Error("the daemon took --src")
	}
}

func TestExplainRefusesAQuestionItCannotAsk(t *testing.T) {
	for _, args := range [][]string{
		{"--dst", "10.0.0.1:80"},
		{"--src", "10.0.0.2", "--dst", "10.0.0.1"},
		{"--src", "10.0.0.2", "--dst", "10.0.0.1:80/icmp"},
		{"--src", "10.0.0.2", "--dst", "10.0.0.1:80", "-o", "yaml"},
		{"--src", "10.0.0.2", "--dst", "10.0.0.1:80", "stray"},
	} {
		err := run(append([]string{"explain"}, args...), io.Discard)
		if !errors.Is(err, errUsage) {
			t.Errorf("explain %q: %v, want a usage error", strings.Join(args, " "), err)
		}
	}
	var out strings.Builder
	if err := run([]string{"explain", "--help"}, &out); err != nil || !strings.Contains(out.String(), "--netns") || strings.Contains(out.String(), "--conntrack-min") {
		t.Errorf("explain --help: %v\n%s", err, out.String())
	}
}
