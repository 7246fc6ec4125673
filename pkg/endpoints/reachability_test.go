package endpoints

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"syscall"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// An unreachable API server is waited out by the informers' calls, told
// once (then every unreachableRepeat) and when it is back; an answer the
// reflector must act on (410 Gone, 403) is passed on at once.
func TestPatientlyWaitsOutAnUnreachableServer(t *testing.T) {
	defer func(r, rep time.Duration) { unreachableRetry, unreachableRepeat = r, rep }(unreachableRetry, unreachableRepeat)
	unreachableRetry, unreachableRepeat = 10*time.Millisecond, time.Hour
	var out bytes.Buffer
	r := &reachability{server: "https://10.240.0.2:6443", log: slog.New(slog.NewTextHandler(&out, nil))}
	ctx := context.Background()

	calls := 0
	v, err := patiently(ctx, r, "list Services", func() (int, error) {
		calls++
		if calls < 5 {
			return 0, &netError{syscall.ECONNREFUSED}
		}
		return 42, nil
	})
	if err != nil || v != 42 || calls != 5 {
		t.Fatalf("patiently = %v, %v after %d calls; want 42 after 5", v, err, calls)
	}
	log := out.String()
	if strings.Count(log, "cannot reach the API server") != 1 || !strings.Contains(log, `server=https://10.240.0.2:6443`) ||
		!strings.Contains(log, "connection refused") || strings.Count(log, "reachable again") != 1 {
		t.Errorf("want one warning naming the server and the error, then one line when it is back:\n%s", log)
	}

	for _, answer := range []error{
		apierrors.NewResourceExpired("too old resource version"),
		apierrors.NewForbidden(schema.GroupResource{Resource: "services"}, "", errors.New("RBAC")),
	} {
		calls = 0
		_, err := patiently(ctx, r, "watch Services", func() (int, error) { calls++; return 0, answer })
		if err != answer || calls != 1 {
			t.Errorf("%v: passed on after %d calls as %v; want at once", answer, calls, err)
		}
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := patiently(cancelled, r, "list", func() (int, error) { return 0, &netError{syscall.ECONNREFUSED} }); err == nil {
		t.Error("a cancelled context must end the wait")
	}
}

// netError is a transport failure, as net/http reports a refused dial.
type netError struct{ errno syscall.Errno }

func (e *netError) Error() string { return "dial tcp 10.240.0.2:6443: connect: " + e.errno.Error() }
func (e *netError) Unwrap() error { return e.errno }
