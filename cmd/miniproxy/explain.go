package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/spf13/pflag"
	vnetns "github.com/vishvananda/netns"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/explain"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
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

// runExplain is `miniproxy explain`: it reads the rules of the current (or
// --netns) network namespace with iptables-save and ip6tables-save, and the
// node's view from the running daemon or, with --kubeconfig (or --master,
// --config), from the API server with the daemon's flags; then prints the
// explanation of one packet on out.
func runExplain(args []string, out io.Writer) error {
	opts, eo := &options{}, &explainOptions{}
	fs := explainFlagSet(opts, eo)
	switch err := fs.Parse(args); {
	case errors.Is(err, pflag.ErrHelp):
		fmt.Fprintf(out, "miniproxy explain says what happens to a packet on this node, and why, from the kernel's rules (docs/explain.md).\n\nUsage:\n  miniproxy explain --src ADDR --dst ADDR:PORT[/PROTO] [--from-node] [-o json] [--daemon URL | --kubeconfig FILE ...] [--netns NAME|PATH]\n\nFlags:\n%s", fs.FlagUsagesWrapped(0))
		return nil
	case err != nil:
		return fmt.Errorf("%w: explain: %v", errUsage, err)
	case fs.NArg() > 0:
		return fmt.Errorf("%w: explain: unexpected argument %q", errUsage, fs.Arg(0))
	case eo.src == "" || eo.dst == "":
		return fmt.Errorf("%w: explain needs --src and --dst", errUsage)
	case eo.output != "text" && eo.output != "json":
		return fmt.Errorf("%w: explain: -o %q: want text or json", errUsage, eo.output)
	}
	addr, port, proto, err := explain.ParseDestination(eo.dst)
	if err != nil {
		return fmt.Errorf("%w: explain: %v", errUsage, err)
	}
	q, err := explain.ParseQuery(eo.src, addr, port, proto, eo.fromNode)
	if err != nil {
		return fmt.Errorf("%w: explain: %v", errUsage, err)
	}
	q.InIface = eo.iface
	if eo.netns != "" {
		// The rest runs on this thread, inside the namespace: iptables-save
		// and netlink through the thread, the daemon's loopback address too.
		if err := enterNetns(eo.netns); err != nil {
			return err
		}
	}
	runner := dataplane.NewRunner()
	var view explain.View
	if fs.Changed("kubeconfig") || fs.Changed("master") || fs.Changed("config") {
		view, err = apiServerView(opts, fs, runner)
	} else {
		view, err = daemonView(eo.daemon)
	}
	if err != nil {
		return err
	}
	k, err := readKernel(runner, view)
	if err != nil {
		return err
	}
	e, err := explain.Explain(view, k, q)
	if err != nil {
		return err
	}
	if eo.output == "json" {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(e)
	}
	_, err = io.WriteString(out, e.Text())
	return err
}

// enterNetns moves the calling goroutine, locked to its thread for good,
// into the network namespace named (/run/netns/NAME) or at a path.
func enterNetns(nameOrPath string) error {
	path := nameOrPath
	if !strings.Contains(path, "/") {
		path = "/run/netns/" + path
	}
	h, err := vnetns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("explain: open network namespace %s: %w", path, err)
	}
	defer h.Close()
	// Never unlocked: the thread is in another namespace until the
	// command exits.
	runtime.LockOSThread()
	if err := vnetns.Set(h); err != nil {
		return fmt.Errorf("explain: enter network namespace %s: %w", path, err)
	}
	return nil
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

// apiServerView builds the view as the daemon would: the daemon's flags
// (or --config) completed and checked as for a start, the Node read for
// what they need of it, the families and addresses of this namespace, and
// one complete list of Services and EndpointSlices.
func apiServerView(opts *options, fs *pflag.FlagSet, runner dataplane.Runner) (explain.View, error) {
	if _, err := opts.complete(fs); err != nil {
		return explain.View{}, err
	}
	if err := opts.validate(); err != nil {
		return explain.View{}, err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	nodeName, err := opts.nodeName()
	if err != nil {
		return explain.View{}, err
	}
	client, err := newClient(opts.cfg, opts.master)
	if err != nil {
		return explain.View{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	popts, _, err := nodeSettings(ctx, opts, client, nodeName, log)
	if err != nil {
		return explain.View{}, err
	}
	families, err := detectFamilies(runner, log)
	if err != nil {
		return explain.View{}, err
	}
	popts.RandomFully = hasRandomFully(runner, log)
	view := explain.View{Configs: map[iptables.Family]rules.Config{}}
	for _, fam := range families {
		local, err := localAddresses(fam)
		if err != nil {
			return explain.View{}, err
		}
		view.Configs[fam] = popts.RulesConfig(fam, local)
		view.LocalAddrs = append(view.LocalAddrs, local...)
	}
	tracker := newTracker(opts.cfg, nodeName, nil, log)
	if err := endpoints.Watch(ctx, client, tracker, 0); err != nil {
		return explain.View{}, fmt.Errorf("explain: read Services and EndpointSlices: %w", err)
	}
	view.Snapshot = tracker.Snapshot()
	return view, nil
}
