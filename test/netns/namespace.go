package netns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
)

// Namespace is one named network namespace of a lab: a node, a pod, the
// router, a client. All its configuration goes through a netlink handle bound
// to it, so the calling thread never leaves the root namespace.
type Namespace struct {
	lab    *Lab
	short  string
	name   string
	handle vnetns.NsHandle
	nl     *netlink.Handle
	dev    uint64 // device and inode of the namespace, to find the
	ino    uint64 // processes inside it at teardown

	// mu guards closed and keeps handle and nl open while they are used.
	// This matters for safety: a closed netlink.Handle silently acts on the
	// calling thread's namespace, the root one, and a closed fd number may
	// be reused for another namespace.
	mu     sync.RWMutex
	closed bool
}

// AddNamespace creates the namespace "<prefix><short>" and brings its
// loopback up. short must be 1 to 15 characters of [a-z0-9-] starting with a
// letter or digit, because it is also the name of the interfaces that other
// namespaces use to reach this one.
func (l *Lab) AddNamespace(short string) (*Namespace, error) {
	if !shortRE.MatchString(short) {
		return nil, fmt.Errorf("create namespace %q: short name must match %s", short, shortRE)
	}
	name := l.prefix + short
	// The lab stays locked until the namespace is fully set up, so a
	// concurrent Close sees either nothing or a complete Namespace.
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, fmt.Errorf("create namespace %s: lab is closed", name)
	}
	for _, n := range l.namespaces {
		if n.short == short {
			return nil, fmt.Errorf("create namespace %s: already exists in this lab", name)
		}
	}
	// Tell the watchdog first, so that a crash right after creation is
	// still cleaned up.
	if err := watchdogNote("add", name); err != nil {
		return nil, fmt.Errorf("create namespace %s: %w", name, err)
	}
	handle, err := createNamed(name)
	if err != nil {
		if !errors.Is(err, os.ErrExist) { // never delete a namespace we did not create
			removeNamed(name)
		}
		watchdogNote("del", name)
		return nil, fmt.Errorf("create namespace %s: %w", name, err)
	}
	n := &Namespace{lab: l, short: short, name: name, handle: handle}
	// Registered before anything else can fail, so Close deletes it.
	l.namespaces = append(l.namespaces, n)

	var st syscall.Stat_t
	if err := syscall.Fstat(int(handle), &st); err != nil {
		return nil, fmt.Errorf("create namespace %s: stat: %w", name, err)
	}
	n.dev, n.ino = st.Dev, st.Ino
	n.nl, err = netlink.NewHandleAt(handle)
	if err != nil {
		n.nl = nil
		return nil, fmt.Errorf("create namespace %s: netlink handle: %w", name, err)
	}
	if err := n.setUp("lo"); err != nil {
		return nil, fmt.Errorf("create namespace %s: %w", name, err)
	}
	return n, nil
}

// ErrClosed is wrapped in the error of every operation on a namespace whose
// lab was closed: such a namespace refuses work instead of risking the root
// namespace.
var ErrClosed = errors.New("namespace deleted")

// withNL runs fn with the namespace's netlink handle, unless the namespace
// has been deleted, and keeps the handle open meanwhile.
func (n *Namespace) withNL(fn func(h *netlink.Handle) error) error {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.closed || n.nl == nil {
		return fmt.Errorf("%s: %w", n.name, ErrClosed)
	}
	return fn(n.nl)
}

// createNamed creates and bind-mounts a new named namespace. NewNamed moves
// the calling thread into the new namespace, so it runs on a locked thread
// that is never unlocked: the runtime destroys that thread when the goroutine
// ends instead of letting other goroutines run in the lab namespace.
func createNamed(name string) (vnetns.NsHandle, error) {
	type result struct {
		h   vnetns.NsHandle
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		h, err := vnetns.NewNamed(name)
		ch <- result{h, err}
	}()
	r := <-ch
	return r.h, r.err
}

