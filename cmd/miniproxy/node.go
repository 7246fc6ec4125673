package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	goipt "github.com/coreos/go-iptables/iptables"
	"github.com/vishvananda/netlink"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// newClient uses the kubeconfig when one is given, the in-cluster service
// account otherwise (the DaemonSet case).
// clientSettings are kube-proxy's --kube-api-* flags.
type clientSettings struct {
	qps         float32
	burst       int
	contentType string
}

func (o *options) clientSettings() clientSettings {
	return clientSettings{qps: o.kubeAPIQPS, burst: int(o.kubeAPIBurst), contentType: o.kubeAPIContentType}
}

func newClient(kubeconfig, master string, settings clientSettings) (kubernetes.Interface, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig == "" && master == "" {
		cfg, err = rest.InClusterConfig()
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags(master, kubeconfig)
	}
	if err != nil {
		return nil, fmt.Errorf("load API server credentials: %w", err)
	}
	cfg.UserAgent = "miniproxy"
	cfg.QPS, cfg.Burst, cfg.ContentType = settings.qps, settings.burst, settings.contentType
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("create API client: %w", err)
	}
	return client, nil
}

// localAddresses lists the node's addresses of a family, leaving out IPv6
// link-local ones (they are never a Service's or NodePort's address).
func localAddresses(fam iptables.Family) ([]netip.Addr, error) {
	nf := netlink.FAMILY_V4
	if fam == iptables.IPv6 {
		nf = netlink.FAMILY_V6
	}
	list, err := netlink.AddrList(nil, nf)
	if err != nil {
		return nil, fmt.Errorf("list %s addresses: %w", fam, err)
	}
	var out []netip.Addr
	for _, a := range list {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLinkLocalUnicast() || (fam == iptables.IPv6 && ip.IsLoopback()) {
			continue
		}
		out = append(out, ip)
	}
	return out, nil
}

// hasRandomFully says whether MASQUERADE takes --random-fully here, which
// avoids source port collisions under load (upstream uses it when it can).
func hasRandomFully(log *slog.Logger) bool {
	ipt, err := goipt.NewWithProtocol(goipt.ProtocolIPv4)
	if err != nil {
		log.Warn("cannot probe iptables for --random-fully", "err", err)
		return false
	}
	return ipt.HasRandomFully()
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
