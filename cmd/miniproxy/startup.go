package main

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"strconv"

	"github.com/spf13/pflag"
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
		o.health.healthzBindAddress = withPort(o.health.healthzBindAddress, o.healthzPort)
	}
	if fs.Changed("metrics-port") {
		o.health.metricsBindAddress = withPort(o.health.metricsBindAddress, o.metricsPort)
	}
}

// versionText is what --version prints: miniproxy's build, and with raw
// the Go version and VCS revision it was built from.
func versionText(raw bool) string {
	v := "miniproxy (devel)"
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if info.Main.Version != "" && info.Main.Version != "(devel)" {
		v = "miniproxy " + info.Main.Version
	}
	if !raw {
		return v + " (the flags of kube-proxy v1.37)"
	}
	rev := "unknown"
	for _, s := range info.Settings {
		if s.Key == "vcs.revision" {
			rev = s.Value
		}
	}
	return fmt.Sprintf("%s\ngo: %s\nrevision: %s", v, info.GoVersion, rev)
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