// removeNamed deletes the bind mount of a named namespace. It tolerates a
// namespace that is already gone or was only half created, and retries while
// the mount point is busy (another mount namespace may briefly hold a copy).
func removeNamed(name string) error {
	err := vnetns.DeleteNamed(name)
	if err == nil || errors.Is(err, os.ErrNotExist) {
		return nil
	}
	path := nsPath(name)
	for range 20 {
		if _, statErr := os.Stat(path); errors.Is(statErr, os.ErrNotExist) {
			return nil
		}
		syscall.Unmount(path, syscall.MNT_DETACH)
		if err = os.Remove(path); err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("delete namespace %s: %w", name, err)
}

// Name returns the full namespace name, as shown by "ip netns list" and
// accepted by "ip netns exec" and "ip -n".
func (n *Namespace) Name() string { return n.name }

// Short returns the name given to AddNamespace, which is also the name of the
// interface that leads to this namespace from any namespace linked to it.
func (n *Namespace) Short() string { return n.short }

// Path returns the bind-mount path of the namespace, for tools and APIs that
// take a namespace file (setns, nsenter --net=).
func (n *Namespace) Path() string { return nsPath(n.name) }

// WithNetlink runs fn with the netlink handle bound to this namespace, for
// configuration this package does not wrap (dummy interfaces, neighbours,
// listing links). fn must not keep the handle: once the lab is closed the
// handle is closed, and a closed netlink.Handle silently acts on the root
// namespace. For the same reason never use the package-level netlink
// functions in tests. It fails once the namespace is deleted.
func (n *Namespace) WithNetlink(fn func(h *netlink.Handle) error) error {
	return n.withNL(fn)
}

// Do runs fn on an OS thread that is inside the namespace, and returns its
// error. Sockets fn opens belong to the namespace and may be used later from
// any goroutine; processes fn starts inherit the namespace. Goroutines that fn
// starts do not run in the namespace. The thread is discarded afterwards, so
// no goroutine ever runs in the namespace by accident. A panic in fn is
// re-raised in the caller, so test cleanups still run.
func (n *Namespace) Do(fn func() error) error {
	type result struct {
		err   error
		panic any
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see createNamed
		r := result{err: errors.New("fn called runtime.Goexit (t.FailNow?) inside Do")}
		defer func() {
			if p := recover(); p != nil {
				r = result{panic: p}
			}
			ch <- r
		}()
		if err := n.enter(); err != nil {
			r.err = err
			return
		}
		r.err = fn()
	}()
	r := <-ch
	if r.panic != nil {
		panic(r.panic)
	}
	return r.err
}

// enter moves the calling (locked) thread into the namespace.
func (n *Namespace) enter() error {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.closed {
		return fmt.Errorf("enter %s: %w", n.name, ErrClosed)
	}
	if err := vnetns.Set(n.handle); err != nil {
		return fmt.Errorf("enter namespace %s: %w", n.name, err)
	}
	return nil
}

// setUp brings the interface dev up.
func (n *Namespace) setUp(dev string) error {
	return n.withNL(func(h *netlink.Handle) error {
		link, err := h.LinkByName(dev)
		if err != nil {
			return fmt.Errorf("find %s in %s: %w", dev, n.name, err)
		}
		if err := h.LinkSetUp(link); err != nil {
			return fmt.Errorf("set %s up in %s: %w", dev, n.name, err)
		}
		return nil
	})
}

// Link joins a and b with a veth pair, brings both ends up and gives them
// addrA and addrB (a zero Prefix means no address). The end in a is named
// b.Short() and the end in b is named a.Short(). More addresses, for
// instance IPv6 ones for dual-stack, can be added with AddAddr.
func (l *Lab) Link(a, b *Namespace, addrA, addrB netip.Prefix) error {
	if a == b {
		return fmt.Errorf("link %s to itself: not supported", a.name)
	}
	if a.lab != l || b.lab != l {
		return fmt.Errorf("link %s and %s: both must belong to lab %s", a.name, b.name, l.prefix)
	}
	err := a.withNL(func(h *netlink.Handle) error {
		b.mu.RLock()
		defer b.mu.RUnlock()
		if b.closed {
			return fmt.Errorf("%s: %w", b.name, ErrClosed)
		}
		return h.LinkAdd(&netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: b.short},
			PeerName:      a.short,
			PeerNamespace: netlink.NsFd(int(b.handle)),
		})
	})
	if err != nil {
		return fmt.Errorf("link %s and %s: create veth: %w", a.name, b.name, err)
	}
	for _, end := range []struct {
		ns   *Namespace
		dev  string
		addr netip.Prefix
	}{{a, b.short, addrA}, {b, a.short, addrB}} {
		if err := end.ns.setUp(end.dev); err != nil {
			return fmt.Errorf("link %s and %s: %w", a.name, b.name, err)
		}
		if end.addr.IsValid() {
			if err := end.ns.AddAddr(end.dev, end.addr); err != nil {
				return fmt.Errorf("link %s and %s: %w", a.name, b.name, err)
			}
		}
	}
	return nil
}

