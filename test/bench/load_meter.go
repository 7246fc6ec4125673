package main

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// netnsDir is where named network namespaces are mounted (as in
// test/netns).
const netnsDir = "/run/netns"

// The test machines are shared: other work (builds, tests) may run while
// the benchmark measures. A loadMeter tells how much of the machine's CPU
// went to such work during a measurement, so the report can flag figures
// taken under outside load; waitQuiet holds measurements back until the
// machine is calm.

// machineCPU returns busy and total ticks of all CPUs from /proc/stat.
func machineCPU() (busy, total int64) { return machineCPUx(false) }

// machineCPUx is machineCPU, leaving interrupt and softirq time out of busy
// when noIRQ is set.
func machineCPUx(noIRQ bool) (busy, total int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return 0, 0
	}
	for i, s := range f[1:] {
		v, _ := strconv.ParseInt(s, 10, 64)
		if i >= 8 { // guest time is already in user
			break
		}
		total += v
		if i != 3 && i != 4 && !(noIRQ && (i == 5 || i == 6)) { // idle, iowait; irq, softirq
			busy += v
		}
	}
	return busy, total
}

// loadMeter measures the CPU time the lab did not use: busy time of the
// whole machine from /proc/stat (interrupts and softirqs left out: they are
// mostly the lab's own packets) minus the CPU of this lab's processes (those
// in its network namespaces, with the children they reaped: iptables-restore
// and the shim) and of the benchmark, and minus kernel threads. What is
// left is other processes on the machine, and time the hypervisor gave to
// other machines (steal).
type loadMeter struct {
	start         time.Time
	prefix        string
	busy0, total0 int64
	ours0         int64
}

func (b *bench) newLoadMeter() *loadMeter {
	m := &loadMeter{start: time.Now(), prefix: b.bl.lab.Prefix()}
	m.busy0, m.total0 = machineCPUx(true)
	m.ours0 = oursTicks(m.prefix)
	return m
}

// outside returns the share of all CPUs (0 to 1) used outside the lab since
// the meter started. Ticks are 10 ms, so windows under a second are coarse.
func (m *loadMeter) outside() float64 {
	busy, total := machineCPUx(true)
	ours := oursTicks(m.prefix)
	if total <= m.total0 {
		return 0
	}
	return math.Max(float64((busy-m.busy0)-(ours-m.ours0)), 0) / float64(total-m.total0)
}

// oursTicks sums the CPU ticks of the lab's processes (own and reaped
// children), of the benchmark (likewise) and of kernel threads (own).
func oursTicks(prefix string) int64 {
	labNS := map[[2]uint64]bool{}
	if entries, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range entries {
			if !strings.HasPrefix(e.Name(), prefix) {
				continue
			}
			var st syscall.Stat_t
			if syscall.Stat(filepath.Join(netnsDir, e.Name()), &st) == nil {
				labNS[[2]uint64{st.Dev, st.Ino}] = true
			}
		}
	}
	me := os.Getpid()
	var sum int64
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		str := string(b)
		i := strings.LastIndexByte(str, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(str[i+1:])
		if len(f) < 15 {
			continue
		}
		field := func(k int) int64 {
			v, _ := strconv.ParseInt(f[k-3], 10, 64)
			return v
		}
		if flags, _ := strconv.ParseUint(f[6], 10, 64); flags&0x00200000 != 0 { // PF_KTHREAD
			sum += field(14) + field(15)
			continue
		}
		var st syscall.Stat_t
		inLab := syscall.Stat(filepath.Join("/proc", e.Name(), "ns", "net"), &st) == nil && labNS[[2]uint64{st.Dev, st.Ino}]
		if pid == me || inLab {
			sum += field(14) + field(15) + field(16) + field(17)
		}
	}
	return sum
}

// waitQuiet waits until, over one second, the whole machine was at most
// 20% busy (the lab's idle control plane uses a few percent), for at most
// maxWait, and returns the busy share of the last second.
func waitQuiet(ctx context.Context, maxWait time.Duration) float64 {
	deadline := time.Now().Add(maxWait)
	for {
		b0, t0 := machineCPU()
		select {
		case <-ctx.Done():
			return 1
		case <-time.After(time.Second):
		}
		b1, t1 := machineCPU()
		frac := 1.0
		if t1 > t0 {
			frac = float64(b1-b0) / float64(t1-t0)
		}
		if frac <= 0.2 || time.Now().After(deadline) {
			return frac
		}
	}
}
