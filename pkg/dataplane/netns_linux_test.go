package dataplane

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// testNetns is a network namespace of one test's own. Every kernel change a
// test makes goes through it, and each of its methods first checks that the
// calling thread is still inside it, so that nothing can reach the root
// namespace's tables.
type testNetns struct {
	name   string
	handle netns.NsHandle
	orig   netns.NsHandle
	tid    int
}

// enterTestNetns locks the calling goroutine to its OS thread and moves
// that thread into a new, uniquely named network namespace; t's cleanup moves
// it back and deletes the namespace, on every exit path. Commands started
// from this goroutine (os/exec forks from the calling thread)
// run in the new namespace. Goroutines do not inherit it, and subtests run
// on goroutines of their own: call this at the top of every (sub)test or
// benchmark that touches the kernel.
func enterTestNetns(t testing.TB) *testNetns {
	t.Helper()
	if os.Getenv("MINIPROXY_UNIT_ONLY") != "" {
		t.Skip("make unit: no test that needs the kernel")
	}
	if os.Geteuid() != 0 {
		t.Skip("creating a network namespace needs root")
	}
	for _, tool := range []string{"iptables", "ip6tables", "iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("get the current network namespace: %v", err)
	}
	name := fmt.Sprintf("mpdp-%d-%08x", os.Getpid(), rand.Uint32())
	handle, err := netns.NewNamed(name)
	if err != nil {
		// NewNamed may have moved the thread before failing. If it cannot
		// be moved back, it stays locked and dies with the goroutine.
		if serr := netns.Set(orig); serr == nil {
			runtime.UnlockOSThread()
		}
		orig.Close()
		_ = netns.DeleteNamed(name)
		t.Fatalf("create network namespace %s: %v", name, err)
	}
	ns := &testNetns{name: name, handle: handle, orig: orig, tid: syscall.Gettid()}
	t.Cleanup(func() {
		if tid := syscall.Gettid(); tid != ns.tid {
			t.Errorf("cleanup of %s runs on thread %d, not %d", name, tid, ns.tid)
		}
		if err := netns.Set(orig); err != nil {
			t.Errorf("return to the original network namespace: %v (the thread stays locked and dies with the test)", err)
		} else {
			runtime.UnlockOSThread()
		}
		handle.Close()
		orig.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete network namespace %s: %v", name, err)
		}
	})
	ns.check(t)
	return ns
}

// check fails the test unless the calling thread is inside the namespace.
func (ns *testNetns) check(t testing.TB) {
	t.Helper()
	cur, err := netns.Get()
	if err != nil {
		t.Fatalf("get the current network namespace: %v", err)
	}
	defer cur.Close()
	if !cur.Equal(ns.handle) || cur.Equal(ns.orig) || syscall.Gettid() != ns.tid {
		t.Fatalf("not inside the test network namespace %s; refusing to touch iptables", ns.name)
	}
}

// run runs an iptables tool inside the namespace, with stdin as its input.
func (ns *testNetns) run(t testing.TB, stdin string, name string, args ...string) string {
	t.Helper()
	ns.check(t)
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// restore feeds input to (ip6)iptables-restore --noflush in the namespace.
func (ns *testNetns) restore(t testing.TB, family iptables.Family, input string) {
	t.Helper()
	ns.run(t, input, restoreCommand(family), "--noflush")
}

var countersRE = regexp.MustCompile(`\[\d+:\d+\]`)

// save returns the namespace's iptables-save output without comment lines
// and with counters zeroed, so that two saves can be compared.
func (ns *testNetns) save(t testing.TB, family iptables.Family) string {
	t.Helper()
	var b strings.Builder
	for _, l := range strings.Split(ns.run(t, "", saveCommand(family)), "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		b.WriteString(countersRE.ReplaceAllString(l, "[0:0]"))
		b.WriteByte('\n')
	}
	return b.String()
}

// apply runs dp.Apply after checking the namespace.
func (ns *testNetns) apply(t testing.TB, dp *Dataplane, rs *iptables.Ruleset, full bool) (Result, error) {
	t.Helper()
	ns.check(t)
	return dp.Apply(rs, full)
}
