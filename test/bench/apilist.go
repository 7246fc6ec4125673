package main

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clientfeatures "k8s.io/client-go/features"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"

	"github.com/miniproxy/miniproxy/test/netns"
)

// proxiedObjects selects the Services and EndpointSlices a node proxy
// watches: not those of another proxy, not headless ones (the selector both
// proxies use).
const proxiedObjects = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"

// APIList is how long the API server's initial state takes to reach a
// client on the node: Services and EndpointSlices through client-go
// informers, as both proxies receive them, timed until the caches synced.
type APIList struct {
	Seconds   float64 `json:"seconds"`
	Services  int     `json:"services"`
	Slices    int     `json:"endpoint_slices"`
	Error     string  `json:"error,omitempty"`
	Protobuf  bool    `json:"protobuf"`
	FromNode  bool    `json:"from_node"`
	WatchList bool    `json:"watch_list"` // client-go's WatchListClient gate: a streamed list

}

// timeAPIList syncs Service and EndpointSlice informers from inside ns, with
// the proxies' identity and content type (protobuf), and throws them away.
// It shows the part of a start-up that is the API server's and the
// client's work, whichever proxy runs.
func timeAPIList(ctx context.Context, cp *netns.ControlPlane, ns *netns.Namespace) APIList {
	a := APIList{Protobuf: true, FromNode: true, WatchList: clientfeatures.FeatureGates().Enabled(clientfeatures.WatchListClient)}
	cfg := cp.ProxyConfig(ns)
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	cfg.QPS, cfg.Burst = 50, 100
	cfg.Timeout = 0 // a watch
	cfg.UserAgent = "miniproxy-bench-list"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		a.Error = err.Error()
		return a
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	f := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = proxiedObjects }))
	svcs := f.Core().V1().Services().Informer()
	slices := f.Discovery().V1().EndpointSlices().Informer()
	start := time.Now()
	f.Start(ctx.Done())
	// Polled every millisecond: cache.WaitForCacheSync polls every 100 ms,
	// as coarse as the whole list at 1,000 Services.
	for !svcs.HasSynced() || !slices.HasSynced() {
		if ctx.Err() != nil {
			a.Error = fmt.Sprintf("caches not synced after %s", time.Since(start).Round(time.Second))
			break
		}
		time.Sleep(time.Millisecond)
	}
	a.Seconds = time.Since(start).Seconds()
	a.Services, a.Slices = len(svcs.GetStore().ListKeys()), len(slices.GetStore().ListKeys())
	cancel()
	f.Shutdown()
	return a
}
