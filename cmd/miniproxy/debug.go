package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/endpoints"
	"github.com/miniproxy/miniproxy/pkg/explain"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// debugServer answers the operator's questions on the metrics address:
// /debug/services (the daemon's view, from which a client can explain),
// /debug/trace (an explanation from the kernel's rules) and /debug/rules
// (a Service's rules in the kernel with their counters). It learns the
// view from the syncs (onSync) and reads the kernel through the Runner at
// each request; it never touches the sync loop.
type debugServer struct {
	runner dataplane.Runner
	// addrs lists the node's addresses of both families (none when nil).
	addrs func() ([]netip.Addr, error)

	mu   sync.Mutex
	snap *endpoints.Snapshot
	cfgs map[iptables.Family]rules.Config
}

// onSync keeps the view of the last sync that built rules: its snapshot is
// what the kernel's rules were made from. Register it with
// proxy.Proxier.OnSync.
func (d *debugServer) onSync(res proxy.SyncResult) {
	if res.Snapshot == nil || res.Configs == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.snap, d.cfgs = res.Snapshot, res.Configs
}

// view gives the daemon's current view; false before the first sync.
func (d *debugServer) view() (explain.View, bool, error) {
	d.mu.Lock()
	snap, cfgs := d.snap, d.cfgs
	d.mu.Unlock()
	if snap == nil {
		return explain.View{}, false, nil
	}
	var addrs []netip.Addr
	var err error
	if d.addrs != nil {
		addrs, err = d.addrs()
	}
	if err != nil {
		return explain.View{}, true, fmt.Errorf("list the node's addresses: %w", err)
	}
	return explain.View{Snapshot: snap, Configs: cfgs, LocalAddrs: addrs}, true, nil
}

// handler adds the /debug/ endpoints to h.
func (d *debugServer) handler(h http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", h)
	mux.HandleFunc("/debug/services", d.services)
	mux.HandleFunc("/debug/trace", d.trace)
	mux.HandleFunc("/debug/rules", d.rules)
	return mux
}

// current answers 503 before the first sync, 500 when the view cannot be
// read; ok says the request may go on with v.
func (d *debugServer) current(w http.ResponseWriter) (v explain.View, ok bool) {
	v, synced, err := d.view()
	switch {
	case !synced:
		http.Error(w, "no sync yet: miniproxy has no view of the cluster", http.StatusServiceUnavailable)
		return v, false
	case err != nil:
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return v, false
	}
	return v, true
}

func (d *debugServer) services(w http.ResponseWriter, _ *http.Request) {
	v, ok := d.current(w)
	if !ok {
		return
	}
	writeJSON(w, explain.NewServices(v))
}

func (d *debugServer) trace(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	query, err := explain.ParseQuery(q.Get("src"), q.Get("dst"), q.Get("port"), q.Get("proto"), q.Get("from") == "node")
	if err != nil {
		http.Error(w, "want /debug/trace?src=A&dst=B&port=P[&proto=tcp|udp|sctp][&from=node][&iface=NAME]: "+err.Error(), http.StatusBadRequest)
		return
	}
	query.InIface = q.Get("iface")
	if _, ok := d.current(w); !ok {
		return
	}
	x, err := settledExplainer(settleAttempts, func() (explain.View, explain.Kernel, error) {
		v, _, err := d.view()
		if err != nil {
			return v, nil, err
		}
		k, err := readKernel(d.runner, v)
		return v, k, err
	})
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	e, err := x.Explain(query)
	if err != nil {
		http.Error(w, err.Error(), http.StatusUnprocessableEntity)
		return
	}
	if wantsJSON(r) {
		writeJSON(w, e)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.WriteString(w, e.Text())
}

func (d *debugServer) rules(w http.ResponseWriter, r *http.Request) {
	ns, name, ok := strings.Cut(r.URL.Query().Get("service"), "/")
	if !ok || ns == "" || name == "" {
		http.Error(w, "want /debug/rules?service=NAMESPACE/NAME", http.StatusBadRequest)
		return
	}
	v, ok := d.current(w)
	if !ok {
		return
	}
	saved := map[iptables.Family]iptables.Saved{}
	for fam := range v.Configs {
		out, err := d.runner.SaveCounters(fam)
		if err != nil {
			http.Error(w, fmt.Sprintf("read the %s rules: %v", fam, err), http.StatusInternalServerError)
			return
		}
		saved[fam] = iptables.ParseSave(string(out))
	}
	found := explain.ServiceRules(saved, endpoints.ServicePortName{Namespace: ns, Name: name})
	if len(found) == 0 && len(v.Snapshot.PortsOf(endpoints.ServicePortName{Namespace: ns, Name: name})) == 0 {
		http.Error(w, fmt.Sprintf("no Service %s/%s in miniproxy's view and no rule of it in the kernel", ns, name), http.StatusNotFound)
		return
	}
	if wantsJSON(r) {
		writeJSON(w, found)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	for _, kr := range found {
		fmt.Fprintf(w, "%s %s [%d packets, %d bytes] -A %s %s\n", kr.Family, kr.Table, kr.Packets, kr.Bytes, kr.Chain, kr.Rule)
	}
}

// readKernel reads the rules of the view's families with iptables-save.
func readKernel(r dataplane.Runner, v explain.View) (explain.Kernel, error) {
	k := explain.Kernel{}
	for fam := range v.Configs {
		out, err := r.Save(fam, "")
		if err != nil {
			return nil, fmt.Errorf("read the %s rules: %w", fam, err)
		}
		k[fam] = iptables.ParseSave(string(out)).State()
	}
	return k, nil
}

// settleAttempts and settleInterval bound how long an explanation against
// the daemon's view waits for a drift to go away: about a second.
var (
	settleAttempts = 5
	settleInterval = 200 * time.Millisecond
)

// settledExplainer reads a view and the kernel's rules with read until they
// agree, or the drift stays: a sync writes the kernel's rules a moment
// before the daemon's view follows (its listeners run once the sync is
// done), so a drift seen once is read again, every settleInterval, and only
// one still there after attempts readings (settleAttempts for the daemon's
// view, 1 for the API server's) is reported.
func settledExplainer(attempts int, read func() (explain.View, explain.Kernel, error)) (*explain.Explainer, error) {
	for attempt := 1; ; attempt++ {
		v, k, err := read()
		if err != nil {
			return nil, err
		}
		x, err := explain.New(v, k)
		if err != nil || len(x.Drift()) == 0 || attempt >= attempts {
			return x, err
		}
		time.Sleep(settleInterval)
	}
}

// wantsJSON says whether the client asked for JSON (?o=json or Accept).
func wantsJSON(r *http.Request) bool {
	return r.URL.Query().Get("o") == "json" || strings.Contains(r.Header.Get("Accept"), "application/json")
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
