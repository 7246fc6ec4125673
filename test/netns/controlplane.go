package netns

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// ControlPlaneOptions says how StartControlPlane runs etcd and
// kube-apiserver. Only Address is required; the zero value of every other
// field picks what the tutorial's clusters use.
type ControlPlaneOptions struct {
	// Address is the IP of the control-plane namespace that kube-apiserver
	// binds to and advertises (it becomes the endpoint of the "kubernetes"
	// Service and the server of the kubeconfigs), e.g. 10.240.0.2. The
	// namespace must already have it, and nodes must have a route to it.
	Address netip.Addr
	// Port is the API server's secure port; 0 means 6443.
	Port int
	// ServiceCIDR is --service-cluster-ip-range; the zero Prefix means
	// 10.96.0.0/16. Its first address (10.96.0.1, the "kubernetes"
	// Service's ClusterIP) is in the serving certificate, as in real
	// clusters.
	ServiceCIDR netip.Prefix
	// SecondaryServiceCIDR, when set, is the range of the other IP family,
	// for dual-stack Services (e.g. fd00:10:96::/112).
	SecondaryServiceCIDR netip.Prefix
	// NodePortRange is --service-node-port-range, e.g. "30000-32767"; empty
	// keeps the API server's default (which is that range).
	NodePortRange string
	// APIServerBinary is the kube-apiserver to run; empty means the one
	// K8sBinaries finds or builds.
	APIServerBinary string
	// EtcdBinary is the etcd to run; empty means Debian's /usr/bin/etcd
	// (package etcd-server).
	EtcdBinary string
	// WatchProgressInterval is how often etcd tells the API server's watch
	// cache how far it is, when nothing it watches changes; 0 means 250ms.
	// Debian 12's etcd 3.4 cannot answer the API server's on-demand
	// progress requests, so until such a notification arrives the watch
	// cache lags behind writes to other resources, and watches and reads
	// that must be current wait for it (up to 3s, then fail with "Too large
	// resource version"). Short keeps the lab's reactions fast; each
	// notification costs a little CPU (at 250ms about 15% of one core for
	// etcd and the API server together, idle), so a benchmark may prefer
	// longer.
	WatchProgressInterval time.Duration
	// ExtraAPIServerArgs are appended to kube-apiserver's command line, for
	// feature gates and the like. Note that list-valued flags repeated here
	// add to the defaults instead of replacing them.
	ExtraAPIServerArgs []string
	// ControllerManager runs kube-controller-manager with only the
	// EndpointSlice controller and the garbage collector (which deletes a
	// Service's slices with the Service), so that every EndpointSlice is
	// the real controller's; no other controller runs that could fight the
	// lab's stand-in for the kubelet. Off for the benchmark, which writes
	// its own slices.
	ControllerManager bool
	// ControllerManagerBinary is the kube-controller-manager to run; empty
	// means the one K8sBinaries finds or builds.
	ControllerManagerBinary string
	// MaxEndpointsPerSlice is the controller's --max-endpoints-per-slice;
	// 0 keeps its default (100). A small value makes the controller split
	// a Service's endpoints over several slices with a handful of pods.
	MaxEndpointsPerSlice int
	// Timeout bounds the whole start-up, until /readyz answers ok; 0 means
	// 2 minutes, enough for a loaded 2-core machine.
	Timeout time.Duration
}

// ControlPlane is a running etcd and kube-apiserver in one lab namespace:
// the real API server that miniproxy (and, for comparison, upstream
// kube-proxy) watch in the lab, so the tests exercise the same API
// semantics, RBAC and watch behaviour as a real cluster.
//
// Two identities are configured with static tokens: "admin" (group
// system:masters), for the tests that write Services, EndpointSlices, Nodes
// and Pods; and "system:kube-proxy", which only the built-in
// ClusterRoleBinding system:node-proxier authorizes, so that a proxy running
// with ProxyKubeconfig proves it needs nothing more than kube-proxy's role.
type ControlPlane struct {
	lab             *Lab
	ns              *Namespace
	dir             string
	server          string
	caPEM           []byte
	adminToken      string
	proxyToken      string
	adminKubeconfig string
	proxyKubeconfig string
	etcd            *Process
	apiserver       *Process
	// apiserverCmd makes the kube-apiserver command, for every (re)start.
	apiserverCmd func() *exec.Cmd
	kcm          *Process
	client       *kubernetes.Clientset
	startup      time.Duration

	closeOnce sync.Once
	closeErr  error
}

