package main

import (
	"fmt"
	"log/slog"

	"github.com/go-logr/logr"
	"k8s.io/component-base/logs"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/klog/v2"

	"github.com/miniproxy/miniproxy/pkg/config"
	"github.com/miniproxy/miniproxy/pkg/features"
)

// setupLogging applies the logging configuration through component-base,
// as kube-proxy does, so that miniproxy's lines have kube-proxy's format
// (klog text, or json), verbosity (-v, --vmodule) and streams, and returns
// the logger the packages write to: slog on top of klog, where slog's Debug
// is klog's V(4) (every sync) and Info V(0).
func setupLogging(c *config.Config) (*slog.Logger, error) {
	if err := logsapi.ValidateAndApply(&c.Logging, features.Effective(c.FeatureGates)); err != nil {
		return nil, fmt.Errorf("%w: logging: %v", errUsage, err)
	}
	logs.InitLogs()
	return slog.New(logr.ToSlogHandler(klog.Background())), nil
}
