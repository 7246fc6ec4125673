package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/miniproxy/miniproxy/test/netns"
)

// dialOnce opens and closes one TCP connection from inside ns.
func dialOnce(ctx context.Context, ns *netns.Namespace, dst netip.AddrPort, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		return err
	}
	return c.Close()
}

// hostnameVia sends one HTTP request to dst from inside ns, on a new
// connection, and returns the hostname= the echo server reported.
func hostnameVia(ctx context.Context, ns *netns.Namespace, dst netip.AddrPort, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		return "", err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\nHost: bench\r\n\r\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	if err != nil && len(b) == 0 {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if h, ok := strings.CutPrefix(strings.TrimSpace(l), "hostname="); ok {
			return h, nil
		}
	}
	return "", errors.New("no hostname= in the answer")
}

// pollFd is struct pollfd.
type pollFd struct {
	fd      int32
	events  int16
	revents int16
}

const pollOut = 0x4

// connectLatencies opens count TCP connections to each target from inside
// its namespace, the targets taking turns connection by connection, and
// returns how long each connect took: from sending the SYN to receiving the
// SYN-ACK, which is where the node's nat rules are walked (the first packet
// of a connection; later packets follow conntrack). Sockets are created
// inside the namespaces beforehand and only the connect itself is timed
// (non-blocking connect, then polling for writability), so the figure holds
// no thread or namespace switching. Each connection is closed with a
// reset, leaving no TIME_WAIT behind. warmup connections per target come
// first and are not counted. Connections follow each other without a
// pause, so the CPU is not woken from idle for each (which on these virtual
// machines adds more noise than a 30,000-rule walk costs).
func connectLatencies(targets []connTarget, warmup, count int) ([][]time.Duration, []int, error) {
	total := warmup + count
	fds := make([][]int, len(targets))
	defer func() {
		for _, l := range fds {
			for _, fd := range l {
				if fd >= 0 {
					syscall.Close(fd)
				}
			}
		}
	}()
	for k, t := range targets {
		err := t.ns.Do(func() error {
			for range total {
				fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
				if err != nil {
					return err
				}
				fds[k] = append(fds[k], fd)
			}
			return nil
		})
		if err != nil {
			return nil, nil, fmt.Errorf("create sockets in %s: %w", t.ns.Name(), err)
		}
	}
	out := make([][]time.Duration, len(targets))
	failed := make([]int, len(targets))
	// One thread, pinned to one CPU, makes all connections: the packets'
	// softirq work runs on that CPU in the connect call itself, and no
	// wake-up of a sleeping thread is timed. The thread is dropped
	// afterwards (never unlocked).
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		pinToCPU(0)
		for i := range total {
			for k, t := range targets {
				fd := fds[k][i]
				d, err := connectOnce(fd, t.dst, 2*time.Second)
				syscall.SetsockoptLinger(fd, syscall.SOL_SOCKET, syscall.SO_LINGER, &syscall.Linger{Onoff: 1, Linger: 0})
				syscall.Close(fd)
				fds[k][i] = -1
				if i < warmup {
					continue
				}
				if err != nil {
					failed[k]++
				} else {
					out[k] = append(out[k], d)
				}
			}
		}
	}()
	<-done
	for k, t := range targets {
		if len(out[k]) == 0 {
			return nil, nil, fmt.Errorf("no connection to %s succeeded", t.dst)
		}
	}
	return out, failed, nil
}

// connTarget is a destination seen from a namespace.
type connTarget struct {
	ns  *netns.Namespace
	dst netip.AddrPort
}

// pinToCPU restricts the calling thread to one CPU.
func pinToCPU(cpu int) {
	var mask [16]uint64
	mask[cpu/64] = 1 << (cpu % 64)
	syscall.RawSyscall(syscall.SYS_SCHED_SETAFFINITY, 0, uintptr(len(mask)*8), uintptr(unsafe.Pointer(&mask[0])))
}

