package endpoints

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// ProxyLabelSelector is the label selector the Service and EndpointSlice
// informers use, the same as upstream kube-proxy's: objects that belong to
// another proxy or to a headless Service are filtered out by the API server
// and never reach us.
func ProxyLabelSelector() labels.Selector {
	noProxyName, err := labels.NewRequirement(LabelServiceProxyName, selection.DoesNotExist, nil)
	if err != nil {
		panic(fmt.Sprintf("building label selector: %v", err)) // constant input: cannot fail
	}
	noHeadless, err := labels.NewRequirement(LabelHeadless, selection.DoesNotExist, nil)
	if err != nil {
		panic(fmt.Sprintf("building label selector: %v", err))
	}
	return labels.NewSelector().Add(*noProxyName, *noHeadless)
}

// Watch starts informers for Services and EndpointSlices (filtered by
// ProxyLabelSelector) and for our own Node only (field selector
// metadata.name=<node name>; none when the Tracker has no node name), feeds
// their events to t, and returns once every handler has seen the initial
// list, so that the first Snapshot taken afterwards is complete. The
// informers keep running until ctx is done. resync is the informers' resync
// period (0 disables it; resyncs cost little since no-op updates are
// recognised). Watch returns an error when ctx ends before the caches
// synced or a handler cannot be registered.
func Watch(ctx context.Context, client kubernetes.Interface, t *Tracker, resync time.Duration) error {
	selector := ProxyLabelSelector().String()
	factory := informers.NewSharedInformerFactoryWithOptions(client, resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = selector }))

	svcInformer := factory.Core().V1().Services().Informer()
	sliceInformer := factory.Discovery().V1().EndpointSlices().Informer()
	infs := []cache.SharedIndexInformer{svcInformer, sliceInformer}

	var nodeFactory informers.SharedInformerFactory
	var nodeInformer cache.SharedIndexInformer
	if t.nodeName != "" {
		nodeSelector := fields.OneTermEqualSelector("metadata.name", t.nodeName).String()
		nodeFactory = informers.NewSharedInformerFactoryWithOptions(client, resync,
			informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.FieldSelector = nodeSelector }))
		nodeInformer = nodeFactory.Core().V1().Nodes().Informer()
		infs = append(infs, nodeInformer)
	}
	for _, inf := range infs {
		if err := inf.SetTransform(dropUnusedFields); err != nil {
			return fmt.Errorf("setting informer transform: %w", err)
		}
	}

	var synced []cache.InformerSynced
	register := func(kind string, inf cache.SharedIndexInformer, h cache.ResourceEventHandler) error {
		reg, err := inf.AddEventHandler(h)
		if err != nil {
			return fmt.Errorf("registering %s event handler: %w", kind, err)
		}
		synced = append(synced, reg.HasSynced)
		return nil
	}
	if err := register("Service", svcInformer, handlers(t.log, t.OnServiceAdd, t.OnServiceUpdate, t.OnServiceDelete)); err != nil {
		return err
	}
	if err := register("EndpointSlice", sliceInformer, handlers(t.log, t.OnEndpointSliceAdd, t.OnEndpointSliceUpdate, t.OnEndpointSliceDelete)); err != nil {
		return err
	}
	if nodeInformer != nil {
		if err := register("Node", nodeInformer, handlers(t.log, t.OnNodeAdd, t.OnNodeUpdate, t.OnNodeDelete)); err != nil {
			return err
		}
	}

	factory.Start(ctx.Done())
	if nodeFactory != nil {
		nodeFactory.Start(ctx.Done())
	}
	go func() {
		// Wait for the informer goroutines to end once ctx is done, so that
		// nothing outlives the caller's context.
		<-ctx.Done()
		factory.Shutdown()
		if nodeFactory != nil {
			nodeFactory.Shutdown()
		}
	}()

	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		err := ctx.Err()
		if err == nil {
			err = errors.New("caches did not sync")
		}
		return fmt.Errorf("waiting for Service, EndpointSlice and Node caches to sync: %w", err)
	}
	t.log.Info("informer caches synced")
	return nil
}

// handlers adapts typed Tracker methods to a client-go event handler,
// unwrapping the tombstones (cache.DeletedFinalStateUnknown) an informer
// delivers when it missed a delete, and ignoring objects of the wrong type.
func handlers[T any](log *slog.Logger, add func(T), update func(T, T), del func(T)) cache.ResourceEventHandler {
	return cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			if o, ok := obj.(T); ok {
				add(o)
			} else {
				log.Error("unexpected object in add event", "type", fmt.Sprintf("%T", obj))
			}
		},
		UpdateFunc: func(oldObj, newObj any) {
			o, ok1 := oldObj.(T)
			n, ok2 := newObj.(T)
			if ok1 && ok2 {
				update(o, n)
			} else {
				log.Error("unexpected object in update event", "type", fmt.Sprintf("%T", newObj))
			}
		},
		DeleteFunc: func(obj any) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if o, ok := obj.(T); ok {
				del(o)
			} else {
				log.Error("unexpected object in delete event", "type", fmt.Sprintf("%T", obj))
			}
		},
	}
}

// dropUnusedFields strips what miniproxy never reads before objects enter
// the informer caches: at tens of thousands of Services and EndpointSlices
// the caches are most of the daemon's memory, and managedFields, the
// annotations (kubectl's last-applied-configuration alone is a copy of the
// whole object), selectors and endpoints' targetRefs are most of the caches.
func dropUnusedFields(obj any) (any, error) {
	if m, ok := obj.(metav1.Object); ok {
		m.SetManagedFields(nil)
		m.SetAnnotations(nil)
		m.SetOwnerReferences(nil)
		m.SetFinalizers(nil)
	}
	switch o := obj.(type) {
	case *v1.Service:
		o.Spec.Selector = nil
		o.Status.Conditions = nil
	case *discoveryv1.EndpointSlice:
		for i := range o.Endpoints {
			o.Endpoints[i].TargetRef = nil
			o.Endpoints[i].Hostname = nil
			o.Endpoints[i].DeprecatedTopology = nil
		}
	}
	return obj, nil
}
