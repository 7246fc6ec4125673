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
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/selection"
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
//
// The informers cache what the Tracker keeps, not API objects: their
// transform converts each Service and EndpointSlice as it arrives (see
// cachedService), and they keep no namespace index, which nothing here
// would read.
func Watch(ctx context.Context, client kubernetes.Interface, t *Tracker, resync time.Duration) error {
	selector := ProxyLabelSelector().String()
	byLabels := func(o *metav1.ListOptions) { o.LabelSelector = selector }
	noIndexes := cache.Indexers{}

	reach := newReachability(client, t.log)
	informer := func(lw cache.ListerWatcher, obj runtime.Object) cache.SharedIndexInformer {
		return cache.NewSharedIndexInformerWithOptions(lw, obj, cache.SharedIndexInformerOptions{ResyncPeriod: resync, Indexers: noIndexes})
	}
	services, slices := client.CoreV1().Services(metav1.NamespaceAll), client.DiscoveryV1().EndpointSlices(metav1.NamespaceAll)
	svcInformer := informer(patientListWatch(client, reach, "Services", byLabels,
		func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return services.List(ctx, o) },
		services.Watch), &v1.Service{})
	sliceInformer := informer(patientListWatch(client, reach, "EndpointSlices", byLabels,
		func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return slices.List(ctx, o) },
		slices.Watch), &discoveryv1.EndpointSlice{})
	infs := []cache.SharedIndexInformer{svcInformer, sliceInformer}
	var nodeInformer cache.SharedIndexInformer
	if t.nodeName != "" {
		nodeSelector := fields.OneTermEqualSelector("metadata.name", t.nodeName).String()
		nodes := client.CoreV1().Nodes()
		nodeInformer = informer(patientListWatch(client, reach, "Node "+t.nodeName, func(o *metav1.ListOptions) { o.FieldSelector = nodeSelector },
			func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return nodes.List(ctx, o) },
			nodes.Watch), &v1.Node{})
		infs = append(infs, nodeInformer)
	}
	for _, inf := range infs {
		if err := inf.SetTransform(compact); err != nil {
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
	setService := func(c *cachedService) { t.setService(c.key, c.conv) }
	if err := register("Service", svcInformer, handlers(t.log,
		setService,
		func(_, c *cachedService) { setService(c) },
		func(c *cachedService) { t.deleteService(c.key) })); err != nil {
		return err
	}
	setSlice := func(c *cachedSlice) { t.setSlice(c.key, c.conv) }
	if err := register("EndpointSlice", sliceInformer, handlers(t.log,
		setSlice,
		func(_, c *cachedSlice) { setSlice(c) },
		func(c *cachedSlice) { t.deleteSlice(c.key) })); err != nil {
		return err
	}
	if nodeInformer != nil {
		if err := register("Node", nodeInformer, handlers(t.log, t.OnNodeAdd, t.OnNodeUpdate, t.OnNodeDelete)); err != nil {
			return err
		}
	}

	// The informers stop when ctx is done; nothing outlives the caller's
	// context.
	for _, inf := range infs {
		go inf.RunWithContext(ctx)
	}

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

// cachedService is what the Service informer keeps of a Service: its name
// and what convertService made of it, the very ports the Tracker keeps and
// shares with its snapshots. Converting in the informer's transform,
// instead of in the event handler, means no API object stays in memory: at
// 10,000 Services and EndpointSlices the objects were a third of the
// daemon's live heap (docs/performance.md).
//
// Its contents are never modified, so copies may share them.
type cachedService struct {
	key  objectKey
	conv convertedService
}

// cachedSlice is what the EndpointSlice informer keeps of an EndpointSlice,
// for the same reason as cachedService.
type cachedSlice struct {
	key  objectKey
	conv sliceConversion
}

// GetObjectKind is part of runtime.Object, which the informer's store
// requires; the kind is not needed.
func (c *cachedService) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject is part of runtime.Object; the contents are immutable, so
// a shallow copy is a deep one.
func (c *cachedService) DeepCopyObject() runtime.Object { cp := *c; return &cp }

// GetObjectMeta gives the informer the namespace and name it keys objects
// by.
func (c *cachedService) GetObjectMeta() metav1.Object { return c.key.objectMeta() }

// GetObjectKind is part of runtime.Object; see cachedService.
func (c *cachedSlice) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject is part of runtime.Object; see cachedService.
func (c *cachedSlice) DeepCopyObject() runtime.Object { cp := *c; return &cp }

// GetObjectMeta gives the informer the namespace and name it keys objects
// by.
func (c *cachedSlice) GetObjectMeta() metav1.Object { return c.key.objectMeta() }

func (k objectKey) objectMeta() *metav1.ObjectMeta {
	return &metav1.ObjectMeta{Namespace: k.namespace, Name: k.name}
}

// compact is the informers' transform: Services and EndpointSlices become
// their cached forms, our Node loses what is never read. Objects already
// compacted pass unchanged (client-go may hand an object to the transform
// twice).
func compact(obj any) (any, error) {
	switch o := obj.(type) {
	case *v1.Service:
		return &cachedService{key: keyOf(o), conv: convertService(o)}, nil
	case *discoveryv1.EndpointSlice:
		return &cachedSlice{key: keyOf(o), conv: convertSlice(o)}, nil
	}
	return dropUnusedNodeFields(obj)
}

// dropUnusedNodeFields strips from our Node what miniproxy never reads (it
// reads name, labels, taints and the deletion timestamp): managedFields,
// annotations and the status, whose image list alone can be tens of
// kilobytes. Only one Node is cached, but it is updated every few seconds.
func dropUnusedNodeFields(obj any) (any, error) {
	if n, ok := obj.(*v1.Node); ok {
		n.ManagedFields = nil
		n.Annotations = nil
		n.OwnerReferences = nil
		n.Status = v1.NodeStatus{}
	}
	return obj, nil
}