// Identities of the static token file. The proxy user's name is what the
// built-in ClusterRoleBinding system:node-proxier binds to.
const (
	adminUser = "admin"
	proxyUser = "system:kube-proxy"
)

// etcd listens on loopback inside the control-plane namespace only: the API
// server is its sole client, and each lab has its own loopback, so labs
// never collide on these ports.
const (
	etcdClientURL = "http://127.0.0.1:2379"
	etcdPeerURL   = "http://127.0.0.1:2380"
)

// StartControlPlane starts etcd and kube-apiserver inside ns, waits until
// the API server's /readyz answers ok and the "default" namespace exists
// (checked from inside ns, never from the root namespace), and writes the
// admin and kube-proxy kubeconfigs. Certificates, keys, tokens, kubeconfigs
// and etcd's data live in a lab temp dir. The control plane is stopped and
// its files removed by Close or, at the latest, by lab.Close. On error
// nothing is left running.
func StartControlPlane(ctx context.Context, lab *Lab, ns *Namespace, opts ControlPlaneOptions) (*ControlPlane, error) {
	if ns == nil || ns.lab != lab {
		return nil, errors.New("start control plane: the namespace must belong to the lab")
	}
	if !opts.Address.IsValid() {
		return nil, errors.New("start control plane: ControlPlaneOptions.Address is required")
	}
	if opts.Port == 0 {
		opts.Port = 6443
	}
	if !opts.ServiceCIDR.IsValid() {
		opts.ServiceCIDR = netip.MustParsePrefix("10.96.0.0/16")
	}
	if opts.EtcdBinary == "" {
		opts.EtcdBinary = "/usr/bin/etcd"
	}
	if opts.WatchProgressInterval == 0 {
		opts.WatchProgressInterval = 250 * time.Millisecond
	}
	if opts.Timeout == 0 {
		opts.Timeout = 2 * time.Minute
	}
	if opts.APIServerBinary == "" || (opts.ControllerManager && opts.ControllerManagerBinary == "") {
		bins, err := K8sBinaries()
		if err != nil {
			return nil, fmt.Errorf("start control plane: %w", err)
		}
		if opts.APIServerBinary == "" {
			opts.APIServerBinary = bins.APIServer
		}
		if opts.ControllerManagerBinary == "" {
			opts.ControllerManagerBinary = bins.ControllerManager
		}
	}
	bins := []string{opts.EtcdBinary, opts.APIServerBinary}
	if opts.ControllerManager {
		bins = append(bins, opts.ControllerManagerBinary)
	}
	for _, bin := range bins {
		if _, err := os.Stat(bin); err != nil {
			return nil, fmt.Errorf("start control plane: %w", err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()

	dir, err := lab.TempDir("cp")
	if err != nil {
		return nil, fmt.Errorf("start control plane: %w", err)
	}
	cp := &ControlPlane{
		lab:    lab,
		ns:     ns,
		dir:    dir,
		server: "https://" + net.JoinHostPort(opts.Address.String(), strconv.Itoa(opts.Port)),
	}
	if err := lab.addCleanup(cp.Close); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start control plane: %w", err)
	}
	if err := cp.start(ctx, opts); err != nil {
		return nil, errors.Join(fmt.Errorf("start control plane in %s: %w", ns.name, err), cp.Close())
	}
	return cp, nil
}

// start writes the files, starts both processes and waits until the API
// server is ready.
func (cp *ControlPlane) start(ctx context.Context, opts ControlPlaneOptions) error {
	files, err := cp.writeFiles(opts)
	if err != nil {
		return err
	}
	progressFlag, err := etcdProgressFlag(ctx, opts.EtcdBinary)
	if err != nil {
		return err
	}
	etcdDir, err := cp.lab.MemoryTempDir("etcd")
	if err != nil {
		return err
	}
	began := time.Now()
	etcd := exec.Command(opts.EtcdBinary,
		"--name=lab",
		"--data-dir="+etcdDir,
		"--listen-client-urls="+etcdClientURL,
		"--advertise-client-urls="+etcdClientURL,
		"--listen-peer-urls="+etcdPeerURL,
		"--initial-advertise-peer-urls="+etcdPeerURL,
		"--initial-cluster=lab="+etcdPeerURL,
		"--initial-cluster-state=new",
		// A single member elects itself; short ticks make that quick.
		"--heartbeat-interval=50",
		"--election-timeout=500",
		"--logger=zap",
		progressFlag+"="+opts.WatchProgressInterval.String(),
	)
	etcd.Env = CleanEnv()
	if cp.etcd, err = cp.ns.StartCmd(etcd); err != nil {
		return err
	}
	// The API server retries etcd until it answers, so both start at once.
	args := []string{
		"--etcd-servers=" + etcdClientURL,
		"--bind-address=" + opts.Address.String(),
		"--advertise-address=" + opts.Address.String(),
		"--secure-port=" + strconv.Itoa(opts.Port),
		"--service-cluster-ip-range=" + joinPrefixes(opts.serviceCIDRs()),
		"--cert-dir=" + filepath.Join(cp.dir, "apiserver-certs"),
		"--tls-cert-file=" + files.cert,
		"--tls-private-key-file=" + files.key,
		"--client-ca-file=" + files.ca,
		"--token-auth-file=" + files.tokens,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + files.saPub,
		"--service-account-signing-key-file=" + files.saKey,
		// No service account controller runs (kube-controller-manager, when
		// it runs, has only the EndpointSlice controller and the garbage
		// collector), so nothing creates "default" service accounts:
		// without this, the lab could not write Pods.
		"--disable-admission-plugins=ServiceAccount",
		// One client (the tests) and a handful of proxies: flow control
		// only slows start-up and the benchmark's bulk writes.
		"--enable-priority-and-fairness=false",
		"--max-requests-inflight=1000",
		"--max-mutating-requests-inflight=500",
		"--profiling=false",
		// As kubeadm does: the proxies' DaemonSets (kube-proxy's, deploy/'s)
		// are privileged, and the manifests are validated against this server.
		"--allow-privileged=true",
	}
	if opts.NodePortRange != "" {
		args = append(args, "--service-node-port-range="+opts.NodePortRange)
	}
	args = append(args, opts.ExtraAPIServerArgs...)
	cp.apiserverCmd = func() *exec.Cmd {
		c := exec.Command(opts.APIServerBinary, args...)
		c.Env = CleanEnv()
		return c
	}
	if err := cp.StartAPIServer(ctx); err != nil {
		return err
	}
	if opts.ControllerManager {
		if err := cp.startControllerManager(ctx, opts.ControllerManagerBinary, opts.MaxEndpointsPerSlice); err != nil {
			return err
		}
	}
	cp.startup = time.Since(began)
	cp.client, err = kubernetes.NewForConfig(cp.AdminConfig(cp.ns))
	if err != nil {
		return fmt.Errorf("admin clientset: %w", err)
	}
	return nil
}

// KillAPIServer kills kube-apiserver at once (SIGKILL), as a crash or a
// lost control-plane machine would; etcd and everything else stay.
func (cp *ControlPlane) KillAPIServer() error {
	if cp.apiserver == nil {
		return nil
	}
	if err := syscall.Kill(-cp.apiserver.Pid(), syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill kube-apiserver: %w", err)
	}
	<-cp.apiserver.Done()
	return nil
}

// StartAPIServer starts kube-apiserver with the control plane's arguments
// and waits until it is ready: at start, and again after KillAPIServer.
func (cp *ControlPlane) StartAPIServer(ctx context.Context) error {
	p, err := cp.ns.StartCmd(cp.apiserverCmd())
	if err != nil {
		return err
	}
	cp.apiserver = p
	return cp.waitReady(ctx)
}

// startControllerManager runs kube-controller-manager as admin with the
// EndpointSlice controller and the garbage collector only, and waits until
// the EndpointSlice controller has started.
func (cp *ControlPlane) startControllerManager(ctx context.Context, bin string, maxPerSlice int) error {
	args := []string{
		"--kubeconfig=" + cp.adminKubeconfig,
		"--controllers=endpointslice-controller,garbage-collector-controller",
		"--leader-elect=false",
		// Nothing scrapes it; serving would need its own certificates.
		"--secure-port=0",
	}
	if maxPerSlice > 0 {
		args = append(args, "--max-endpoints-per-slice="+strconv.Itoa(maxPerSlice))
	}
	kcm := exec.Command(bin, args...)
	kcm.Env = CleanEnv()
	var err error
	if cp.kcm, err = cp.ns.StartCmd(kcm); err != nil {
		return err
	}
	if err := cp.kcm.WaitForOutput(ctx, endpointSliceControllerStarted); err != nil {
		return fmt.Errorf("kube-controller-manager did not start its EndpointSlice controller: %w\n%s", err, tail(cp.kcm.Output(), 8<<10))
	}
	return nil
}

// endpointSliceControllerStarted is what kube-controller-manager logs once
// the EndpointSlice controller runs.
const endpointSliceControllerStarted = "Starting endpoint slice controller"

// cpFiles are the paths of the files the processes read.
type cpFiles struct {
	ca, cert, key, saKey, saPub, tokens string
}

// writeFiles generates the CA, the serving certificate, the service-account
// key pair and the tokens, and writes them and the two kubeconfigs.
func (cp *ControlPlane) writeFiles(opts ControlPlaneOptions) (cpFiles, error) {
	f := cpFiles{
		ca:     filepath.Join(cp.dir, "ca.crt"),
		cert:   filepath.Join(cp.dir, "apiserver.crt"),
		key:    filepath.Join(cp.dir, "apiserver.key"),
		saKey:  filepath.Join(cp.dir, "sa.key"),
		saPub:  filepath.Join(cp.dir, "sa.pub"),
		tokens: filepath.Join(cp.dir, "tokens.csv"),
	}
	ips := []netip.Addr{opts.Address, netip.MustParseAddr("127.0.0.1")}
	for _, p := range opts.serviceCIDRs() {
		ips = append(ips, p.Masked().Addr().Next())
	}
	pki, err := newPKI(ips, []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc",
		"kubernetes.default.svc.cluster.local", "localhost"})
	if err != nil {
		return f, err
	}
	cp.caPEM = pki.caPEM
	if cp.adminToken, err = randomToken(); err != nil {
		return f, err
	}
	if cp.proxyToken, err = randomToken(); err != nil {
		return f, err
	}
	// token,user,uid,"group1,group2"
	tokens := fmt.Sprintf("%s,%s,%s,\"system:masters\"\n%s,%s,%s\n",
		cp.adminToken, adminUser, adminUser, cp.proxyToken, proxyUser, proxyUser)
	cp.adminKubeconfig = filepath.Join(cp.dir, "admin.kubeconfig")
	cp.proxyKubeconfig = filepath.Join(cp.dir, "kube-proxy.kubeconfig")
	for _, w := range []struct {
		path string
		data []byte
	}{
		{f.ca, pki.caPEM},
		{f.cert, pki.certPEM},
		{f.key, pki.keyPEM},
		{f.saKey, pki.saKeyPEM},
		{f.saPub, pki.saPubPEM},
		{f.tokens, []byte(tokens)},
		{cp.adminKubeconfig, kubeconfig(cp.server, pki.caPEM, adminUser, cp.adminToken)},
		{cp.proxyKubeconfig, kubeconfig(cp.server, pki.caPEM, "kube-proxy", cp.proxyToken)},
	} {
		if err := os.WriteFile(w.path, w.data, 0o600); err != nil {
			return f, fmt.Errorf("write control-plane file: %w", err)
		}
	}
	return f, nil
}

// waitReady polls /readyz, then the "default" namespace (the bootstrap
// controller creates it shortly after start), from inside the namespace,
// and fails early if either process exits.
func (cp *ControlPlane) waitReady(ctx context.Context) error {
	client := cp.httpClient(cp.ns, 2*time.Second)
	var last string
	for _, path := range []string{"/readyz", "/api/v1/namespaces/default"} {
		for {
			status, body, err := cp.get(ctx, client, path)
			if err == nil && status == http.StatusOK {
				break
			}
			if err != nil {
				last = err.Error()
			} else {
				last = fmt.Sprintf("status %d: %s", status, strings.TrimSpace(body))
			}
			select {
			case <-cp.etcd.Done():
				return fmt.Errorf("etcd exited (%v):\n%s", cp.etcd.Err(), tail(cp.etcd.Output(), 4<<10))
			case <-cp.apiserver.Done():
				return fmt.Errorf("kube-apiserver exited (%v):\n%s", cp.apiserver.Err(), tail(cp.apiserver.Output(), 8<<10))
			case <-ctx.Done():
				return fmt.Errorf("wait for %s%s: %w (last answer: %s)\nkube-apiserver output:\n%s\netcd output:\n%s",
					cp.server, path, ctx.Err(), last,
					tail(cp.apiserver.Output(), 8<<10), tail(cp.etcd.Output(), 4<<10))
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

// get fetches path from the API server as admin.
func (cp *ControlPlane) get(ctx context.Context, client *http.Client, path string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, cp.server+path, nil)
	if err != nil {
		return 0, "", fmt.Errorf("GET %s: %w", path, err)
	}
	req.Header.Set("Authorization", "Bearer "+cp.adminToken)
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return resp.StatusCode, string(b), fmt.Errorf("GET %s: read body: %w", path, err)
	}
	return resp.StatusCode, string(b), nil
}

// httpClient returns a client that trusts the lab CA and connects from
// inside from.
func (cp *ControlPlane) httpClient(from *Namespace, timeout time.Duration) *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cp.caPEM)
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			Proxy:             nil,
			DialContext:       from.DialContext,
			TLSClientConfig:   &tls.Config{RootCAs: pool},
			DisableKeepAlives: true,
		},
	}
}

