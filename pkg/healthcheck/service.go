package healthcheck

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// EventReasonListenFailed is the reason of the Warning event put on a
// Service whose healthCheckNodePort cannot be opened (kube-proxy's).
const EventReasonListenFailed = "FailedToStartServiceHealthcheck"

// ServiceName names a Service (not one of its ports): health check ports
// exist once per Service.
type ServiceName struct {
	Namespace, Name string
}

// String gives "namespace/name".
func (n ServiceName) String() string { return n.Namespace + "/" + n.Name }

// ServiceHealthOptions configure NewServiceHealth.
type ServiceHealthOptions struct {
	// NodePortAddresses restricts the listeners to the node's addresses
	// inside these ranges (--nodeport-addresses); nil means one listener
	// on every address (the unspecified address, both families).
	NodePortAddresses []netip.Prefix
	// LocalAddresses lists the node's addresses of both families; it is
	// read at every sync when NodePortAddresses is set, so that the
	// listeners follow address changes. Required with NodePortAddresses.
	LocalAddresses func() ([]netip.Addr, error)
	// ProxyHealthy is the proxier's health (ProxierHealth.IsHealthy); nil
	// counts as always healthy.
	ProxyHealthy func() bool
	// Recorder receives a Warning event on the Service when its port cannot
	// be opened; may be nil.
	Recorder record.EventRecorder
	// Log may be nil to discard logs.
	Log *slog.Logger
	// Listen opens one listener ("host:port", host empty for every address);
	// net.Listen on "tcp" when nil. Tests inject failures with it.
	Listen func(addr string) (net.Listener, error)
}

// ServiceHealth keeps one HTTP listener per Service that has a
// healthCheckNodePort (externalTrafficPolicy: Local load balancers) and
// answers on it whether this node has a local ready endpoint of the
// Service: 200 if so and the proxy is healthy, 503 otherwise. Cloud load
// balancers send traffic only to nodes answering 200, which is what keeps
// the client's source IP.
//
// It changes only on successful syncs (OnSync ignores failed ones): a load
// balancer must never be told "send here" before this node's rules can
// serve the traffic. A port someone else holds is logged once, reported as
// a Warning event on the Service, and retried at every later sync; the
// other Services are not affected. It is safe for concurrent use.
type ServiceHealth struct {
	o   ServiceHealthOptions
	log *slog.Logger

	mu       sync.Mutex
	services map[ServiceName]*hcInstance
	// failed holds, per Service whose port could not be opened, the last
	// failure reported, so that retries do not repeat the event.
	failed map[ServiceName]string
	// addrWarned remembers the last address-listing problem logged.
	addrWarned string
	closed     bool
}

// hcInstance is the listener set of one Service.
type hcInstance struct {
	name  ServiceName
	port  int32
	hosts string // the listening hosts, joined; a change reopens
	// endpoints is the number of local ready endpoints; handlers read it
	// without the ServiceHealth lock.
	endpoints atomic.Int64
	servers   []*http.Server
	listeners []net.Listener
	addrs     []net.Addr
}

// NewServiceHealth makes the health check listeners' keeper; nothing is
// opened before the first successful sync.
func NewServiceHealth(o ServiceHealthOptions) *ServiceHealth {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.Listen == nil {
		o.Listen = func(addr string) (net.Listener, error) { return net.Listen("tcp", addr) }
	}
	return &ServiceHealth{
		o:        o,
		log:      log,
		services: map[ServiceName]*hcInstance{},
		failed:   map[ServiceName]string{},
	}
}

// OnSync follows a successful sync's snapshot; failed syncs change nothing.
// Register it with proxy.Proxier.OnSync.
func (s *ServiceHealth) OnSync(res proxy.SyncResult) {
	if res.Err != nil || res.Snapshot == nil {
		return
	}
	s.Sync(res.Snapshot)
}

