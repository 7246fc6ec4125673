package config

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestConntrackSysctls(t *testing.T) {
	const dir = "proc/sys/net/netfilter/"
	tests := []struct {
		name   string
		ct     Conntrack
		numCPU int
		want   []Sysctl
	}{
		{
			name:   "kube-proxy's defaults on 8 CPUs: 32768 x 8, a hash a quarter of it, the two TCP timeouts",
			ct:     Default().Conntrack,
			numCPU: 8,
			want: []Sysctl{
				{Path: dir + "nf_conntrack_max", Value: 262144, RaiseOnly: true},
				{Path: "sys/module/nf_conntrack/parameters/hashsize", Value: 65536, RaiseOnly: true},
				{Path: dir + "nf_conntrack_tcp_timeout_established", Value: 86400},
				{Path: dir + "nf_conntrack_tcp_timeout_close_wait", Value: 3600},
			},
		},
		{
			name:   "on 2 CPUs the minimum wins",
			ct:     Conntrack{MaxPerCore: 32768, Min: 131072},
			numCPU: 2,
			want: []Sysctl{
				{Path: dir + "nf_conntrack_max", Value: 131072, RaiseOnly: true},
				{Path: "sys/module/nf_conntrack/parameters/hashsize", Value: 32768, RaiseOnly: true},
			},
		},
		{
			name:   "capped at 1M entries on a large machine",
			ct:     Conntrack{MaxPerCore: 32768, Min: 131072},
			numCPU: 256,
			want: []Sysctl{
				{Path: dir + "nf_conntrack_max", Value: 1 << 20, RaiseOnly: true},
				{Path: "sys/module/nf_conntrack/parameters/hashsize", Value: 1 << 18, RaiseOnly: true},
			},
		},
		{
			name:   "zero everywhere leaves the kernel alone",
			ct:     Conntrack{Min: 131072},
			numCPU: 8,
			want:   nil,
		},
		{
			name:   "UDP timeouts and be-liberal, in whole seconds",
			ct:     Conntrack{TCPBeLiberal: true, UDPTimeout: 30 * time.Second, UDPStreamTimeout: 2*time.Minute + 500*time.Millisecond},
			numCPU: 1,
			want: []Sysctl{
				{Path: dir + "nf_conntrack_tcp_be_liberal", Value: 1},
				{Path: dir + "nf_conntrack_udp_timeout", Value: 30},
				{Path: dir + "nf_conntrack_udp_timeout_stream", Value: 120},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, tc.ct.Sysctls(tc.numCPU)); diff != "" {
				t.Errorf("Sysctls (-want +got):\n%s", diff)
			}
		})
	}
}

// TestApplySysctls writes into a scratch directory laid out like / (never
// the machine's own /proc or /sys).
func TestApplySysctls(t *testing.T) {
	root := t.TempDir()
	files := map[string]int{
		"proc/sys/net/netfilter/nf_conntrack_max":                     65536,
		"sys/module/nf_conntrack/parameters/hashsize":                 131072, // larger than wanted: kept
		"proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established": 432000,
		"proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait":  3600, // already right
	}
	for p, v := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(strconv.Itoa(v)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	changed, err := ApplySysctls(root, Default().Conntrack.Sysctls(8))
	if err != nil {
		t.Fatalf("ApplySysctls: %v", err)
	}
	wantChanged := []string{
		"proc/sys/net/netfilter/nf_conntrack_max: 65536 -> 262144",
		"proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established: 432000 -> 86400",
	}
	if diff := cmp.Diff(wantChanged, changed); diff != "" {
		t.Errorf("changed (-want +got):\n%s", diff)
	}
	for p, want := range map[string]string{
		"proc/sys/net/netfilter/nf_conntrack_max":                     "262144",
		"sys/module/nf_conntrack/parameters/hashsize":                 "131072",
		"proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established": "86400",
		"proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait":  "3600",
	} {
		got, _ := os.ReadFile(filepath.Join(root, p))
		if strings.TrimSpace(string(got)) != want {
			t.Errorf("%s = %q, want %s", p, got, want)
		}
	}

	// A second run has nothing to do.
	changed, err = ApplySysctls(root, Default().Conntrack.Sysctls(8))
	if err != nil || len(changed) != 0 {
		t.Errorf("second ApplySysctls: changed %v, %v; want nothing", changed, err)
	}

	// A parameter the kernel does not have (nf_conntrack not loaded) is an
	// error naming the file.
	_, err = ApplySysctls(root, []Sysctl{{Path: "proc/sys/net/netfilter/nf_conntrack_udp_timeout", Value: 30}})
	if err == nil || !strings.Contains(err.Error(), "nf_conntrack_udp_timeout") {
		t.Errorf("ApplySysctls of a missing file: %v, want an error naming it", err)
	}
}