// Server returns the API server's URL, e.g. https://10.240.0.2:6443, the
// server of both kubeconfigs.
func (cp *ControlPlane) Server() string { return cp.server }

// CAPEM returns the PEM certificate of the lab CA that signed the API
// server's serving certificate, for clients configured by hand.
func (cp *ControlPlane) CAPEM() []byte { return bytes.Clone(cp.caPEM) }

// AdminKubeconfig returns the path of a kubeconfig for the admin identity
// (group system:masters), for kubectl and tools that take --kubeconfig.
func (cp *ControlPlane) AdminKubeconfig() string { return cp.adminKubeconfig }

// ProxyKubeconfig returns the path of a kubeconfig for the identity
// system:kube-proxy, which only the built-in system:node-proxier role
// authorizes: give it to miniproxy (or kube-proxy) with --kubeconfig.
func (cp *ControlPlane) ProxyKubeconfig() string { return cp.proxyKubeconfig }

// StartupTime returns how long etcd and kube-apiserver took from being
// started until the API server was ready, to report and watch start-up
// cost.
func (cp *ControlPlane) StartupTime() time.Duration { return cp.startup }

// APIServer returns the kube-apiserver process, for its output and to stop
// it in tests of what a proxy does when the API server goes away.
func (cp *ControlPlane) APIServer() *Process { return cp.apiserver }

