package netns

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

const echoPkg = "github.com/miniproxy/miniproxy/cmd/echoserver"

var pfx = netip.MustParsePrefix

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(m.Run())
	}
	before, beforeErr := rootSnapshot()
	code := m.Run()
	if os.Geteuid() == 0 {
		// Nothing of ours may be left, as "ip netns list" sees it.
		out, err := exec.Command("ip", "netns", "list").Output()
		if err != nil {
			fmt.Fprintf(os.Stderr, "ip netns list: %v\n", err)
			code = 1
		}
		registry.mu.Lock()
		prefixes := append([]string(nil), registry.prefixes...)
		registry.mu.Unlock()
		for _, line := range strings.Split(string(out), "\n") {
			for _, p := range prefixes {
				if strings.HasPrefix(line, p) {
					fmt.Fprintf(os.Stderr, "leftover namespace: %s\n", line)
					code = 1
				}
			}
		}
		if left, err := Leftovers(); err != nil || len(left) > 0 {
			fmt.Fprintf(os.Stderr, "Leftovers() = %v, %v\n", left, err)
			code = 1
		}
		// The root namespace must be exactly as before.
		after, afterErr := rootSnapshot()
		if beforeErr != nil || afterErr != nil || !reflect.DeepEqual(before, after) {
			fmt.Fprintf(os.Stderr, "root namespace changed:\nbefore %v (%v)\nafter  %v (%v)\n", before, beforeErr, after, afterErr)
			code = 1
		}
	}
	os.Exit(code)
}

// rootSnapshot lists (read-only) the root namespace's links, addresses and
// routes, and its forwarding sysctls, so TestMain can prove the tests never
// touched it.
func rootSnapshot() ([]string, error) {
	var s []string
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		s = append(s, "link "+l.Attrs().Name)
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		s = append(s, "addr "+a.IPNet.String())
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, err
	}
	for _, r := range routes {
		s = append(s, "route "+r.String())
	}
	for _, f := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
		b, _ := os.ReadFile(f)
		s = append(s, f+"="+strings.TrimSpace(string(b)))
	}
	sort.Strings(s)
	return s, nil
}