// Sync opens, moves and closes listeners so that exactly the Services of
// snap with a healthCheckNodePort have one, and updates their local
// endpoint counts. Call it only with a snapshot whose rules are in the
// kernel.
func (s *ServiceHealth) Sync(snap *endpoints.Snapshot) {
	want := HealthCheckNodePorts(snap)
	counts := LocalReadyEndpoints(snap)

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	var hosts []string
	if len(want) > 0 {
		hosts = s.listenHosts()
	}
	// The count keeps "every address" ([""]) apart from "no address" ([]).
	hostKey := strconv.Itoa(len(hosts)) + ":" + strings.Join(hosts, ",")

	for name, inst := range s.services {
		port, ok := want[name]
		if ok && port == inst.port && inst.hosts == hostKey {
			continue
		}
		s.log.Info("closing healthCheckNodePort", "service", name.String(), "port", inst.port)
		inst.close()
		delete(s.services, name)
	}
	for name := range s.failed {
		if _, ok := want[name]; !ok {
			delete(s.failed, name)
		}
	}
	for _, name := range sortedNames(want) {
		if s.services[name] != nil {
			continue
		}
		port := want[name]
		inst, err := s.open(name, port, hosts, hostKey)
		if err != nil {
			s.reportFailure(snap.Node.Name, name, port, err)
			continue
		}
		if _, retried := s.failed[name]; retried {
			delete(s.failed, name)
			s.log.Info("opened healthCheckNodePort after earlier failures", "service", name.String(), "port", port)
		} else {
			s.log.Info("opened healthCheckNodePort", "service", name.String(), "port", port, "addresses", fmt.Sprint(inst.addrs))
		}
		s.services[name] = inst
	}
	for name, inst := range s.services {
		inst.endpoints.Store(int64(counts[name]))
	}
}

// listenHosts gives the hosts to listen on: "" (every address) unless
// NodePortAddresses restricts them to the matching local addresses. When
// the addresses cannot be listed, it falls back to every address, as
// kube-proxy does.
func (s *ServiceHealth) listenHosts() []string {
	if s.o.NodePortAddresses == nil {
		return []string{""}
	}
	var local []netip.Addr
	var err error
	if s.o.LocalAddresses == nil {
		err = errors.New("no way to list local addresses was configured")
	} else {
		local, err = s.o.LocalAddresses()
	}
	if err != nil {
		if msg := err.Error(); msg != s.addrWarned {
			s.addrWarned = msg
			s.log.Error("cannot list the node's addresses; healthCheckNodePorts listen on every address", "err", err)
		}
		return []string{""}
	}
	var hosts []string
	for _, a := range local {
		if rules.InNodePortRanges(a, s.o.NodePortAddresses) {
			hosts = append(hosts, a.Unmap().String())
		}
	}
	slices.Sort(hosts)
	hosts = slices.Compact(hosts)
	if len(hosts) == 0 {
		if msg := "none"; msg != s.addrWarned {
			s.addrWarned = msg
			s.log.Warn("no local address is inside --nodeport-addresses; healthCheckNodePorts are not opened", "nodePortAddresses", fmt.Sprint(s.o.NodePortAddresses))
		}
	} else {
		s.addrWarned = ""
	}
	return hosts
}

// open listens on port on every host; on any failure it closes what it
// opened, so that a retry starts clean.
func (s *ServiceHealth) open(name ServiceName, port int32, hosts []string, hostKey string) (*hcInstance, error) {
	inst := &hcInstance{name: name, port: port, hosts: hostKey}
	for _, h := range hosts {
		addr := net.JoinHostPort(h, strconv.Itoa(int(port)))
		l, err := s.o.Listen(addr)
		if err != nil {
			inst.close()
			// The listener's error names the address already
			// ("listen tcp :32001: bind: address already in use"), and
			// kube-proxy's event carries it bare.
			return nil, err
		}
		srv := &http.Server{
			Handler:           s.handler(inst),
			ReadHeaderTimeout: 10 * time.Second,
		}
		inst.servers = append(inst.servers, srv)
		inst.listeners = append(inst.listeners, l)
		inst.addrs = append(inst.addrs, l.Addr())
		go func() {
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("healthCheckNodePort stopped serving", "service", name.String(), "address", l.Addr().String(), "err", err)
			}
		}()
	}
	return inst, nil
}

// close stops the servers and closes the listeners at once (a server not
// yet serving would close its listener only when it starts), so that the
// port is free when close returns.
func (inst *hcInstance) close() {
	for _, srv := range inst.servers {
		_ = srv.Close()
	}
	for _, l := range inst.listeners {
		_ = l.Close()
	}
	inst.servers, inst.listeners = nil, nil
}

