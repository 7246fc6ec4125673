// Package netns builds the end-to-end test lab of miniproxy: a small network
// of Linux network namespaces (nodes, pods, a router, clients) joined by veth
// pairs, in which real processes (the echo server, miniproxy, the API server)
// run and real packets flow.
//
// Safety is the point of the package. The root network namespace of the test
// machines routes to the outside world, so nothing here ever configures it:
// every link, address, route and sysctl is set through a netlink handle bound
// to a lab namespace (netlink.NewHandleAt) or from an OS thread that has
// entered a lab namespace and is discarded afterwards. Every namespace carries
// a per-run prefix, is recorded in its Lab, and is deleted by Lab.Close, by
// the SIGINT/SIGTERM handler, or, when the test process dies without cleaning
// up (SIGKILL, a test timeout, a panic in a goroutine), by a small watchdog
// process that outlives it. Should the watchdog die too (the whole process
// tree killed), the next lab created on the machine deletes what was left
// (claim.go).
//
// Topology choice: links are point-to-point veth pairs (Lab.Link) routed by
// namespaces that have forwarding enabled; a bridge (Namespace.AddBridge and
// Lab.LinkBridge) is available for a shared LAN such as the nodes' network.
// The interface leading from namespace A to namespace B is always named after
// B's short name, so "ip -n <A> addr show <B>" finds it and iptables rules can
// name it.
package netns

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// netnsDir is where named network namespaces are bind-mounted; the same
// directory as iproute2 and vishvananda/netns use.
const netnsDir = "/run/netns"

// Lab is one isolated lab: a set of namespaces sharing a name prefix and the
// processes started in them. Several labs may exist at once in one process;
// their names never collide because each has its own random prefix.
type Lab struct {
	prefix string
	claim  *os.File // see claim.go

	mu         sync.Mutex
	closed     bool
	namespaces []*Namespace
	procs      []*Process
	cleanups   []func() error // see addCleanup

	closeOnce sync.Once
	closeErr  error
}

// registry tracks every live lab of this process, so the signal handler can
// close them, and every prefix ever used, so Leftovers can find what leaked.
var registry struct {
	mu       sync.Mutex
	live     map[*Lab]struct{}
	prefixes []string
	sigOnce  sync.Once
}

