package endpoints

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/url"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// The API server's reachability, as the informers see it. client-go's
// reflector retries a failed list or watch with an exponential backoff
// that grows to 30 s (with jitter, up to a minute), and logs nothing at
// the default verbosity: kube-proxy says nothing while its API server is
// away, and after an outage of a minute may take most of another to see
// the next change. miniproxy's informers instead wait out an unreachable
// server themselves: their list and watch calls retry transport failures
// (and 429 and 5xx answers) every second or so, with jitter, so that the
// first change after the server comes back arrives within about a second,
// and the operator is told at once which server cannot be reached and why,
// then every 30 s while it lasts, and when it is back.
var (
	// unreachableRetry is the mean wait between two attempts.
	unreachableRetry = time.Second
	// unreachableRepeat is how often the warning is repeated.
	unreachableRepeat = 30 * time.Second
)

// reachability reports the API server's reachability once for all the
// informers: one warning when the first of them fails, one line when one
// of them gets through again.
type reachability struct {
	server string
	log    *slog.Logger

	mu        sync.Mutex
	downSince time.Time // zero while reachable
	warned    time.Time
	attempts  int
}

func newReachability(client kubernetes.Interface, log *slog.Logger) *reachability {
	return &reachability{server: serverOf(client), log: log}
}

// serverOf names the API server client talks to, for the log ("" when it
// cannot be told, e.g. for a fake clientset).
func serverOf(client kubernetes.Interface) string {
	rc, ok := client.CoreV1().RESTClient().(*rest.RESTClient)
	if !ok || rc == nil || rc.Get().URL() == nil {
		return ""
	}
	u := rc.Get().URL()
	return (&url.URL{Scheme: u.Scheme, Host: u.Host}).String()
}

func (r *reachability) failed(what string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	r.attempts++
	if r.downSince.IsZero() {
		r.downSince = now
	}
	if r.warned.IsZero() || now.Sub(r.warned) >= unreachableRepeat {
		r.warned = now
		r.log.Warn("cannot reach the API server; the rules keep the last known Services and endpoints, and miniproxy retries every second",
			"server", r.server, "request", what, "err", err, "unreachableFor", now.Sub(r.downSince).Round(time.Second), "attempts", r.attempts)
	}
}

func (r *reachability) ok() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.downSince.IsZero() {
		return
	}
	r.log.Info("the API server is reachable again", "server", r.server, "unreachableFor", time.Since(r.downSince).Round(100*time.Millisecond), "attempts", r.attempts)
	r.downSince, r.warned, r.attempts = time.Time{}, time.Time{}, 0
}

// worthRetrying says whether an error of a list or watch call means the
// server could not answer (transport failure, overload, server error) rather
// than an answer the reflector must act on (410 Gone, 403, ...).
func worthRetrying(err error) bool {
	var status apierrors.APIStatus
	if !errors.As(err, &status) {
		return !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded)
	}
	code := status.Status().Code
	return code == 429 || code >= 500
}

// patiently calls f until it succeeds, fails with an answer worth passing
// on, or ctx ends, reporting the server's reachability on the way.
func patiently[T any](ctx context.Context, r *reachability, what string, f func() (T, error)) (T, error) {
	for {
		v, err := f()
		if err == nil {
			r.ok()
			return v, nil
		}
		if !worthRetrying(err) || ctx.Err() != nil {
			return v, err
		}
		r.failed(what, err)
		wait := time.Duration(float64(unreachableRetry) * (0.5 + rand.Float64()))
		select {
		case <-ctx.Done():
			return v, ctx.Err()
		case <-time.After(wait):
		}
	}
}

// patientListWatch is a ListerWatcher for one resource whose calls wait
// out an unreachable API server (patiently), with kube-proxy's list
// options applied by tweak.
func patientListWatch(client kubernetes.Interface, r *reachability, what string, tweak func(*metav1.ListOptions),
	list func(context.Context, metav1.ListOptions) (runtime.Object, error),
	watchFn func(context.Context, metav1.ListOptions) (watch.Interface, error)) cache.ListerWatcher {
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			tweak(&o)
			return patiently(ctx, r, "list "+what, func() (runtime.Object, error) { return list(ctx, o) })
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			tweak(&o)
			return patiently(ctx, r, "watch "+what, func() (watch.Interface, error) { return watchFn(ctx, o) })
		},
	}
	return cache.ToListWatcherWithWatchListSemantics(lw, client)
}