func mustNS(t *testing.T, l *Lab, short string) *Namespace {
	t.Helper()
	n, err := l.AddNamespace(short)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// startEcho runs the echo server in n (HTTP :8080, UDP :8081) and waits
// until it listens.
func startEcho(t *testing.T, n *Namespace, name string, extra ...string) *Process {
	t.Helper()
	bin := BuildBinary(t, echoPkg)
	args := append([]string{"-listen", ":8080", "-udp-listen", ":8081", "-name", name}, extra...)
	p, err := n.Start(bin, args...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	must(t, p.WaitForOutput(ctx, "listening on http"))
	return p
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

func wantLine(t *testing.T, body, line string) {
	t.Helper()
	for _, l := range strings.Split(body, "\n") {
		if l == line {
			return
		}
	}
	t.Errorf("reply lacks line %q:\n%s", line, body)
}

func TestLinkedPairReachEachOther(t *testing.T) {
	l := NewLab(t)
	a, b := mustNS(t, l, "a"), mustNS(t, l, "b")
	must(t, l.Link(a, b, pfx("10.0.0.1/24"), pfx("10.0.0.2/24")))
	must(t, a.AddAddr("b", pfx("fd00::1/64")))
	must(t, b.AddAddr("a", pfx("fd00::2/64")))
	startEcho(t, a, "server-a")

	body, err := b.Curl(ctx(t), "http://10.0.0.1:8080/hello?x=1", 5*time.Second)
	must(t, err)
	wantLine(t, body, "client_address=10.0.0.2")
	wantLine(t, body, "hostname=server-a")
	wantLine(t, body, "query=x=1")

	status, body, err := b.HTTPGet(ctx(t), "http://[fd00::1]:8080/", 5*time.Second)
	must(t, err)
	if status != 200 {
		t.Errorf("status %d", status)
	}
	wantLine(t, body, "client_address=fd00::2")

	got, err := b.UDPRequest(ctx(t), "10.0.0.1:8081", "ping", 5*time.Second)
	must(t, err)
	if want := "client_address=10.0.0.2\nserver=server-a\n"; got != want {
		t.Errorf("udp reply %q, want %q", got, want)
	}

	// The interface towards a namespace is named after it.
	if err := b.WithNetlink(func(h *netlink.Handle) error { _, err := h.LinkByName("a"); return err }); err != nil {
		t.Errorf("interface a in %s: %v", b.Name(), err)
	}
	if err := a.WithNetlink(func(h *netlink.Handle) error { _, err := h.LinkByName("b"); return err }); err != nil {
		t.Errorf("interface b in %s: %v", a.Name(), err)
	}
	if !strings.HasPrefix(a.Name(), l.Prefix()) || a.Short() != "a" || a.Path() != "/run/netns/"+a.Name() {
		t.Errorf("names: %q %q %q", a.Name(), a.Short(), a.Path())
	}
	out, _, err := a.Run(ctx(t), "ip", "-o", "addr", "show", "dev", "b")
	must(t, err)
	if !strings.Contains(out, "10.0.0.1/24") || !strings.Contains(out, "fd00::1/64") {
		t.Errorf("ip addr in %s:\n%s", a.Name(), out)
	}
}

func TestRouterForwards(t *testing.T) {
	l := NewLab(t)
	client, router, server := mustNS(t, l, "client"), mustNS(t, l, "router"), mustNS(t, l, "server")
	must(t, l.Link(client, router, pfx("198.51.100.79/24"), pfx("198.51.100.1/24")))
	must(t, l.Link(server, router, pfx("10.240.0.2/24"), pfx("10.240.0.1/24")))
	must(t, client.AddAddr("router", pfx("fd00:c::79/64")))
	must(t, router.AddAddr("client", pfx("fd00:c::1/64")))
	must(t, server.AddAddr("router", pfx("fd00:5::2/64")))
	must(t, router.AddAddr("server", pfx("fd00:5::1/64")))
	must(t, client.AddRoute(pfx("0.0.0.0/0"), netip.MustParseAddr("198.51.100.1")))
	must(t, client.AddRoute(pfx("::/0"), netip.MustParseAddr("fd00:c::1")))
	must(t, server.AddRoute(pfx("0.0.0.0/0"), netip.MustParseAddr("10.240.0.1")))
	must(t, server.AddRoute(pfx("::/0"), netip.MustParseAddr("fd00:5::1")))
	startEcho(t, server, "server")

	// Forwarding is off in a new namespace: nothing gets through.
	if v, err := router.Sysctl("net.ipv4.ip_forward"); err != nil || v != "0" {
		t.Fatalf("ip_forward in a new namespace = %q, %v", v, err)
	}
	if _, err := client.Curl(ctx(t), "http://10.240.0.2:8080/", 500*time.Millisecond); err == nil {
		t.Fatal("reached the server through a router without forwarding")
	}

	must(t, router.EnableForwarding())
	for key, want := range map[string]string{
		"net.ipv4.ip_forward":          "1",
		"net/ipv4/conf/all/rp_filter":  "0",
		"net.ipv6.conf.all.forwarding": "1",
	} {
		if v, err := router.Sysctl(key); err != nil || v != want {
			t.Errorf("%s = %q, %v; want %s", key, v, err, want)
		}
	}
	body, err := client.Curl(ctx(t), "http://10.240.0.2:8080/", 5*time.Second)
	must(t, err)
	wantLine(t, body, "client_address=198.51.100.79")
	body, err = client.Curl(ctx(t), "http://[fd00:5::2]:8080/", 5*time.Second)
	must(t, err)
	wantLine(t, body, "client_address=fd00:c::79")
}

// TestBridgeAndMultipath builds the brief's LAN (a bridge in the router) and
// moves a load-balancer VIP between nodes with SetRoute.
func TestBridgeAndMultipath(t *testing.T) {
	l := NewLab(t)
	router, client := mustNS(t, l, "router"), mustNS(t, l, "client")
	n1, n2 := mustNS(t, l, "node1"), mustNS(t, l, "node2")
	must(t, router.EnableForwarding())
	must(t, router.AddBridge("lan", pfx("10.240.0.1/24")))
	gw := netip.MustParseAddr("10.240.0.1")
	vip := pfx("203.0.113.140/32")
	for i, n := range []*Namespace{n1, n2} {
		must(t, l.LinkBridge(n, router, "lan", netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 240, 0, byte(2 + i)}), 24)))
		must(t, n.AddRoute(pfx("0.0.0.0/0"), gw))
		must(t, n.AddAddr("lo", vip))
		startEcho(t, n, n.Short())
	}
	must(t, l.Link(client, router, pfx("198.51.100.79/24"), pfx("198.51.100.1/24")))
	must(t, client.AddRoute(pfx("0.0.0.0/0"), netip.MustParseAddr("198.51.100.1")))

	// Node to node across the bridge.
	body, err := n1.Curl(ctx(t), "http://10.240.0.3:8080/", 5*time.Second)
	must(t, err)
	wantLine(t, body, "client_address=10.240.0.2")
	wantLine(t, body, "hostname=node2")

	n1addr, n2addr := netip.MustParseAddr("10.240.0.2"), netip.MustParseAddr("10.240.0.3")
	must(t, router.SetRoute(vip, n1addr, n2addr))
	out, _, err := router.Run(ctx(t), "ip", "route", "show", vip.String())
	must(t, err)
	if !strings.Contains(out, "nexthop via 10.240.0.2") || !strings.Contains(out, "nexthop via 10.240.0.3") {
		t.Errorf("multipath route:\n%s", out)
	}
	for _, tc := range []struct {
		via  netip.Addr
		want string
	}{{n2addr, "hostname=node2"}, {n1addr, "hostname=node1"}} {
		must(t, router.SetRoute(vip, tc.via))
		body, err := client.Curl(ctx(t), "http://203.0.113.140:8080/", 5*time.Second)
		must(t, err)
		wantLine(t, body, tc.want)
		wantLine(t, body, "client_address=198.51.100.79")
	}
	must(t, router.SetRoute(vip))
	must(t, router.SetRoute(vip)) // deleting twice is fine
	if _, err := client.Curl(ctx(t), "http://203.0.113.140:8080/", 500*time.Millisecond); err == nil {
		t.Error("VIP still reachable after its route was deleted")
	}
}