// reportFailure logs and records an event the first time a Service's port
// fails in a given way; later identical failures (one per sync) are only
// logged at debug level.
func (s *ServiceHealth) reportFailure(node string, name ServiceName, port int32, err error) {
	msg := fmt.Sprintf("node %s failed to start healthcheck %q on port %d: %v", node, name.String(), port, err)
	if s.failed[name] == msg {
		s.log.Debug("healthCheckNodePort still cannot be opened; retrying at the next sync", "service", name.String(), "port", port, "err", err)
		return
	}
	s.failed[name] = msg
	s.log.Error("cannot open healthCheckNodePort; load balancers will see this node as down for the Service until it opens; retrying at every sync",
		"service", name.String(), "port", port, "err", err)
	if s.o.Recorder != nil {
		ref := &v1.ObjectReference{Kind: "Service", APIVersion: "v1", Namespace: name.Namespace, Name: name.Name}
		s.o.Recorder.Eventf(ref, v1.EventTypeWarning, EventReasonListenFailed, "%s", msg)
	}
}

// handler answers every path and method of one Service's port.
func (s *ServiceHealth) handler(inst *hcInstance) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		n := inst.endpoints.Load()
		healthy := s.o.ProxyHealthy == nil || s.o.ProxyHealthy()
		body, err := serviceBody(inst.name, n, healthy)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		// kube-proxy 1.37 tells load balancers that weigh nodes how many
		// endpoints this node has.
		w.Header().Set("X-Load-Balancing-Endpoint-Weight", strconv.FormatInt(n, 10))
		if n > 0 && healthy {
			w.WriteHeader(http.StatusOK)
		} else {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		_, _ = w.Write(body)
	})
}

// serviceBody renders kube-proxy's answer byte for byte: indented with
// tabs, keys in this order, no trailing newline.
func serviceBody(name ServiceName, localEndpoints int64, healthy bool) ([]byte, error) {
	type service struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	}
	body := struct {
		Service             service `json:"service"`
		LocalEndpoints      int64   `json:"localEndpoints"`
		ServiceProxyHealthy bool    `json:"serviceProxyHealthy"`
	}{service{name.Namespace, name.Name}, localEndpoints, healthy}
	out, err := json.MarshalIndent(body, "", "\t")
	if err != nil {
		return nil, fmt.Errorf("render health check answer of %s: %w", name, err)
	}
	return out, nil
}

// Close closes every listener; later syncs open nothing.
func (s *ServiceHealth) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for name, inst := range s.services {
		inst.close()
		delete(s.services, name)
	}
}

// Listening describes one open healthCheckNodePort, for tests: they check
// which ports are open, and on which addresses, without dialing them.
type Listening struct {
	Port  int32
	Addrs []net.Addr
	// LocalEndpoints is the count the port answers with.
	LocalEndpoints int
}

// Listening lists the open healthCheckNodePorts by Service.
func (s *ServiceHealth) Listening() map[ServiceName]Listening {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[ServiceName]Listening, len(s.services))
	for name, inst := range s.services {
		out[name] = Listening{Port: inst.port, Addrs: slices.Clone(inst.addrs), LocalEndpoints: int(inst.endpoints.Load())}
	}
	return out
}

// HealthCheckNodePorts gives, per Service, its healthCheckNodePort from the
// snapshot (the field is per Service; every port carries the same value).
func HealthCheckNodePorts(snap *endpoints.Snapshot) map[ServiceName]int32 {
	out := map[ServiceName]int32{}
	for n, svc := range snap.Services {
		if svc.HealthCheckNodePort == 0 {
			continue
		}
		name := ServiceName{n.Namespace, n.Name}
		if old, ok := out[name]; !ok || svc.HealthCheckNodePort < old {
			out[name] = svc.HealthCheckNodePort
		}
	}
	return out
}

// LocalReadyEndpoints counts, per Service, its ready endpoints on this node,
// as kube-proxy does: distinct IPs over all the Service's ports (a pod
// serving ports 80 and 443 is one endpoint); terminating endpoints do not
// count even when they still serve, so that a node whose pods are all
// going away is taken out of the load balancer.
func LocalReadyEndpoints(snap *endpoints.Snapshot) map[ServiceName]int {
	ips := map[ServiceName]map[netip.Addr]bool{}
	for n, eps := range snap.Endpoints {
		for _, ep := range eps {
			if !ep.Local || !ep.Ready {
				continue
			}
			name := ServiceName{n.Namespace, n.Name}
			if ips[name] == nil {
				ips[name] = map[netip.Addr]bool{}
			}
			ips[name][ep.IP] = true
		}
	}
	out := make(map[ServiceName]int, len(ips))
	for name, set := range ips {
		out[name] = len(set)
	}
	return out
}

func sortedNames(m map[ServiceName]int32) []ServiceName {
	names := make([]ServiceName, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	slices.SortFunc(names, func(a, b ServiceName) int {
		if c := strings.Compare(a.Namespace, b.Namespace); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
	return names
}
