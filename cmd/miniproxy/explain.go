package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/miniproxy/miniproxy/pkg/explain"
)

// explainCommand is the first argument that makes miniproxy answer one
// question about a packet instead of running (`miniproxy explain ...`).
const explainCommand = "explain"

// defaultDaemon is the running daemon's metrics address, where it serves
// /debug/services.
const defaultDaemon = "http://127.0.0.1:10249"

// explainOptions are the explain command's own flags; it also takes the
// daemon's flags, which shape the rules when the state comes from the API
// server.
type explainOptions struct {
	src, dst string
	fromNode bool
	iface    string
	output   string
	daemon   string
	netns    string
}

// rulesFlags are the daemon's flags that matter to explain with the API
// server: how to reach it, which node this is, and what shapes the rules.
// explain takes every daemon flag (registered by the same code, so that a
// node's command line can be reused as is) but lists only these.
var rulesFlags = map[string]bool{
	"kubeconfig": true, "master": true, "kube-api-content-type": true, "hostname-override": true, "config": true,
	"cluster-cidr": true, "detect-local-mode": true, "pod-bridge-interface": true, "pod-interface-name-prefix": true,
	"masquerade-all": true, "iptables-masquerade-bit": true, "iptables-localhost-nodeports": true,
	"nodeport-addresses": true, "bind-address": true, "feature-gates": true,
}

// explainFlagSet is the explain command's command line: its own flags and
// every flag of the daemon.
func explainFlagSet(opts *options, eo *explainOptions) *pflag.FlagSet {
	fs := pflag.NewFlagSet("miniproxy explain", pflag.ContinueOnError)
	fs.SortFlags = true
	fs.SetOutput(io.Discard)
	opts.register(fs)
	fs.VisitAll(func(f *pflag.Flag) {
		if !rulesFlags[f.Name] {
			f.Hidden = true
		}
	})
	fs.StringVar(&eo.src, "src", "", "explain: the packet's source address")
	fs.StringVar(&eo.dst, "dst", "", "explain: its destination, ADDR:PORT[/tcp|udp|sctp] ([ADDR]:PORT for IPv6; tcp by default)")
	fs.BoolVar(&eo.fromNode, "from-node", false, "explain: the node itself sends it (otherwise it arrives from a network or a pod)")
	fs.StringVar(&eo.iface, "iface", "", "explain: the interface it arrives on, for --detect-local-mode BridgeInterface or InterfaceNamePrefix")
	fs.StringVarP(&eo.output, "output", "o", "text", "explain: text or json")
	fs.StringVar(&eo.daemon, "daemon", defaultDaemon, "explain: the running miniproxy's metrics address, to read its view from (/debug/services); not used with --kubeconfig, --master or --config")
	fs.StringVar(&eo.netns, "netns", "", "explain: enter this network namespace first: a name (/run/netns/NAME) or a path (/proc/PID/ns/net)")
	return fs
}

// daemonView reads the running daemon's view from its /debug/services.
func daemonView(base string) (explain.View, error) {
	url := strings.TrimSuffix(base, "/") + "/debug/services"
	c, err := clientHere(base)
	if err != nil {
		return explain.View{}, fmt.Errorf("explain: ask the running miniproxy (--daemon %s; or give --kubeconfig to ask the API server): %w", base, err)
	}
	res, err := c.Get(url)
	if err != nil {
		return explain.View{}, fmt.Errorf("explain: ask the running miniproxy (--daemon %s; or give --kubeconfig to ask the API server): %w", base, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		return explain.View{}, fmt.Errorf("explain: read %s: %w", url, err)
	}
	if res.StatusCode != http.StatusOK {
		return explain.View{}, fmt.Errorf("explain: %s answered %s: %s", url, res.Status, strings.TrimSpace(string(body)))
	}
	var s explain.Services
	if err := json.Unmarshal(body, &s); err != nil {
		return explain.View{}, fmt.Errorf("explain: read %s: %w", url, err)
	}
	return s.View(), nil
}

// clientHere gives an HTTP client for one request to base whose
// connection is made now, from the calling thread, so that it is made in
// this thread's network namespace (--netns): an http.Transport dials from
// goroutines of its own, which run in the process's namespace.
func clientHere(base string) (*http.Client, error) {
	u, err := neturl.Parse(base)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("%q is not a URL", base)
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), "80")
	}
	conn, err := net.DialTimeout("tcp", host, 10*time.Second)
	if err != nil {
		return nil, err
	}
	used := false
	dial := func(context.Context, string, string) (net.Conn, error) {
		if used {
			return nil, errors.New("one request per connection")
		}
		used = true
		return conn, nil
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}}, nil
}