func TestDo(t *testing.T) {
	l := NewLab(t)
	n := mustNS(t, l, "x")
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	self, err := os.Readlink("/proc/thread-self/ns/net")
	must(t, err)
	want, err := os.Stat(n.Path())
	must(t, err)
	must(t, n.Do(func() error {
		got, err := os.Stat("/proc/thread-self/ns/net")
		if err != nil {
			return err
		}
		if !os.SameFile(got, want) {
			return errors.New("Do did not run inside the namespace")
		}
		return nil
	}))
	after, err := os.Readlink("/proc/thread-self/ns/net")
	must(t, err)
	if after != self {
		t.Errorf("calling thread moved from %s to %s", self, after)
	}
	wantErr := errors.New("boom")
	if err := n.Do(func() error { return wantErr }); err != wantErr {
		t.Errorf("Do returned %v, want fn's error", err)
	}
	func() {
		defer func() {
			if p := recover(); p != "panic in ns" {
				t.Errorf("recovered %v, want the panic of fn", p)
			}
		}()
		n.Do(func() error { panic("panic in ns") })
	}()
}

func TestCloseRemovesNamespacesAndProcesses(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	l, err := New()
	must(t, err)
	t.Cleanup(func() { l.Close() })
	a, b := mustNS(t, l, "a"), mustNS(t, l, "b")
	must(t, l.Link(a, b, pfx("10.0.0.1/24"), pfx("10.0.0.2/24")))
	p, err := a.Start("sleep", "1000")
	must(t, err)
	// A process that left our process group and session: only the
	// namespace scan can find it.
	_, _, err = b.Run(ctx(t), "sh", "-c", "setsid sleep 1000 </dev/null >/dev/null 2>&1 &")
	must(t, err)
	var stray []int
	deadline := time.Now().Add(5 * time.Second)
	for len(stray) == 0 && time.Now().Before(deadline) {
		stray = pidsIn(t, b)
		time.Sleep(20 * time.Millisecond)
	}
	if len(stray) == 0 {
		t.Fatal("the detached sleep is not in the namespace")
	}

	must(t, l.Close())
	must(t, l.Close()) // idempotent
	select {
	case <-p.Done():
	default:
		t.Error("Start'ed process still running after Close")
	}
	for _, pid := range stray {
		if !isZombie(pid) {
			t.Errorf("detached process %d still alive after Close", pid)
		}
	}
	for _, n := range []*Namespace{a, b} {
		if _, err := os.Stat(n.Path()); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists: %v", n.Path(), err)
		}
	}
	out, err := exec.Command("ip", "netns", "list").Output()
	must(t, err)
	if strings.Contains(string(out), l.Prefix()) {
		t.Errorf("ip netns list still shows the lab:\n%s", out)
	}
	if _, err := l.AddNamespace("c"); err == nil {
		t.Error("AddNamespace on a closed lab succeeded")
	}
	if _, err := a.Start("true"); err == nil {
		t.Error("Start on a closed lab succeeded")
	}
	// A deleted namespace must refuse work rather than fall back to the
	// root namespace (TestMain checks the root namespace is unchanged).
	for what, err := range map[string]error{
		"AddAddr":   a.AddAddr("lo", pfx("192.0.2.1/32")),
		"AddRoute":  a.AddRoute(pfx("192.0.2.0/24"), netip.MustParseAddr("10.0.0.2")),
		"SetRoute":  a.SetRoute(pfx("192.0.2.0/24")),
		"SetSysctl": a.SetSysctl("net.ipv4.ip_forward", "1"),
		"Do":        a.Do(func() error { return nil }),
		"Link":      l.Link(a, b, netip.Prefix{}, netip.Prefix{}),
		"AddBridge": a.AddBridge("br0", netip.Prefix{}),
		"WithNetlink": a.WithNetlink(func(*netlink.Handle) error {
			return nil
		}),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", what, err)
		}
	}
}

