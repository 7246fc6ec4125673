package proxy

import (
	"github.com/miniproxy/miniproxy/pkg/config"
)

// RouteLocalnet is the sysctl localhost NodePorts need: it lets the node
// route packets whose source or destination is in 127.0.0.0/8.
const RouteLocalnet = "net/ipv4/conf/all/route_localnet"

// Sysctl sets kernel parameters of the network namespace the daemon runs
// in. It is the only way pkg/proxy changes a sysctl, so that tests can give
// it a fake and never touch a namespace they do not own.
type Sysctl interface {
	// Ensure gives the parameter (its path under /proc/sys, e.g.
	// RouteLocalnet) the value unless it has it already, and says whether
	// it wrote it.
	Ensure(name string, value int) (changed bool, err error)
}

// ProcSysctl is the real Sysctl: /proc/sys as the calling thread sees it,
// that is, the parameters of the network namespace it runs in.
type ProcSysctl struct{}

// Ensure writes /proc/sys/<name> when its value differs.
func (ProcSysctl) Ensure(name string, value int) (bool, error) {
	changed, err := config.ApplySysctls("/", []config.Sysctl{{Path: "proc/sys/" + name, Value: value}})
	return len(changed) > 0, err
}