// shortRE restricts short names to what is valid both in a namespace name and
// as a Linux interface name (at most 15 bytes), because the interface that
// leads to a namespace is named after its short name.
var shortRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,14}$`)

// New creates an empty lab with a fresh prefix and registers it for cleanup by
// the signal handler and the watchdog. Call Close when done; tests should
// prefer NewLab, which does so through t.Cleanup.
func New() (*Lab, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("create lab: network namespaces need root")
	}
	if err := ensureWatchdog(); err != nil {
		return nil, fmt.Errorf("create lab: %w", err)
	}
	// What a killed run left must not pile up; it never blocks this lab.
	reaped, err := reapAbandoned()
	if len(reaped) > 0 {
		fmt.Fprintf(os.Stderr, "netns lab: deleted %d namespaces of labs whose process died without cleaning up: %s\n",
			len(reaped), strings.Join(reaped, " "))
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "netns lab: %v\n", err)
	}
	prefix, err := newPrefix()
	if err != nil {
		return nil, fmt.Errorf("create lab: %w", err)
	}
	claimed, err := claim(prefix)
	if err != nil {
		return nil, fmt.Errorf("create lab: %w", err)
	}
	l := &Lab{prefix: prefix, claim: claimed}
	registry.mu.Lock()
	if registry.live == nil {
		registry.live = map[*Lab]struct{}{}
	}
	registry.live[l] = struct{}{}
	registry.prefixes = append(registry.prefixes, prefix)
	registry.mu.Unlock()
	registry.sigOnce.Do(installSignalHandler)
	return l, nil
}

// NewLab is New for tests: it skips the test when not running as root, fails
// it when the lab cannot be created, closes the lab in t.Cleanup, and when the
// test failed logs the tail of every process's output, which is usually the
// explanation.
func NewLab(t testing.TB) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the netns lab needs root")
	}
	l, err := New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			l.logOutputs(t)
		}
		if err := l.Close(); err != nil {
			t.Errorf("close lab %s: %v", l.prefix, err)
		}
	})
	return l
}

// Prefix returns the per-run prefix of every namespace name in the lab, for
// log messages and for tests that check nothing was left behind.
func (l *Lab) Prefix() string { return l.prefix }

// newPrefix returns "mp<pid%1000><4 hex>-", short enough to leave room for the
// short name, and used by no namespace and no lab's claim that exists now.
func newPrefix() (string, error) {
	for range 10 {
		var b [2]byte
		if _, err := rand.Read(b[:]); err != nil {
			return "", fmt.Errorf("random prefix: %w", err)
		}
		p := fmt.Sprintf("mp%d%s-", os.Getpid()%1000, hex.EncodeToString(b[:]))
		taken, err := namespacesWithPrefix(p)
		if err != nil {
			return "", err
		}
		_, err = os.Stat(filepath.Join(claimDir, p+claimSuffix))
		if len(taken) == 0 && errors.Is(err, os.ErrNotExist) {
			return p, nil
		}
	}
	return "", errors.New("no free namespace prefix after 10 tries")
}

// namespacesWithPrefix lists the named namespaces whose name starts with p.
func namespacesWithPrefix(p string) ([]string, error) {
	entries, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", netnsDir, err)
	}
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), p) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// Leftovers returns the named namespaces that still exist although they carry
// the prefix of a lab created by this process, whether or not it was closed.
// A test's TestMain can call it after m.Run to prove the lab cleaned up.
func Leftovers() ([]string, error) {
	registry.mu.Lock()
	prefixes := append([]string(nil), registry.prefixes...)
	registry.mu.Unlock()
	var out []string
	for _, p := range prefixes {
		names, err := namespacesWithPrefix(p)
		if err != nil {
			return nil, err
		}
		out = append(out, names...)
	}
	return out, nil
}

// Close stops every process started in the lab, kills any other process
// still inside its namespaces, and deletes the namespaces (which destroys
// their veths, bridges and routes with them). It is idempotent and safe to
// call from several goroutines; later calls return the first call's result.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() {
		l.mu.Lock()
		l.closed = true
		procs := l.procs
		namespaces := l.namespaces
		cleanups := l.cleanups
		l.mu.Unlock()

		var errs []error
		// Stop processes in parallel: each may take its grace period.
		var wg sync.WaitGroup
		for _, p := range procs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p.Stop()
			}()
		}
		wg.Wait()
		for i := len(cleanups) - 1; i >= 0; i-- {
			if err := cleanups[i](); err != nil {
				errs = append(errs, err)
			}
		}
		for i := len(namespaces) - 1; i >= 0; i-- {
			if err := namespaces[i].destroy(); err != nil {
				errs = append(errs, err)
			}
		}
		// With namespaces left, the claim stays until this process ends;
		// then the next lab reaps them.
		if len(errs) == 0 {
			if err := release(l.prefix, l.claim); err != nil {
				errs = append(errs, err)
			}
		}
		registry.mu.Lock()
		delete(registry.live, l)
		registry.mu.Unlock()
		l.closeErr = errors.Join(errs...)
	})
	return l.closeErr
}

// logOutputs logs the last part of every process's output on a failed test.
func (l *Lab) logOutputs(t testing.TB) {
	l.mu.Lock()
	procs := append([]*Process(nil), l.procs...)
	l.mu.Unlock()
	const tail = 8 << 10
	for _, p := range procs {
		out := p.Output()
		if len(out) > tail {
			out = "...\n" + out[len(out)-tail:]
		}
		t.Logf("output of %s in %s (pid %d):\n%s", p.name, p.ns.name, p.Pid(), out)
	}
}

// installSignalHandler makes SIGINT and SIGTERM close every live lab before
// the process exits, because Go's default action would skip all cleanup and
// leave namespaces and processes behind.
func installSignalHandler() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		sig := <-ch
		fmt.Fprintf(os.Stderr, "netns lab: %v: tearing down all labs\n", sig)
		closeAll()
		code := 130
		if sig == syscall.SIGTERM {
			code = 143
		}
		os.Exit(code)
	}()
}

// closeAll closes every live lab, bounded in time so a stuck teardown cannot
// keep a Ctrl-C'd process alive forever (the watchdog finishes the job).
func closeAll() {
	registry.mu.Lock()
	labs := make([]*Lab, 0, len(registry.live))
	for l := range registry.live {
		labs = append(labs, l)
	}
	registry.mu.Unlock()
	done := make(chan struct{})
	go func() {
		for _, l := range labs {
			if err := l.Close(); err != nil {
				fmt.Fprintf(os.Stderr, "netns lab: close %s: %v\n", l.prefix, err)
			}
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		fmt.Fprintln(os.Stderr, "netns lab: teardown timed out; the watchdog will finish it")
	}
}

// nsPath is the bind-mount path of the named namespace name.
func nsPath(name string) string { return filepath.Join(netnsDir, name) }
