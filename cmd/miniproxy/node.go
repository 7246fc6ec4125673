package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"

	"github.com/miniproxy/miniproxy/pkg/config"
	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// newClient uses the kubeconfig when one is given, the in-cluster service
// account otherwise (the DaemonSet case), with the configuration's
// clientConnection settings (--kube-api-qps, --kube-api-burst,
// --kube-api-content-type).
func newClient(c *config.Config, master string) (kubernetes.Interface, error) {
	var cfg *rest.Config
	var err error
	if c.Kubeconfig == "" && master == "" {
		cfg, err = rest.InClusterConfig()
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags(master, c.Kubeconfig)
	}
	if err != nil {
		return nil, fmt.Errorf("load API server credentials: %w", err)
	}
	cfg.UserAgent = "miniproxy"
	cfg.QPS, cfg.Burst, cfg.ContentType = c.QPS, int(c.Burst), c.ContentType
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("create API client: %w", err)
	}
	return client, nil
}

// hasRandomFully says whether MASQUERADE takes --random-fully here, which
// avoids source port collisions under load (upstream uses it when it can).
func hasRandomFully(r dataplane.Runner, log *slog.Logger) bool {
	ok, err := r.RandomFully(iptables.IPv4)
	if err != nil {
		log.Warn("cannot probe iptables for --random-fully", "err", err)
		return false
	}
	return ok
}

// unsupportedProtocols tries a rule matching each protocol in a scratch
// chain; a protocol whose match the kernel refuses is left out of the rules
// (one log line per service port) instead of failing every restore.
func unsupportedProtocols(r dataplane.Runner, families []iptables.Family, log *slog.Logger) map[endpoints.Protocol]bool {
	out := map[endpoints.Protocol]bool{}
	probe := rules.Prefix + "PROBE"
	for _, proto := range []endpoints.Protocol{endpoints.TCP, endpoints.UDP, endpoints.SCTP} {
		p := map[endpoints.Protocol]string{endpoints.TCP: "tcp", endpoints.UDP: "udp", endpoints.SCTP: "sctp"}[proto]
		for _, fam := range families {
			in := fmt.Sprintf("*filter\n:%s - [0:0]\n-A %s -p %s -m %s --dport 1 -j RETURN\nCOMMIT\n", probe, probe, p, p)
			err := r.Restore(fam, []byte(in))
			// Remove the scratch chain whether or not the rule was taken.
			_ = r.Restore(fam, []byte(fmt.Sprintf("*filter\n:%s - [0:0]\n-X %s\nCOMMIT\n", probe, probe)))
			if err != nil {
				log.Warn("this node's iptables cannot match a protocol; its service ports are skipped", "protocol", string(proto), "family", fam.String(), "err", err)
				out[proto] = true
			}
		}
	}
	return out
}

// eventSink turns invalid objects into Warning events on them, so that the
// owner of a broken Service sees why it is not proxied with kubectl describe.
type eventSink struct {
	recorder record.EventRecorder
	client   kubernetes.Interface
	node     string
	log      *slog.Logger
}

func newEventSink(ctx context.Context, client kubernetes.Interface, nodeName string, log *slog.Logger) *eventSink {
	b := record.NewBroadcaster(record.WithContext(ctx))
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	return &eventSink{
		recorder: b.NewRecorder(scheme.Scheme, v1.EventSource{Component: "miniproxy", Host: nodeName}),
		client:   client,
		node:     nodeName,
		log:      log,
	}
}

func (e *eventSink) invalidObject(kind, namespace, name, reason string) {
	ref := &v1.ObjectReference{Kind: kind, Namespace: namespace, Name: name}
	switch kind {
	case "Service":
		ref.APIVersion = "v1"
	case "EndpointSlice":
		ref.APIVersion = "discovery.k8s.io/v1"
	}
	e.recorder.Eventf(ref, v1.EventTypeWarning, "Invalid"+kind, "miniproxy ignores it: %s", reason)
}