// Etcd returns the etcd process, for its output.
func (cp *ControlPlane) Etcd() *Process { return cp.etcd }

// AdminConfig returns a client-go configuration for the admin identity
// whose connections are opened from inside the namespace from, so that the
// test process talks to the API server without the root namespace ever
// sending to a lab address. Environment proxy settings are ignored. Each
// call returns a new Config the caller may change.
func (cp *ControlPlane) AdminConfig(from *Namespace) *rest.Config {
	return cp.restConfig(from, cp.adminToken)
}

// ProxyConfig is AdminConfig for the identity system:kube-proxy, to check
// what a proxy may and may not do.
func (cp *ControlPlane) ProxyConfig(from *Namespace) *rest.Config {
	return cp.restConfig(from, cp.proxyToken)
}

func (cp *ControlPlane) restConfig(from *Namespace, token string) *rest.Config {
	return &rest.Config{
		Host:            cp.server,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: bytes.Clone(cp.caPEM)},
		Dial:            from.DialContext,
		Proxy:           func(*http.Request) (*url.URL, error) { return nil, nil },
		UserAgent:       "miniproxy-lab",
		// The API server's deprecation warnings (externalIPs, PreferClose)
		// are about fields the tests set on purpose.
		WarningHandler: rest.NoWarnings{},
		QPS:            100,
		Burst:          200,
		Timeout:        30 * time.Second,
	}
}

