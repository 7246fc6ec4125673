package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// Sysctl is one kernel parameter a Conntrack setting asks for.
type Sysctl struct {
	// Path is the parameter's file relative to the root of the file
	// system, e.g. "proc/sys/net/netfilter/nf_conntrack_max", so that
	// ApplySysctls can be pointed at a scratch directory in tests.
	Path string
	// Value is the wanted value.
	Value int
	// RaiseOnly leaves a larger current value alone: kube-proxy only ever
	// raises nf_conntrack_max and the conntrack hash size, so that an
	// operator's larger setting survives.
	RaiseOnly bool
}

// The files kube-proxy writes (pkg/proxy/conntrack/sysctls.go).
const (
	sysctlDir      = "proc/sys/net/netfilter/"
	hashsizeFile   = "sys/module/nf_conntrack/parameters/hashsize"
	conntrackLimit = 1 << 20 // kube-proxy caps maxPerCore x CPUs at 1M entries
)

// Sysctls lists what kube-proxy would write for these settings on a node
// with numCPU CPUs, in the order it writes them: nf_conntrack_max (raised
// to MaxPerCore x numCPU, at least Min, at most 1M; left alone when
// MaxPerCore is 0) with the hash size raised to a quarter of it, then the
// TCP and UDP timeouts that are not 0 and tcp_be_liberal when set.
//
// miniproxy applies them at every start, from the flags or the --config
// file, as kube-proxy does; zero values leave the kernel's alone.
func (c Conntrack) Sysctls(numCPU int) []Sysctl {
	var out []Sysctl
	if c.MaxPerCore > 0 {
		limit := int(c.MaxPerCore) * max(numCPU, 1)
		switch {
		case limit > conntrackLimit:
			limit = conntrackLimit
		case limit < int(c.Min):
			limit = int(c.Min)
		}
		out = append(out,
			Sysctl{Path: sysctlDir + "nf_conntrack_max", Value: limit, RaiseOnly: true},
			Sysctl{Path: hashsizeFile, Value: limit / 4, RaiseOnly: true})
	}
	seconds := func(name string, d time.Duration) {
		if d > 0 {
			out = append(out, Sysctl{Path: sysctlDir + name, Value: int(d / time.Second)})
		}
	}
	seconds("nf_conntrack_tcp_timeout_established", c.TCPEstablishedTimeout)
	seconds("nf_conntrack_tcp_timeout_close_wait", c.TCPCloseWaitTimeout)
	if c.TCPBeLiberal {
		out = append(out, Sysctl{Path: sysctlDir + "nf_conntrack_tcp_be_liberal", Value: 1})
	}
	seconds("nf_conntrack_udp_timeout", c.UDPTimeout)
	seconds("nf_conntrack_udp_timeout_stream", c.UDPStreamTimeout)
	return out
}

// ApplySysctls writes each parameter under root ("/" on a node) whose
// current value differs (or, with RaiseOnly, is smaller), and returns a
// line per change ("proc/sys/...: 65536 -> 262144") for the log. Like
// kube-proxy it stops at the first failure, because a node that refuses
// them (a container without privileges, a read-only /proc/sys) should be
// noticed at start-up, not later under load.
func ApplySysctls(root string, list []Sysctl) ([]string, error) {
	var changed []string
	for _, s := range list {
		file := filepath.Join(root, s.Path)
		raw, err := os.ReadFile(file)
		if err != nil {
			return changed, fmt.Errorf("read %s: %w", file, err)
		}
		cur, err := strconv.Atoi(strings.TrimSpace(string(raw)))
		if err != nil {
			return changed, fmt.Errorf("read %s: %q is not a number", file, strings.TrimSpace(string(raw)))
		}
		if cur == s.Value || (s.RaiseOnly && cur > s.Value) {
			continue
		}
		if err := os.WriteFile(file, []byte(strconv.Itoa(s.Value)), 0o644); err != nil {
			if errors.Is(err, os.ErrPermission) && strings.Contains(s.Path, "conntrack") {
				err = fmt.Errorf("%w (miniproxy needs a privileged container to set conntrack parameters; set them to 0 in the configuration to leave them alone)", err)
			}
			return changed, fmt.Errorf("set %s to %d: %w", file, s.Value, err)
		}
		changed = append(changed, fmt.Sprintf("%s: %d -> %d", s.Path, cur, s.Value))
	}
	return changed, nil
}

// NodeCPUs counts the node's online CPUs from sysfs under root, as
// kube-proxy sizes nf_conntrack_max: the limit is the node's, so a process
// pinned to fewer CPUs (runtime.NumCPU) must not shrink it.
func NodeCPUs(root string) int {
	raw, err := os.ReadFile(filepath.Join(root, "sys/devices/system/cpu/online"))
	if err != nil {
		return runtime.NumCPU()
	}
	n := 0
	for _, part := range strings.Split(strings.TrimSpace(string(raw)), ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err1 := strconv.Atoi(lo)
		b, err2 := a, error(nil)
		if isRange {
			b, err2 = strconv.Atoi(hi)
		}
		if err1 != nil || err2 != nil || b < a {
			return runtime.NumCPU()
		}
		n += b - a + 1
	}
	return max(n, 1)
}