// refusedServices puts a Warning event on each Service whose rules the
// kernel newly refused, so that its owner sees with kubectl why a change to
// it has no effect on this node.
func (e *eventSink) refusedServices(res proxy.SyncResult) {
	for _, r := range res.Refusals {
		if !r.New {
			continue
		}
		ref := &v1.ObjectReference{Kind: "Service", APIVersion: "v1", Namespace: r.Service.Namespace, Name: r.Service.Name}
		e.recorder.Eventf(ref, v1.EventTypeWarning, "RulesRefused",
			"the kernel of node %s refuses this Service's rules; every other Service is programmed there, and this one keeps the rules the kernel last accepted for it (if any) until it changes: %s", e.node, r.Err)
	}
}

// starting is kube-proxy's "birth cry": a Normal event named Starting on
// the Node, so that `kubectl describe node` shows when the proxy started.
func (e *eventSink) starting() {
	ref := &v1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: e.node}
	e.recorder.Event(ref, v1.EventTypeNormal, "Starting", "Starting miniproxy, the kube-proxy replacement (StartKubeProxy).")
}

// nodeFacts is what miniproxy takes from its own Node object at start, as
// kube-proxy's NodeManager does: its addresses (for the keyword "primary"
// of --nodeport-addresses) and spec.podCIDRs (for --detect-local-mode
// NodeCIDR).
type nodeFacts struct {
	// ips are the Node's addresses in kube-proxy's order: the first
	// InternalIP (else ExternalIP), then the first of the other family.
	ips []netip.Addr
	// podCIDRs is spec.podCIDRs.
	podCIDRs []netip.Prefix
}

// nodeWaits are how long readNode waits for the Node to exist, then for
// its pod CIDRs, and how often it asks.
type nodeWaits struct{ node, podCIDRs, poll time.Duration }

// kubeProxyNodeWaits are the waits of kube-proxy's NodeManager.
var kubeProxyNodeWaits = nodeWaits{node: 30 * time.Second, podCIDRs: 5 * time.Minute, poll: time.Second}

// readNode reads the Node named name when something needs it, waiting as
// kube-proxy does (kubeProxyNodeWaits): up to 30 s for it to exist with
// addresses (then miniproxy goes on without them), and when podCIDRs are
// needed up to 5 min more for spec.podCIDRs, whose absence is then an
// error. Unlike
// kube-proxy, which always waits for the Node's addresses, miniproxy does
// not wait when it needs neither (it finds its addresses on its
// interfaces), so a Node without addresses does not delay its start.
func readNode(ctx context.Context, client kubernetes.Interface, name string, needPodCIDRs, needIPs bool, waits nodeWaits, log *slog.Logger) (nodeFacts, error) {
	var facts nodeFacts
	if !needPodCIDRs && !needIPs {
		return facts, nil
	}
	var last error
	poll := func(limit time.Duration, done func() bool) {
		ctx, cancel := context.WithTimeout(ctx, limit)
		defer cancel()
		for {
			node, err := client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if last = err; err == nil {
				facts = factsOf(node)
			}
			if done() {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(waits.poll):
			}
		}
	}
	poll(waits.node, func() bool { return last == nil && (len(facts.ips) > 0 || needPodCIDRs) })
	if !needPodCIDRs {
		if last != nil {
			log.Warn("cannot read this node's Node object; going on without its addresses", "node", name, "err", last)
		}
		return facts, nil
	}
	poll(waits.podCIDRs, func() bool { return len(facts.podCIDRs) > 0 })
	if len(facts.podCIDRs) == 0 {
		if last != nil {
			return facts, fmt.Errorf("--detect-local-mode NodeCIDR: timeout waiting for node %q to exist: %w", name, last)
		}
		return facts, fmt.Errorf("--detect-local-mode NodeCIDR: timeout waiting for PodCIDR allocation on node %q", name)
	}
	return facts, nil
}