// Client returns a clientset for the admin identity whose connections start
// in the control-plane namespace, for tests that write Services,
// EndpointSlices, Nodes and Pods.
func (cp *ControlPlane) Client() *kubernetes.Clientset { return cp.client }

// Kubectl runs "kubectl --kubeconfig <admin kubeconfig> args..." as a
// process inside ns (which needs a route to the API server), as the
// tutorial's reader would on a machine of the cluster, and returns its
// stdout; an error quotes stderr. Environment proxy settings are dropped, and
// kubectl's cache goes to the lab's temp dir instead of $HOME.
func (cp *ControlPlane) Kubectl(ctx context.Context, ns *Namespace, args ...string) (string, error) {
	bins, err := K8sBinaries()
	if err != nil {
		return "", fmt.Errorf("run kubectl: %w", err)
	}
	bin := bins.Kubectl
	full := append([]string{"--kubeconfig=" + cp.adminKubeconfig, "--cache-dir=" + filepath.Join(cp.dir, "kubectl-cache")}, args...)
	cmd := exec.CommandContext(ctx, bin, full...)
	cmd.Env = append(CleanEnv(), "HOME="+cp.dir)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	if err := ns.Do(cmd.Start); err != nil {
		return "", fmt.Errorf("run kubectl in %s: %w", ns.name, err)
	}
	if err := cmd.Wait(); err != nil {
		return so.String(), fmt.Errorf("kubectl %s in %s: %w: %s", strings.Join(args, " "), ns.name, err, strings.TrimSpace(se.String()))
	}
	return so.String(), nil
}