// pidsIn lists the processes inside n, as "ip netns pids" does.
func pidsIn(t *testing.T, n *Namespace) []int {
	out, err := exec.Command("ip", "netns", "pids", n.Name()).Output()
	must(t, err)
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		pid, _ := strconv.Atoi(f)
		pids = append(pids, pid)
	}
	return pids
}

func TestTwoLabsDoNotCollide(t *testing.T) {
	labs := []*Lab{NewLab(t), NewLab(t)}
	if labs[0].Prefix() == labs[1].Prefix() {
		t.Fatalf("both labs have prefix %s", labs[0].Prefix())
	}
	var clients []*Namespace
	for i, l := range labs {
		// Same short names, same addresses.
		a, b := mustNS(t, l, "a"), mustNS(t, l, "b")
		must(t, l.Link(a, b, pfx("10.0.0.1/24"), pfx("10.0.0.2/24")))
		startEcho(t, a, fmt.Sprintf("lab%d", i))
		clients = append(clients, b)
	}
	for i, b := range clients {
		body, err := b.Curl(ctx(t), "http://10.0.0.1:8080/", 5*time.Second)
		must(t, err)
		wantLine(t, body, fmt.Sprintf("hostname=lab%d", i))
	}
	must(t, labs[0].Close())
	body, err := clients[1].Curl(ctx(t), "http://10.0.0.1:8080/", 5*time.Second)
	must(t, err)
	wantLine(t, body, "hostname=lab1")
}

func TestShortNames(t *testing.T) {
	l := NewLab(t)
	for _, bad := range []string{"", "UPPER", "has space", "-lead", "sixteen-chars-xx", "a/b"} {
		if _, err := l.AddNamespace(bad); err == nil {
			t.Errorf("AddNamespace(%q) succeeded", bad)
		}
	}
	mustNS(t, l, "fifteen-chars-x")
	if _, err := l.AddNamespace("fifteen-chars-x"); err == nil {
		t.Error("duplicate short name accepted")
	}
}

func TestProcessStopAndOutput(t *testing.T) {
	l := NewLab(t)
	n := mustNS(t, l, "p")
	p, err := n.Start("sh", "-c", "echo out; echo err >&2; trap 'echo bye; exit 3' TERM; while :; do sleep 0.05; done")
	must(t, err)
	must(t, p.WaitForOutput(ctx(t), "err"))
	must(t, p.Stop())
	<-p.Done()
	// sh may also report its sleep child as "Terminated".
	if out := p.Output(); !strings.HasPrefix(out, "out\nerr\n") || !strings.HasSuffix(out, "bye\n") {
		t.Errorf("output %q", out)
	}
	var exit *exec.ExitError
	if !errors.As(p.Err(), &exit) || exit.ExitCode() != 3 {
		t.Errorf("Err() = %v, want exit status 3", p.Err())
	}
	q, err := n.Start("sh", "-c", "exit 0")
	must(t, err)
	if err := q.WaitForOutput(ctx(t), "never"); err == nil {
		t.Error("WaitForOutput succeeded for a process that exited silently")
	}
	if _, _, err := n.Run(ctx(t), "sh", "-c", "echo oops >&2; exit 1"); err == nil || !strings.Contains(err.Error(), "oops") {
		t.Errorf("Run error %v should quote stderr", err)
	}
	short, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, _, err := n.Run(short, "sleep", "30"); err == nil || time.Since(start) > 5*time.Second {
		t.Errorf("Run did not honour its context: %v after %v", err, time.Since(start))
	}
}

// helperEnv makes the test binary run TestHelperLab as a child process that
// creates a lab and waits to be killed.
const helperEnv = "MINIPROXY_NETNS_HELPER"

func TestHelperLab(t *testing.T) {
	if os.Getenv(helperEnv) == "" {
		t.Skip("helper for TestSignal and TestWatchdog")
	}
	l, err := New()
	must(t, err)
	n, err := l.AddNamespace("victim")
	must(t, err)
	p, err := n.Start("sleep", "1000")
	must(t, err)
	fmt.Printf("READY %s %d %d\n", n.Name(), p.Pid(), watchdog.pid)
	time.Sleep(60 * time.Second)
	t.Fatal("not killed")
}