// factsOf reads a Node's addresses and pod CIDRs (invalid ones are skipped).
func factsOf(node *v1.Node) nodeFacts {
	var f nodeFacts
	seen := map[bool]bool{}
	for _, kind := range []v1.NodeAddressType{v1.NodeInternalIP, v1.NodeExternalIP} {
		for _, a := range node.Status.Addresses {
			ip, err := netip.ParseAddr(a.Address)
			if a.Type != kind || err != nil || seen[ip.Is4()] {
				continue
			}
			seen[ip.Is4()] = true
			f.ips = append(f.ips, ip.Unmap())
		}
	}
	for _, c := range node.Spec.PodCIDRs {
		if p, err := netip.ParsePrefix(c); err == nil {
			f.podCIDRs = append(f.podCIDRs, p.Masked())
		}
	}
	return f
}

// watchNode ends miniproxy (cause) when what it took from its Node at
// start changes: the pod CIDRs in NodeCIDR mode, the addresses when
// --nodeport-addresses uses "primary". kube-proxy exits then too, so that
// the DaemonSet starts it again with the new values; miniproxy's rules stay
// in place meanwhile.
func watchNode(ctx context.Context, client kubernetes.Interface, name string, start nodeFacts, podCIDRs, ips bool, cause func(error)) {
	if !podCIDRs && !ips {
		return
	}
	byName := fields.OneTermEqualSelector("metadata.name", name).String()
	inf := coreinformers.NewFilteredNodeInformer(client, 0, cache.Indexers{}, func(o *metav1.ListOptions) { o.FieldSelector = byName })
	check := func(obj any) {
		node, ok := obj.(*v1.Node)
		if !ok {
			return
		}
		now := factsOf(node)
		switch {
		case podCIDRs && !slices.Equal(now.podCIDRs, start.podCIDRs):
			cause(fmt.Errorf("the pod CIDRs of node %s changed from %v to %v (--detect-local-mode NodeCIDR); exiting so that the DaemonSet starts miniproxy again with them", name, start.podCIDRs, now.podCIDRs))
		case ips && !slices.Equal(now.ips, start.ips):
			cause(fmt.Errorf("the addresses of node %s changed from %v to %v (--nodeport-addresses primary); exiting so that the DaemonSet starts miniproxy again with them", name, start.ips, now.ips))
		}
	}
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    check,
		UpdateFunc: func(_, obj any) { check(obj) },
	})
	go inf.Run(ctx.Done())
}

// primaryNodeIPs gives the node's primary address of each family for the
// keyword "primary" of --nodeport-addresses, as kube-proxy does: the
// Node's addresses, with a --bind-address that is not 0.0.0.0 or :: taking
// its family's place.
func primaryNodeIPs(facts nodeFacts, c *config.Config, nodeName string, log *slog.Logger) []netip.Addr {
	if !slices.Contains(c.NodePortAddresses, config.NodePortsPrimary) {
		return nil
	}
	out := slices.Clone(facts.ips)
	if b := c.BindAddress; b.IsValid() && !b.IsUnspecified() {
		i := slices.IndexFunc(out, func(a netip.Addr) bool { return a.Is4() == b.Is4() })
		if i < 0 {
			out = append(out, b)
		} else {
			out[i] = b
		}
	}
	if len(out) == 0 {
		log.Info("cannot determine this node's IP, so --nodeport-addresses primary matches no address; set --bind-address if this is wrong", "node", nodeName)
	}
	return out
}

// nodeWarningNow writes a Warning event on this node and waits (at most a
// few seconds) until the API server has it: the daemon is about to exit,
// and the recorder would send it in the background, too late.
func (e *eventSink) nodeWarningNow(ctx context.Context, reason, message string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	now := metav1.Now()
	ev := &v1.Event{
		ObjectMeta:     metav1.ObjectMeta{Name: fmt.Sprintf("%s.%x", e.node, now.UnixNano()), Namespace: metav1.NamespaceDefault},
		InvolvedObject: v1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: e.node},
		Reason:         reason,
		Message:        message,
		Type:           v1.EventTypeWarning,
		Source:         v1.EventSource{Component: "miniproxy", Host: e.node},
		FirstTimestamp: now,
		LastTimestamp:  now,
		Count:          1,
	}
	if _, err := e.client.CoreV1().Events(metav1.NamespaceDefault).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		e.log.Warn("could not put the event on the node", "reason", reason, "err", err)
	}
}
