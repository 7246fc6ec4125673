package healthcheck

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
)

// Serve listens on addr ("host:port") and serves h there until ctx ends.
// It returns once the listener is open, so that a taken port is reported to
// the caller at start-up rather than lost in a goroutine; the address
// actually bound is returned (useful with port 0). name says which server
// this is in logs and errors.
func Serve(ctx context.Context, name, addr string, h http.Handler, log *slog.Logger) (net.Addr, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("start %s server on %s: %w", name, addr, err)
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("server stopped", "server", name, "address", l.Addr().String(), "err", err)
		}
	}()
	log.Info("serving", "server", name, "address", l.Addr().String())
	return l.Addr(), nil
}

// KeepServing serves h on addr until ctx ends, like Serve, except that a
// port that cannot be opened is not fatal: the failure is logged and the
// listen retried every retry until it works, as kube-proxy does with its
// healthz and metrics servers (it exits only in its hard-fail mode). It
// returns at once; the first attempt is made before it returns.
func KeepServing(ctx context.Context, name, addr string, h http.Handler, retry time.Duration, log *slog.Logger) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	_, err := Serve(ctx, name, addr, h, log)
	if err == nil {
		return
	}
	log.Error("cannot open server port; retrying", "server", name, "address", addr, "retry", retry, "err", err)
	last := err.Error()
	served := func(context.Context) (bool, error) {
		_, err := Serve(ctx, name, addr, h, log)
		switch {
		case err == nil:
			return true, nil
		case err.Error() != last:
			last = err.Error()
			log.Error("cannot open server port; retrying", "server", name, "address", addr, "retry", retry, "err", err)
		default:
			log.Debug("server port still cannot be opened", "server", name, "address", addr, "err", err)
		}
		return false, nil
	}
	go func() { _ = wait.PollUntilContextCancel(ctx, retry, false, served) }()
}