// AddBridge creates a bridge named name in the namespace, brings it up and,
// unless addr is the zero Prefix, gives it addr. It models a LAN, such as the
// network the nodes and the router share; attach namespaces with LinkBridge.
func (n *Namespace) AddBridge(name string, addr netip.Prefix) error {
	err := n.withNL(func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}})
	})
	if err != nil {
		return fmt.Errorf("create bridge %s in %s: %w", name, n.name, err)
	}
	if err := n.setUp(name); err != nil {
		return fmt.Errorf("create bridge %s: %w", name, err)
	}
	if addr.IsValid() {
		if err := n.AddAddr(name, addr); err != nil {
			return fmt.Errorf("create bridge %s: %w", name, err)
		}
	}
	return nil
}

// LinkBridge attaches ns to the bridge named bridge in brNS with a veth pair:
// the end in ns is named brNS.Short() and gets addr (unless zero), the end in
// brNS is named ns.Short() and becomes a port of the bridge.
func (l *Lab) LinkBridge(ns, brNS *Namespace, bridge string, addr netip.Prefix) error {
	if err := l.Link(ns, brNS, addr, netip.Prefix{}); err != nil {
		return fmt.Errorf("attach %s to bridge %s: %w", ns.name, bridge, err)
	}
	return brNS.withNL(func(h *netlink.Handle) error {
		br, err := h.LinkByName(bridge)
		if err != nil {
			return fmt.Errorf("attach %s to bridge %s: find bridge in %s: %w", ns.name, bridge, brNS.name, err)
		}
		port, err := h.LinkByName(ns.short)
		if err != nil {
			return fmt.Errorf("attach %s to bridge %s: find port: %w", ns.name, bridge, err)
		}
		if err := h.LinkSetMaster(port, br); err != nil {
			return fmt.Errorf("attach %s to bridge %s: set master: %w", ns.name, bridge, err)
		}
		return nil
	})
}

// AddAddr adds address p (host address and prefix length, e.g.
// 10.240.0.2/24) to interface dev. IPv6 addresses are added with nodad, so
// they are usable at once instead of after duplicate address detection.
func (n *Namespace) AddAddr(dev string, p netip.Prefix) error {
	return n.withNL(func(h *netlink.Handle) error {
		link, err := h.LinkByName(dev)
		if err != nil {
			return fmt.Errorf("add address %s: find %s in %s: %w", p, dev, n.name, err)
		}
		addr := &netlink.Addr{IPNet: ipNet(p)}
		if p.Addr().Is6() {
			addr.Flags = syscall.IFA_F_NODAD
		}
		if err := h.AddrAdd(link, addr); err != nil {
			return fmt.Errorf("add address %s to %s in %s: %w", p, dev, n.name, err)
		}
		return nil
	})
}

// AddRoute adds a route to dst through the gateway via, which must be
// reachable on a connected network. dst may be a default route (0.0.0.0/0,
// ::/0).
func (n *Namespace) AddRoute(dst netip.Prefix, via netip.Addr) error {
	if dst.Addr().Is4() != via.Is4() {
		return fmt.Errorf("add route %s via %s in %s: address families differ", dst, via, n.name)
	}
	r := &netlink.Route{Dst: ipNet(dst.Masked()), Gw: net.IP(via.AsSlice())}
	if err := n.withNL(func(h *netlink.Handle) error { return h.RouteAdd(r) }); err != nil {
		return fmt.Errorf("add route %s via %s in %s: %w", dst, via, n.name, err)
	}
	return nil
}

// AddDeviceRoute adds a route to dst straight out of interface dev, without
// a gateway, as a node routes to the pods behind its point-to-point veths.
func (n *Namespace) AddDeviceRoute(dst netip.Prefix, dev string) error {
	err := n.withNL(func(h *netlink.Handle) error {
		link, err := h.LinkByName(dev)
		if err != nil {
			return err
		}
		return h.RouteAdd(&netlink.Route{Dst: ipNet(dst.Masked()), LinkIndex: link.Attrs().Index, Scope: netlink.SCOPE_LINK})
	})
	if err != nil {
		return fmt.Errorf("add route %s dev %s in %s: %w", dst, dev, n.name, err)
	}
	return nil
}