// startHelper runs TestHelperLab in a child process and returns it with the
// namespace it created and the pid of the process it started there.
func startHelper(t *testing.T, extraArgs ...string) (*exec.Cmd, string, int) {
	cmd, name, pid, _ := startHelperWithWatchdog(t, extraArgs...)
	return cmd, name, pid
}

// startHelperWithWatchdog is startHelper that also returns the pid of the
// helper's watchdog.
func startHelperWithWatchdog(t *testing.T, extraArgs ...string) (*exec.Cmd, string, int, int) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^TestHelperLab$", "-test.v"}, extraArgs...)...)
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	stdout, err := cmd.StdoutPipe()
	must(t, err)
	must(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill() })
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		var name string
		var pid, watchdogPid int
		if _, err := fmt.Sscanf(sc.Text(), "READY %s %d %d", &name, &pid, &watchdogPid); err == nil {
			go func() {
				for sc.Scan() {
				}
			}()
			return cmd, name, pid, watchdogPid
		}
	}
	t.Fatalf("helper ended without READY: %v", sc.Err())
	return nil, "", 0, 0
}

// waitGone waits until namespace name and process pid are both gone.
func waitGone(t *testing.T, name string, pid int) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		_, err := os.Stat("/run/netns/" + name)
		if errors.Is(err, os.ErrNotExist) && isZombie(pid) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("namespace %s or process %d survived", name, pid)
	exec.Command("ip", "netns", "del", name).Run()
	syscall.Kill(pid, syscall.SIGKILL)
}

func TestSignalTearsDown(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			cmd, name, pid := startHelper(t)
			must(t, cmd.Process.Signal(sig))
			err := cmd.Wait()
			var exit *exec.ExitError
			if want := 128 + int(sig); !errors.As(err, &exit) || exit.ExitCode() != want {
				t.Errorf("helper ended with %v, want exit status %d", err, want)
			}
			waitGone(t, name, pid)
		})
	}
}

func TestWatchdogCleansUpAfterSIGKILL(t *testing.T) {
	cmd, name, pid := startHelper(t)
	must(t, cmd.Process.Kill())
	cmd.Wait()
	waitGone(t, name, pid)
	claimPath := filepath.Join(claimDir, strings.TrimSuffix(name, "victim")+claimSuffix)
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, err := os.Stat(claimPath)
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the watchdog left the lab's claim %s: %v", claimPath, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestWatchdogCleansUpAfterTestTimeout covers "go test -timeout": the
// testing package panics without running cleanups, so only the watchdog can
// tear the lab down.
func TestWatchdogCleansUpAfterTestTimeout(t *testing.T) {
	cmd, name, pid := startHelper(t, "-test.timeout=1s")
	err := cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		t.Errorf("helper ended with %v, want the timeout panic", err)
	}
	waitGone(t, name, pid)
}

// TestNextLabReapsWhatAKilledRunLeft covers a run killed together with its
// watchdog (a CI job or session stopped with SIGKILL to every process): its
// namespace and the process inside stay, until the next lab is created.
func TestNextLabReapsWhatAKilledRunLeft(t *testing.T) {
	// A live lab of another process (this one) is never reaped.
	live := NewLab(t)
	liveNS := mustNS(t, live, "alive")

	cmd, name, pid, watchdogPid := startHelperWithWatchdog(t)
	if watchdogPid <= 0 {
		t.Fatalf("helper reported no watchdog pid")
	}
	must(t, syscall.Kill(watchdogPid, syscall.SIGKILL))
	must(t, cmd.Process.Kill())
	cmd.Wait()
	time.Sleep(500 * time.Millisecond) // the watchdog must have had its chance
	if _, err := os.Stat("/run/netns/" + name); err != nil {
		t.Fatalf("with its watchdog killed too, the helper's namespace should have stayed: %v", err)
	}

	next := NewLab(t)
	waitGone(t, name, pid)
	if _, err := os.Stat(liveNS.Path()); err != nil {
		t.Errorf("a live lab's namespace was reaped: %v", err)
	}
	if _, err := os.Stat(filepath.Join(claimDir, next.Prefix()+claimSuffix)); err != nil {
		t.Errorf("the new lab holds no claim: %v", err)
	}
	must(t, live.Close())
	if _, err := os.Stat(filepath.Join(claimDir, live.Prefix()+claimSuffix)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a closed lab's claim is still there: %v", err)
	}
}