// Close stops kube-controller-manager, kube-apiserver, then etcd, and
// removes the control plane's files. It is idempotent; Lab.Close calls it
// too.
func (cp *ControlPlane) Close() error {
	cp.closeOnce.Do(func() {
		var errs []error
		for _, p := range []*Process{cp.kcm, cp.apiserver, cp.etcd} {
			if p != nil {
				if err := p.Stop(); err != nil {
					errs = append(errs, err)
				}
			}
		}
		if err := os.RemoveAll(cp.dir); err != nil {
			errs = append(errs, fmt.Errorf("close control plane: %w", err))
		}
		cp.closeErr = errors.Join(errs...)
	})
	return cp.closeErr
}

// NewControlPlane is StartControlPlane for tests: it skips the test when no
// kube-apiserver is available (not in the cache and it cannot be built, see
// K8sBinaries), and fails it when the control plane does not start.
func NewControlPlane(t testing.TB, lab *Lab, ns *Namespace, opts ControlPlaneOptions) *ControlPlane {
	t.Helper()
	if opts.APIServerBinary == "" {
		bins, err := K8sBinaries()
		if err != nil {
			t.Skipf("no kube-apiserver for the lab (run `make k8s-binaries`): %v", err)
		}
		opts.APIServerBinary = bins.APIServer
	}
	cp, err := StartControlPlane(context.Background(), lab, ns, opts)
	if err != nil {
		t.Fatal(err)
	}
	return cp
}

// K8sBinaryPaths are the paths of the Kubernetes binaries that
// scripts/build-k8s.sh builds.
type K8sBinaryPaths struct {
	// APIServer is kube-apiserver, the lab's API server.
	APIServer string
	// KubeProxy is upstream kube-proxy, the benchmark's baseline.
	KubeProxy string
	// ControllerManager is kube-controller-manager, whose EndpointSlice
	// controller writes the lab's EndpointSlices.
	ControllerManager string
	// Kubectl is kubectl of the same release, so that nothing depends on
	// a kubectl the machine may or may not have.
	Kubectl string
}

var k8sBinaries struct {
	once  sync.Once
	paths K8sBinaryPaths
	err   error
}

// K8sBinaries returns kube-apiserver, kube-proxy and kube-controller-manager
// at the release pinned in
// test/tools/go.mod, from the per-machine cache outside the checkout
// (MINIPROXY_K8S_CACHE, default /var/cache/miniproxy), by running
// scripts/build-k8s.sh of the module containing the working directory: that
// is instant when they are cached and takes several minutes when it has to
// build them. The script runs once per process; its progress goes to stderr.
func K8sBinaries() (K8sBinaryPaths, error) {
	k8sBinaries.once.Do(func() {
		k8sBinaries.paths, k8sBinaries.err = findK8sBinaries()
	})
	return k8sBinaries.paths, k8sBinaries.err
}