// SetRoute makes dst reachable through exactly the given gateways, replacing
// any route to dst: one gateway gives a plain route, several an equal-cost
// multipath route, none deletes the route. It lets a load balancer's VIP
// follow the nodes whose health checks pass.
func (n *Namespace) SetRoute(dst netip.Prefix, vias ...netip.Addr) error {
	dstNet := ipNet(dst.Masked())
	if len(vias) == 0 {
		err := n.withNL(func(h *netlink.Handle) error { return h.RouteDel(&netlink.Route{Dst: dstNet}) })
		if err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("delete route %s in %s: %w", dst, n.name, err)
		}
		return nil
	}
	r := &netlink.Route{Dst: dstNet}
	for _, via := range vias {
		if dst.Addr().Is4() != via.Is4() {
			return fmt.Errorf("set route %s via %v in %s: address families differ", dst, vias, n.name)
		}
	}
	if len(vias) == 1 {
		r.Gw = net.IP(vias[0].AsSlice())
	} else {
		for _, via := range vias {
			r.MultiPath = append(r.MultiPath, &netlink.NexthopInfo{Gw: net.IP(via.AsSlice())})
		}
	}
	if err := n.withNL(func(h *netlink.Handle) error { return h.RouteReplace(r) }); err != nil {
		return fmt.Errorf("set route %s via %v in %s: %w", dst, vias, n.name, err)
	}
	return nil
}

// SetSysctl writes value to the sysctl key ("net.ipv4.ip_forward" or
// "net/ipv4/ip_forward") of this namespace, from a thread inside it, since
// /proc/sys/net shows the namespace of the thread that opens it.
func (n *Namespace) SetSysctl(key, value string) error {
	path := sysctlPath(key)
	err := n.Do(func() error { return os.WriteFile(path, []byte(value), 0o644) })
	if err != nil {
		return fmt.Errorf("set sysctl %s=%s in %s: %w", key, value, n.name, err)
	}
	return nil
}

// Sysctl reads the sysctl key of this namespace, to check what SetSysctl or
// the program under test set.
func (n *Namespace) Sysctl(key string) (string, error) {
	path := sysctlPath(key)
	var out []byte
	err := n.Do(func() error {
		var err error
		out, err = os.ReadFile(path)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("read sysctl %s in %s: %w", key, n.name, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// EnableForwarding turns the namespace into a router for IPv4 and IPv6 and
// turns reverse-path filtering off, as nodes and the lab router need:
// net.ipv4.ip_forward=1, net.ipv4.conf.{all,default}.rp_filter=0,
// net.ipv6.conf.all.forwarding=1.
func (n *Namespace) EnableForwarding() error {
	for _, kv := range [][2]string{
		{"net.ipv4.ip_forward", "1"},
		{"net.ipv4.conf.all.rp_filter", "0"},
		{"net.ipv4.conf.default.rp_filter", "0"},
		{"net.ipv6.conf.all.forwarding", "1"},
	} {
		if err := n.SetSysctl(kv[0], kv[1]); err != nil {
			return err
		}
	}
	return nil
}

// sysctlPath maps a sysctl key to its file under /proc/sys.
func sysctlPath(key string) string {
	if !strings.Contains(key, "/") {
		key = strings.ReplaceAll(key, ".", "/")
	}
	return filepath.Join("/proc/sys", key)
}

// ipNet converts p to the net.IPNet that netlink wants, keeping host bits.
func ipNet(p netip.Prefix) *net.IPNet {
	a := p.Addr().Unmap()
	return &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(p.Bits(), a.BitLen())}
}

// destroy kills every process left in the namespace, releases the handles and
// deletes the namespace; its veths and routes disappear with it.
func (n *Namespace) destroy() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil
	}
	n.closed = true
	var errs []error
	if n.ino != 0 {
		if err := killProcessesIn(n.dev, n.ino); err != nil {
			errs = append(errs, fmt.Errorf("delete namespace %s: %w", n.name, err))
		}
	}
	if n.nl != nil {
		n.nl.Close()
	}
	n.handle.Close()
	if err := removeNamed(n.name); err != nil {
		errs = append(errs, err) // the watchdog retries at exit
	} else {
		watchdogNote("del", n.name)
	}
	return errors.Join(errs...)
}

// killProcessesIn sends SIGKILL to every process (other than this one) whose
// network namespace is the one identified by dev and ino, until none is left:
// a process started in a lab namespace must never outlive the lab.
func killProcessesIn(dev, ino uint64) error {
	self := os.Getpid()
	for round := 0; round < 20; round++ {
		entries, err := os.ReadDir("/proc")
		if err != nil {
			return fmt.Errorf("list processes: %w", err)
		}
		found := 0
		for _, e := range entries {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == self {
				continue
			}
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join("/proc", e.Name(), "ns", "net"), &st); err != nil {
				continue // gone, or a kernel thread
			}
			if st.Dev == dev && st.Ino == ino && !isZombie(pid) {
				found++
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if found == 0 {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.New("processes keep running in the namespace after SIGKILL")
}

// isZombie reports whether pid has exited and only waits to be reaped.
func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && (s[i+2] == 'Z' || s[i+2] == 'X')
}
