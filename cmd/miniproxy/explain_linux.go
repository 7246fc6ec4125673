package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"strings"
	"time"

	vnetns "github.com/vishvananda/netns"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/explain"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
	"github.com/spf13/pflag"
)

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
	readView := func() (explain.View, error) { return daemonView(eo.daemon) }
	attempts := settleAttempts
	if fs.Changed("kubeconfig") || fs.Changed("master") || fs.Changed("config") {
		// The API server's view is ahead of the rules until the next
		// sync; that drift is the answer, not something to wait out.
		readView = func() (explain.View, error) { return apiServerView(opts, fs, runner) }
		attempts = 1
	}
	x, err := settledExplainer(attempts, func() (explain.View, explain.Kernel, error) {
		view, err := readView()
		if err != nil {
			return view, nil, err
		}
		k, err := readKernel(runner, view)
		return view, k, err
	})
	if err != nil {
		return err
	}
	e, err := x.Explain(q)
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
