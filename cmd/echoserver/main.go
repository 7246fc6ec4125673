// Command echoserver is the lab's stand-in for the Kubernetes source-ip tutorial's
// source-ip-app (registry.k8s.io/echoserver:1.4): every HTTP request is answered
// with a text/plain description of what the server saw, most importantly
// client_address=, the source address of the TCP connection. The end-to-end
// tests read that line to tell whether a Service path masqueraded the client.
//
// Three extra modes serve the other checks of the brief:
//
//   - -udp-listen answers every datagram with client_address= and server=, so
//     UDP Services can be checked the same way;
//   - -name adds hostname=<name> under SERVER VALUES, so tests can tell which
//     endpoint answered when all pods share the machine's hostname;
//   - -proxy-to turns the process into a minimal ingress: a reverse proxy that
//     appends the client address to X-Forwarded-For, as the ingress pod in
//     "client -> LB -> ingress pod -> app Service -> pod".
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"
)

// serverVersion is printed as server_version= so a reader can tell this
// implementation from the nginx/lua original.
const serverVersion = "miniproxy-echoserver"

// maxBody bounds how much of a request body is echoed back.
const maxBody = 1 << 20

func main() {
	listen := flag.String("listen", ":8080", "TCP address of the HTTP server")
	udpListen := flag.String("udp-listen", "", "UDP address to answer datagrams on (disabled when empty)")
	name := flag.String("name", "", "name reported as hostname= (HTTP) and server= (UDP); UDP defaults to the host name")
	proxyTo := flag.String("proxy-to", "", "act as an ingress: reverse-proxy every HTTP request to this URL, appending the client to X-Forwarded-For")
	flag.Parse()

	if err := run(*listen, *udpListen, *name, *proxyTo); err != nil {
		log.Printf("echoserver: %v", err)
		os.Exit(1)
	}
}

// run starts the configured listeners and serves until SIGINT or SIGTERM.
func run(listen, udpListen, name, proxyTo string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var handler http.Handler = newEchoHandler(name)
	if proxyTo != "" {
		target, err := url.Parse(proxyTo)
		if err != nil || target.Scheme == "" || target.Host == "" {
			return fmt.Errorf("parse -proxy-to %q: want an absolute URL such as http://10.96.0.10:80", proxyTo)
		}
		handler = newProxy(target)
	}

	errc := make(chan error, 2)
	if udpListen != "" {
		pc, err := net.ListenPacket("udp", udpListen)
		if err != nil {
			return fmt.Errorf("listen udp %s: %w", udpListen, err)
		}
		defer pc.Close()
		udpName := name
		if udpName == "" {
			udpName, _ = os.Hostname()
		}
		log.Printf("echoserver: listening on udp %s", pc.LocalAddr())
		go func() { errc <- serveUDP(pc, udpName) }()
	}

	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("listen tcp %s: %w", listen, err)
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	if proxyTo != "" {
		log.Printf("echoserver: listening on http %s, proxying to %s", ln.Addr(), proxyTo)
	} else {
		log.Printf("echoserver: listening on http %s", ln.Addr())
	}
	go func() { errc <- srv.Serve(ln) }()

	select {
	case <-ctx.Done():
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(shutdownCtx)
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return err
	}
}

// newEchoHandler returns the handler that reproduces echoserver:1.4's reply.
// name, when not empty, is reported as hostname= under SERVER VALUES.
func newEchoHandler(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(r.Body, maxBody))
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, formatEcho(r, name, body))
	})
}

// formatEcho renders the reply body for r; it is separate from the handler so
// the format can be tested without a network.
func formatEcho(r *http.Request, name string, body []byte) string {
	var b strings.Builder
	query := r.URL.RawQuery
	if query == "" {
		query = "nil"
	}
	b.WriteString("CLIENT VALUES:\n")
	fmt.Fprintf(&b, "client_address=%s\n", hostOnly(r.RemoteAddr))
	fmt.Fprintf(&b, "command=%s\n", r.Method)
	fmt.Fprintf(&b, "real path=%s\n", r.URL.Path)
	fmt.Fprintf(&b, "query=%s\n", query)
	fmt.Fprintf(&b, "request_version=%d.%d\n", r.ProtoMajor, r.ProtoMinor)
	fmt.Fprintf(&b, "request_uri=http://%s%s\n", r.Host, r.URL.RequestURI())
	b.WriteString("\nSERVER VALUES:\n")
	fmt.Fprintf(&b, "server_version=%s\n", serverVersion)
	if name != "" {
		fmt.Fprintf(&b, "hostname=%s\n", name)
	}
	b.WriteString("\nHEADERS RECEIVED:\n")
	headers := map[string]string{"host": r.Host}
	for k, v := range r.Header {
		headers[strings.ToLower(k)] = strings.Join(v, ", ")
	}
	keys := make([]string, 0, len(headers))
	for k := range headers {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%s\n", k, headers[k])
	}
	b.WriteString("BODY:\n")
	if len(body) == 0 {
		b.WriteString("-no body in request-\n")
	} else {
		b.Write(body)
	}
	return b.String()
}

// newProxy returns the ingress handler: it forwards to target, keeps the
// client's Host header (as an ingress controller does) and appends the
// address of the connecting client to the X-Forwarded-For it received, so a
// chain of proxies yields "client, proxy1, ...".
func newProxy(target *url.URL) http.Handler {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host
			// Rewrite starts from an outbound request without the inbound
			// X-Forwarded-For; copy it so SetXForwarded appends to it.
			pr.Out.Header["X-Forwarded-For"] = pr.In.Header["X-Forwarded-For"]
			pr.SetXForwarded()
		},
		ErrorLog: log.Default(),
	}
}

// serveUDP answers every datagram on pc with the sender's address and name,
// until pc is closed.
func serveUDP(pc net.PacketConn, name string) error {
	buf := make([]byte, 64*1024)
	for {
		_, addr, err := pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("read udp: %w", err)
		}
		reply := udpReply(addr, name)
		if _, err := pc.WriteTo([]byte(reply), addr); err != nil {
			log.Printf("echoserver: udp reply to %s: %v", addr, err)
		}
	}
}

// udpReply is the text sent back for one datagram from addr.
func udpReply(addr net.Addr, name string) string {
	return fmt.Sprintf("client_address=%s\nserver=%s\n", hostOnly(addr.String()), name)
}

// hostOnly strips the port (and IPv6 brackets) from a host:port string.
func hostOnly(hostport string) string {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return hostport
	}
	return host
}