func connectOnce(fd int, dst netip.AddrPort, timeout time.Duration) (time.Duration, error) {
	sa := &syscall.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
	start := time.Now()
	err := syscall.Connect(fd, sa)
	if err != nil && !errors.Is(err, syscall.EINPROGRESS) {
		return 0, err
	}
	if err != nil {
		// Spin on a zero-timeout poll, yielding the CPU between polls so
		// that softirq work deferred to ksoftirqd on this CPU can run.
		deadline := start.Add(timeout)
		zero := syscall.Timespec{}
		for {
			pfd := pollFd{fd: int32(fd), events: pollOut}
			n, _, e := syscall.Syscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&pfd)), 1, uintptr(unsafe.Pointer(&zero)), 0, 0, 0)
			if e != 0 && e != syscall.EINTR {
				return 0, e
			}
			if n == 1 {
				break
			}
			if time.Now().After(deadline) {
				return 0, syscall.ETIMEDOUT
			}
			syscall.Syscall(syscall.SYS_SCHED_YIELD, 0, 0, 0)
		}
	}
	d := time.Since(start)
	soErr, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_ERROR)
	if err != nil {
		return 0, err
	}
	if soErr != 0 {
		return 0, syscall.Errno(soErr)
	}
	return d, nil
}

// Latency summarises a set of durations, in microseconds.
type Latency struct {
	Target string `json:"target,omitempty"`
	Depth  int    `json:"depth,omitempty"` // nat rules a first packet walks to its DNAT
	// Map says the Service is found by a verdict map lookup (upstream's
	// nftables mode), so Depth does not apply.
	Map     bool    `json:"verdict_map,omitempty"`
	N       int     `json:"n"`
	Failed  int     `json:"failed,omitempty"`
	P10     float64 `json:"p10_us"`
	Median  float64 `json:"median_us"`
	P90     float64 `json:"p90_us"`
	Outside float64 `json:"outside_load"` // highest share of the CPUs used outside the lab while measuring
	Comment string  `json:"comment,omitempty"`
}

func summarize(ds []time.Duration, failed int) Latency {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	q := func(p float64) float64 {
		if len(s) == 0 {
			return 0
		}
		return float64(s[int(p*float64(len(s)-1)+0.5)].Nanoseconds()) / 1e3
	}
	return Latency{N: len(s), Failed: failed, P10: q(0.1), Median: q(0.5), P90: q(0.9)}
}

// cpuAndMem reads a process's CPU time (user+system of itself, and of its
// children it has waited for: iptables-restore and the shim) and memory.
type procSample struct {
	self, children time.Duration
	// running is the CPU time of descendants still running (an
	// iptables-restore in progress), which only reaches children once the
	// process has waited for them.
	running      time.Duration
	rssKB, hwmKB int64
}

func (p procSample) cpu() time.Duration { return p.self + p.children + p.running }

var clockTick = func() int64 {
	// sysconf(_SC_CLK_TCK) is 100 on every Linux port Go supports.
	return 100
}()

func sampleProc(pid int) (procSample, error) {
	s, err := statCPU(pid)
	if err != nil {
		return s, err
	}
	s.running = runningDescendants(pid, 0)
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for _, l := range strings.Split(string(st), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			s.rssKB = kb
		case "VmHWM":
			s.hwmKB = kb
		}
	}
	return s, nil
}

// runningDescendants sums the CPU time (own and waited-for children) of
// the live descendants of pid.
func runningDescendants(pid, depth int) time.Duration {
	if depth > 8 {
		return 0
	}
	var sum time.Duration
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, t.Name()))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			child, err := strconv.Atoi(f)
			if err != nil {
				continue
			}
			if c, err := statCPU(child); err == nil {
				sum += c.self + c.children + runningDescendants(child, depth+1)
			}
		}
	}
	return sum
}

