package netns

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"
)

// DialContext opens a connection from inside the namespace, like
// net.Dialer.DialContext. The socket is created on a thread in the namespace
// and can then be used from any goroutine, so Go clients (HTTP, client-go)
// can run "inside" a lab namespace without a subprocess.
func (n *Namespace) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	var conn net.Conn
	err := n.Do(func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s %s from %s: %w", network, address, n.name, err)
	}
	return conn, nil
}

// HTTPClient returns an HTTP client whose connections start in the
// namespace. It ignores proxy settings from the environment and does not keep
// connections alive, so every request is a new connection (and a new choice
// of Service endpoint).
func (n *Namespace) HTTPClient(timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			Proxy:             nil,
			DialContext:       n.DialContext,
			DisableKeepAlives: true,
		},
	}
}

// HTTPGet fetches url from inside the namespace and returns the status code
// and body; any status is returned without error, so tests can check 503s.
func (n *Namespace) HTTPGet(ctx context.Context, url string, timeout time.Duration) (status int, body string, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", fmt.Errorf("GET %s from %s: %w", url, n.name, err)
	}
	resp, err := n.HTTPClient(timeout).Do(req)
	if err != nil {
		return 0, "", fmt.Errorf("GET %s from %s: %w", url, n.name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, string(b), fmt.Errorf("GET %s from %s: read body: %w", url, n.name, err)
	}
	return resp.StatusCode, string(b), nil
}

// Curl runs /usr/bin/curl for url inside the namespace, as the tutorial does,
// with proxies disabled and the whole transfer bounded by timeout. It returns
// the body whatever the HTTP status; an error means no HTTP answer (refused,
// timed out, reset), with curl's message.
func (n *Namespace) Curl(ctx context.Context, url string, timeout time.Duration) (string, error) {
	secs := strconv.FormatFloat(timeout.Seconds(), 'f', 3, 64)
	out, _, err := n.Run(ctx, "curl", "-sS", "--noproxy", "*", "--max-time", secs, "-g", url)
	if err != nil {
		return out, fmt.Errorf("curl: %w", err)
	}
	return out, nil
}

// UDPRequest sends payload to address (host:port) from inside the namespace
// and returns the first datagram that comes back within timeout, to test UDP
// Services against the echo server's -udp-listen mode.
func (n *Namespace) UDPRequest(ctx context.Context, address, payload string, timeout time.Duration) (string, error) {
	conn, err := n.DialContext(ctx, "udp", address)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	conn.SetDeadline(deadline)
	if _, err := conn.Write([]byte(payload)); err != nil {
		return "", fmt.Errorf("send udp to %s from %s: %w", address, n.name, err)
	}
	buf := make([]byte, 64*1024)
	m, err := conn.Read(buf)
	if err != nil {
		return "", fmt.Errorf("receive udp from %s in %s: %w", address, n.name, err)
	}
	return string(buf[:m]), nil
}

// WaitTCP waits until a TCP connection to address succeeds from inside the
// namespace, to know that a server (or a Service rule) is ready.
func (n *Namespace) WaitTCP(ctx context.Context, address string) error {
	var last error
	for {
		attempt, cancel := context.WithTimeout(ctx, time.Second)
		conn, err := n.DialContext(attempt, "tcp", address)
		cancel()
		if err == nil {
			conn.Close()
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for tcp %s from %s: %w (last error: %v)", address, n.name, ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
