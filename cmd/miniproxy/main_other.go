//go:build !linux

package main

import (
	"fmt"
	"os"
)

// main, off Linux, only says why there is nothing to run: miniproxy
// programs iptables, conntrack and network namespaces through Linux's own
// interfaces (the files named _linux.go), as kube-proxy does. The rest of
// the package builds anywhere, so that it can be vetted and read there.
func main() {
	fmt.Fprintln(os.Stderr, "miniproxy runs on Linux only: it programs iptables and conntrack through Linux's netlink and network namespaces")
	os.Exit(1)
}
