package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/miniproxy/miniproxy/pkg/config"
	"github.com/miniproxy/miniproxy/pkg/metrics"
)

// applyDeprecatedPorts gives kube-proxy's deprecated --healthz-port and
// --metrics-port their meaning when given: the port of the bind address
// (0 disables the server), as kube-proxy does without --config.
func (o *options) applyDeprecatedPorts(fs *pflag.FlagSet) {
	withPort := func(addr string, port int32) string {
		if port == 0 {
			return ""
		}
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		return net.JoinHostPort(host, strconv.Itoa(int(port)))
	}
	if fs.Changed("healthz-port") {
		o.cfg.HealthzBindAddress = withPort(o.cfg.HealthzBindAddress, o.healthzPort)
	}
	if fs.Changed("metrics-port") {
		o.cfg.MetricsBindAddress = withPort(o.cfg.MetricsBindAddress, o.metricsPort)
	}
}

// build is what the binary knows of its own build: the module version
// ("(devel)" for a build from a work tree), and the VCS revision, whether
// the tree had changes, and the commit's time when Go recorded them.
type build struct {
	ok                           bool
	version, goVersion           string
	revision, treeState, vcsTime string
}

func readBuild() build {
	b := build{version: "(devel)"}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return b
	}
	b.ok, b.goVersion = true, info.GoVersion
	if info.Main.Version != "" {
		b.version = info.Main.Version
	}
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			b.revision = s.Value
		case "vcs.time":
			b.vcsTime = s.Value
		case "vcs.modified":
			b.treeState = map[string]string{"true": "dirty", "false": "clean"}[s.Value]
		}
	}
	return b
}

// versionText is what --version prints: miniproxy's build, and with raw
// the Go version and VCS revision it was built from.
func versionText(raw bool) string {
	b := readBuild()
	v := "miniproxy " + b.version
	if !b.ok {
		return v
	}
	if !raw {
		return v + " (the flags of kube-proxy v1.37)"
	}
	rev := b.revision
	if rev == "" {
		rev = "unknown"
	}
	return fmt.Sprintf("%s\ngo: %s\nrevision: %s", v, b.goVersion, rev)
}

// buildInfo is kubernetes_build_info's labels for this binary, from what
// versionText reads: git_version is miniproxy's module version, major and
// minor are taken from it when it is vX.Y.Z (empty for a devel build),
// git_commit and git_tree_state are the VCS revision and whether the tree
// was modified, and build_date is the commit's time (Go records no build
// time); each is empty when Go did not record it.
func buildInfo() metrics.BuildInfo { return readBuild().info() }

func (b build) info() metrics.BuildInfo {
	bi := metrics.BuildInfo{GitVersion: b.version, GitCommit: b.revision, GitTreeState: b.treeState, BuildDate: b.vcsTime}
	if v, ok := strings.CutPrefix(b.version, "v"); ok {
		parts := strings.SplitN(v, ".", 3)
		if len(parts) == 3 {
			bi.Major, bi.Minor = parts[0], parts[1]
		}
	}
	return bi
}

// applyOOMScoreAdj sets --oom-score-adj on this process, as kube-proxy
// does (default -999: the proxy is among the last processes the kernel
// kills when memory runs out). As kube-proxy, a refusal is logged, not
// fatal.
func applyOOMScoreAdj(v int32, log *slog.Logger) {
	if err := os.WriteFile("/proc/self/oom_score_adj", []byte(strconv.Itoa(int(v))), 0o644); err != nil {
		log.Info("could not apply --oom-score-adj", "value", v, "err", err)
	}
}

// writeConfig is --write-config-to: the effective configuration as a
// KubeProxyConfiguration file.
func writeConfig(c *config.Config, path string, log *slog.Logger) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("--write-config-to: %w", err)
	}
	if err := c.WriteYAML(f); err != nil {
		f.Close()
		return fmt.Errorf("--write-config-to %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("--write-config-to %s: %w", path, err)
	}
	log.Info("wrote the configuration", "file", path)
	return nil
}

// applyConntrack sets the conntrack parameters, as kube-proxy does at
// start-up with or without --config: a failure (no privileges, a read-only
// /proc/sys or /sys) ends the start, as in kube-proxy 1.37. Set
// --conntrack-max-per-core=0 and the timeouts to 0 to leave them alone.
func applyConntrack(ct config.Conntrack, log *slog.Logger) error {
	changed, err := config.ApplySysctls("/", ct.Sysctls(config.NodeCPUs("/")))
	for _, c := range changed {
		log.Info("set a conntrack parameter", "change", c)
	}
	if err != nil {
		return fmt.Errorf("could not set conntrack parameters from the configuration: %w", err)
	}
	return nil
}

// configFilePoll is how often the daemon looks at its --config file.
const configFilePoll = 5 * time.Second

// watchConfigFile ends miniproxy (cause) when the --config file changes, as
// kube-proxy does, so that the DaemonSet starts it again with the new
// configuration (a ConfigMap update replaces the mounted file). It looks,
// every poll, at what the path resolves to: a replaced file, a new size or
// modification time, or the file's disappearance.
func watchConfigFile(ctx context.Context, path string, poll time.Duration, cause func(error)) {
	first, err := os.Stat(path)
	if err != nil {
		cause(fmt.Errorf("watch the configuration file: %w", err))
		return
	}
	changed := func(context.Context) (bool, error) {
		now, err := os.Stat(path)
		if err != nil || !os.SameFile(first, now) || now.Size() != first.Size() || !now.ModTime().Equal(first.ModTime()) {
			cause(fmt.Errorf("the configuration file %s changed; exiting so that miniproxy starts again with it, as kube-proxy does", path))
			return true, nil
		}
		return false, nil
	}
	go func() { _ = wait.PollUntilContextCancel(ctx, poll, false, changed) }()
}