// statCPU reads utime+stime and cutime+cstime of pid.
func statCPU(pid int) (procSample, error) {
	var s procSample
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	str := string(b)
	i := strings.LastIndexByte(str, ')')
	if i < 0 {
		return s, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(str[i+1:])
	// f[0] is field 3 (state); utime..cstime are fields 14..17.
	if len(f) < 15 {
		return s, fmt.Errorf("parse /proc/%d/stat: short", pid)
	}
	tick := func(k int) time.Duration {
		v, _ := strconv.ParseInt(f[k-3], 10, 64)
		return time.Duration(v) * time.Second / time.Duration(clockTick)
	}
	s.self = tick(14) + tick(15)
	s.children = tick(16) + tick(17)
	return s, nil
}

// restoreRecord is a line of the restore shim's log (test/bench/restoreshim).
type restoreRecord struct {
	Command  string   `json:"command"`
	Args     []string `json:"args"`
	Start    int64    `json:"start"`
	Exec     int64    `json:"exec"`
	End      int64    `json:"end"`
	Exit     int      `json:"exit"`
	Bytes    int      `json:"bytes"`
	Lines    int      `json:"lines"`
	Rules    int      `json:"rules"`
	Chains   int      `json:"chains"`
	Deletes  int      `json:"deletes"`
	DNAT     int      `json:"dnat"`
	Elements int      `json:"elements"`
	Tables   []string `json:"tables"`
}

func (r restoreRecord) start() time.Time { return time.Unix(0, r.Start) }
func (r restoreRecord) end() time.Time   { return time.Unix(0, r.End) }

// isSync says whether the restore carried rules: not a --version probe, a
// listing, or an `nft --check` dry run.
func (r restoreRecord) isSync() bool {
	return len(r.Tables) > 0 && !slices.Contains(r.Args, "--check") && !slices.Contains(r.Args, "-c")
}

func readRestores(path string) []restoreRecord {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []restoreRecord
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r restoreRecord
		if json.Unmarshal(sc.Bytes(), &r) == nil {
			out = append(out, r)
		}
	}
	return out
}

// RestoreSize sums restore inputs.
type RestoreSize struct {
	Count  int `json:"count"`
	Bytes  int `json:"bytes"`
	Lines  int `json:"lines"`
	Rules  int `json:"rules"`
	Chains int `json:"chains"`
	DNAT   int `json:"dnat"`
	// Elements are nft map and set elements (upstream's nftables mode).
	Elements int     `json:"elements,omitempty"`
	Seconds  float64 `json:"seconds"` // time the real iptables-restore or nft ran
	IPv6     int     `json:"ipv6_bytes,omitempty"`
}

func sumRestores(rs []restoreRecord, keep func(restoreRecord) bool) RestoreSize {
	var s RestoreSize
	for _, r := range rs {
		if !r.isSync() || !keep(r) {
			continue
		}
		s.Count++
		s.Bytes += r.Bytes
		s.Lines += r.Lines
		s.Rules += r.Rules
		s.Chains += r.Chains
		s.DNAT += r.DNAT
		s.Elements += r.Elements
		s.Seconds += float64(r.End-r.Exec) / 1e9
		if strings.HasPrefix(r.Command, "ip6") {
			s.IPv6 += r.Bytes
		}
	}
	return s
}

// scrapeMetrics fetches a proxy's /metrics from inside its node namespace
// and returns each sample ("name{labels}") with its value.
func scrapeMetrics(ctx context.Context, ns *netns.Namespace) (map[string]float64, error) {
	status, body, err := ns.HTTPGet(ctx, "http://127.0.0.1:10249/metrics", 5*time.Second)
	if err != nil {
		return nil, err
	}
	if status != 200 {
		return nil, fmt.Errorf("/metrics: status %d", status)
	}
	m := map[string]float64{}
	for _, l := range strings.Split(body, "\n") {
		if l == "" || l[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if err != nil {
			continue
		}
		m[l[:i]] = v
	}
	return m, nil
}

// metric returns the sum of the samples of name whose labels contain every
// given label (e.g. `ip_family="IPv4"`); ok is false when there is none.
func metric(m map[string]float64, name string, labels ...string) (float64, bool) {
	var sum float64
	found := false
	for k, v := range m {
		base, lbl, _ := strings.Cut(k, "{")
		if base != name {
			continue
		}
		match := true
		for _, want := range labels {
			if !strings.Contains(lbl, want) {
				match = false
			}
		}
		if match {
			sum += v
			found = true
		}
	}
	return sum, found
}
