package metrics

import (
	"runtime"

	"github.com/prometheus/client_golang/prometheus"
)

// BuildInfo is what kubernetes_build_info says of the running binary, with
// the label names kube-proxy's (component-base's) version metric uses.
type BuildInfo struct {
	Major, Minor, GitVersion, GitCommit, GitTreeState, BuildDate string
	// GoVersion, Compiler and Platform are the running ones when empty.
	GoVersion, Compiler, Platform string
}

// collector gives kubernetes_build_info: a constant 1 labelled by b.
func (b BuildInfo) collector() prometheus.Collector {
	if b.GoVersion == "" {
		b.GoVersion = runtime.Version()
	}
	if b.Compiler == "" {
		b.Compiler = runtime.Compiler
	}
	if b.Platform == "" {
		b.Platform = runtime.GOOS + "/" + runtime.GOARCH
	}
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kubernetes_build_info",
		Help: beta + "A metric with a constant '1' value labeled by major, minor, git version, git commit, git tree state, build date, Go version, and compiler from which Kubernetes was built, and platform on which it is running.",
	}, []string{"major", "minor", "git_version", "git_commit", "git_tree_state", "build_date", "go_version", "compiler", "platform"})
	g.WithLabelValues(b.Major, b.Minor, b.GitVersion, b.GitCommit, b.GitTreeState, b.BuildDate, b.GoVersion, b.Compiler, b.Platform).Set(1)
	return g
}