func findK8sBinaries() (K8sBinaryPaths, error) {
	var p K8sBinaryPaths
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return p, fmt.Errorf("find kubernetes binaries: find module: %w", err)
	}
	modFile := strings.TrimSpace(string(gomod))
	if modFile == "" || modFile == os.DevNull {
		return p, errors.New("find kubernetes binaries: working directory is not inside a Go module")
	}
	script := filepath.Join(filepath.Dir(modFile), "scripts", "build-k8s.sh")
	cmd := exec.Command(script)
	var stderr tailBuffer
	stderr.max = 4 << 10
	cmd.Stderr = io.MultiWriter(os.Stderr, &stderr)
	out, err := cmd.Output()
	if err != nil {
		return p, fmt.Errorf("find kubernetes binaries: %s: %w: %s", script, err, strings.TrimSpace(stderr.String()))
	}
	lines := strings.Fields(string(out))
	if len(lines) != 4 {
		return p, fmt.Errorf("find kubernetes binaries: %s printed %q, want four paths", script, out)
	}
	p.APIServer, p.KubeProxy, p.ControllerManager, p.Kubectl = lines[0], lines[1], lines[2], lines[3]
	return p, nil
}

// etcdVersionRE finds the version in "etcd --version" output.
var etcdVersionRE = regexp.MustCompile(`etcd Version: 3\.(\d+)\.`)

// etcdProgressFlag returns the name of etcd's flag for the watch progress
// notification interval, which lost its "experimental-" prefix in 3.6.
func etcdProgressFlag(ctx context.Context, etcd string) (string, error) {
	out, err := exec.CommandContext(ctx, etcd, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", etcd, err)
	}
	m := etcdVersionRE.FindSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("%s --version: no etcd 3.x version in %q", etcd, out)
	}
	if minor, _ := strconv.Atoi(string(m[1])); minor >= 6 {
		return "--watch-progress-notify-interval", nil
	}
	return "--experimental-watch-progress-notify-interval", nil
}

// CleanEnv is this process's environment without HTTP proxy settings
// (which must never apply to lab addresses), etcd settings and KUBECONFIG,
// for the processes a lab runs.
func CleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch lk := strings.ToLower(k); {
		case lk == "http_proxy", lk == "https_proxy", lk == "no_proxy", lk == "all_proxy":
		case strings.HasPrefix(k, "ETCD"), k == "KUBECONFIG":
		default:
			env = append(env, kv)
		}
	}
	return env
}

// serviceCIDRs returns the service ranges, primary first.
func (o ControlPlaneOptions) serviceCIDRs() []netip.Prefix {
	ps := []netip.Prefix{o.ServiceCIDR}
	if o.SecondaryServiceCIDR.IsValid() {
		ps = append(ps, o.SecondaryServiceCIDR)
	}
	return ps
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.Masked().String()
	}
	return strings.Join(s, ",")
}

// tail returns the last n bytes of s.
func tail(s string, n int) string {
	if len(s) > n {
		return "...\n" + s[len(s)-n:]
	}
	return s
}

func randomToken() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("random token: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// kubeconfig renders a kubeconfig for one user authenticated by token.
func kubeconfig(server string, caPEM []byte, user, token string) []byte {
	return fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    token: %s
contexts:
- name: lab
  context:
    cluster: lab
    user: %s
current-context: lab
`, server, base64.StdEncoding.EncodeToString(caPEM), user, token, user)
}

// pki is the key material of one control plane, PEM-encoded.
type pki struct {
	caPEM, certPEM, keyPEM, saKeyPEM, saPubPEM []byte
}

// newPKI makes a CA, a serving certificate for ips and dnsNames signed by
// it, and the service-account signing key pair. ECDSA P-256 keys, because
// they are generated in microseconds, unlike RSA ones.
func newPKI(ips []netip.Addr, dnsNames []string) (*pki, error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "miniproxy-lab-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("create CA certificate: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, fmt.Errorf("parse CA certificate: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate serving key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(30 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dnsNames,
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.IP(ip.AsSlice()))
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("create serving certificate: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode serving key: %w", err)
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate service-account key: %w", err)
	}
	saDER, err := x509.MarshalECPrivateKey(saKey)
	if err != nil {
		return nil, fmt.Errorf("encode service-account key: %w", err)
	}
	saPubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("encode service-account public key: %w", err)
	}
	enc := func(typ string, der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}) }
	return &pki{
		caPEM:    enc("CERTIFICATE", caDER),
		certPEM:  enc("CERTIFICATE", der),
		keyPEM:   enc("EC PRIVATE KEY", keyDER),
		saKeyPEM: enc("EC PRIVATE KEY", saDER),
		saPubPEM: enc("PUBLIC KEY", saPubDER),
	}, nil
}
