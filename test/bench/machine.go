package main

import (
	"context"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
)

// machineInfo is what the report says about where it was measured.
type machineInfo struct {
	CPUs       int    `json:"cpus"`
	CPUModel   string `json:"cpu_model"`
	MemGiB     string `json:"mem_gib"`
	Kernel     string `json:"kernel"`
	OS         string `json:"os"`
	Iptables   string `json:"iptables"`
	NFT        string `json:"nft,omitempty"`
	Commit     string `json:"miniproxy_commit"`
	KubeProxy  string `json:"kube_proxy"`
	APIServer  string `json:"kube_apiserver"`
	Etcd       string `json:"etcd"`
	Go         string `json:"go"`
	KubeProxyP string `json:"kube_proxy_path"`
}

func collectMachine(ctx context.Context, bl *benchLab) machineInfo {
	m := machineInfo{CPUs: runtime.NumCPU(), Go: runtime.Version(), KubeProxyP: bl.bins.kubeProxy}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
				kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
				m.MemGiB = strconv.FormatFloat(kb/1024/1024, 'f', 1, 64)
			}
		}
	}
	var u syscall.Utsname
	if syscall.Uname(&u) == nil {
		var sb strings.Builder
		for _, c := range u.Release {
			if c == 0 {
				break
			}
			sb.WriteByte(byte(c))
		}
		m.Kernel = sb.String()
	}
	if b, err := os.ReadFile("/etc/os-release"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "PRETTY_NAME="); ok {
				m.OS = strings.Trim(v, `"`)
			}
		}
	}
	// iptables --version only prints; it is still run inside the lab.
	m.Iptables = runOutput(ctx, bl.router, "iptables", "--version")
	m.NFT = runOutput(ctx, bl.router, "nft", "--version")
	m.KubeProxy = firstLine(command(bl.bins.kubeProxy, "--version"))
	m.APIServer = firstLine(command(bl.bins.apiserver, "--version"))
	m.Etcd = firstLine(command("/usr/bin/etcd", "--version"))
	commit := strings.TrimSpace(command("git", "rev-parse", "--short=12", "HEAD"))
	if commit == "" {
		commit = "unknown (not a git checkout)"
	} else if strings.TrimSpace(command("git", "status", "--porcelain")) != "" {
		commit = "commit " + commit + " with uncommitted changes in the working tree"
	} else {
		commit = "commit " + commit
	}
	m.Commit = commit
	return m
}

func command(name string, args ...string) string {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		return ""
	}
	return string(out)
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return l
}
