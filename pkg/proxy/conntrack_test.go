package proxy

import (
	"errors"
	"net/netip"
	"testing"

	v1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// udpFlow is a client's UDP entry to the ClusterIP 10.0.0.53:80, translated
// to endpoint:8080 (an untranslated entry names the ClusterIP instead).
func udpFlow(clientPort uint16, endpoint string, port uint16) conntrack.Entry {
	return conntrack.Entry{
		Proto:    conntrack.ProtoUDP,
		OrigSrc:  netip.AddrPortFrom(client, clientPort),
		OrigDst:  netip.MustParseAddrPort("10.0.0.53:80"),
		ReplySrc: netip.AddrPortFrom(netip.MustParseAddr(endpoint), port),
		ReplyDst: netip.AddrPortFrom(client, clientPort),
	}
}

func TestConntrackIsReconciledAtStartAndAfterUDPChanges(t *testing.T) {
	table := &conntrack.Fake{}
	l := newLab(t, Options{Conntrack: table})
	l.tracker.OnServiceAdd(service("dns", "10.0.0.53", v1.ProtocolUDP))
	l.tracker.OnEndpointSliceAdd(slice("dns", "10.244.2.6", "node2", v1.ProtocolUDP))
	live := udpFlow(40001, "10.244.2.6", 8080)
	table.Add(live, udpFlow(40002, "10.244.7.7", 8080), udpFlow(40003, "10.0.0.53", 80))

	// Start-up reconciles: the flow to the serving endpoint survives (no
	// flush), the one to an endpoint that left while miniproxy was down and
	// the one never translated go.
	res := l.proxier.Sync(false)
	if res.Err != nil {
		t.Fatal(res.Err)
	}
	if len(res.Conntrack) != 1 || res.Conntrack[0].Deleted != 2 || res.Conntrack[0].Seen != 3 || res.Conntrack[0].Family != iptables.IPv4 {
		t.Errorf("first sync reconciled %+v, want 2 of 3 entries deleted", res.Conntrack)
	}
	if got := table.Entries(); len(got) != 1 || got[0] != live {
		t.Errorf("after start-up the table holds %v, want only %v", got, live)
	}

	// Nothing changed, or only the endpoints of a TCP Service: no
	// reconciliation (a new TCP Service is swept for SYNs that found no
	// rule yet: TestTCPEntriesThatMissedTheRules...).
	if res := l.proxier.Sync(false); len(res.Conntrack) != 0 {
		t.Errorf("a sync without change reconciled: %+v", res.Conntrack)
	}
	l.tracker.OnServiceAdd(service("web", "10.0.0.80", v1.ProtocolTCP))
	l.tracker.OnEndpointSliceAdd(slice("web", "10.244.2.6", "node2", v1.ProtocolTCP))
	l.proxier.Sync(false)
	l.tracker.OnEndpointSliceUpdate(nil, slice("web", "10.244.2.7", "node2", v1.ProtocolTCP))
	if res := l.proxier.Sync(false); len(res.Conntrack) != 0 {
		t.Errorf("a change of a TCP Service's endpoints reconciled: %+v", res.Conntrack)
	}

	// The UDP endpoint moves, and the first reconciliation fails: the next
	// sync retries though nothing changed since.
	l.tracker.OnEndpointSliceUpdate(nil, slice("dns", "10.244.1.5", "node1", v1.ProtocolUDP))
	table.Err = errors.New("no answer from the kernel")
	if res := l.proxier.Sync(false); len(res.Conntrack) != 1 || res.Conntrack[0].Err == nil {
		t.Errorf("the failing reconciliation should be reported: %+v", res.Conntrack)
	}
	if res := l.proxier.Sync(false); len(res.Conntrack) != 1 || res.Conntrack[0].Err != nil || res.Conntrack[0].Deleted != 1 {
		t.Errorf("the retry should delete the flow to the old endpoint: %+v", res.Conntrack)
	}
	if got := table.Entries(); len(got) != 0 {
		t.Errorf("table holds %v, want nothing", got)
	}

	// The Service is deleted: a flow still translated to its endpoint goes.
	table.Add(udpFlow(40004, "10.244.1.5", 8080))
	l.tracker.OnServiceDelete(service("dns", "10.0.0.53", v1.ProtocolUDP))
	if res := l.proxier.Sync(false); len(res.Conntrack) != 1 || res.Conntrack[0].Deleted != 1 {
		t.Errorf("deleting the Service should delete its flows: %+v", res.Conntrack)
	}
}

func TestConntrackIsLeftAloneWithoutATable(t *testing.T) {
	l := newLab(t, Options{})
	l.tracker.OnServiceAdd(service("dns", "10.0.0.53", v1.ProtocolUDP))
	l.tracker.OnEndpointSliceAdd(slice("dns", "10.244.2.6", "node2", v1.ProtocolUDP))
	if res := l.proxier.Sync(false); res.Err != nil || res.Conntrack != nil {
		t.Errorf("sync = %v, %+v", res.Err, res.Conntrack)
	}
}

// tcpSYN is a client's TCP entry to the ClusterIP 10.0.0.80:80 that was
// never translated: what a SYN leaves when it finds no rules.
func tcpSYN(clientPort uint16) conntrack.Entry {
	return conntrack.Entry{
		Proto:    conntrack.ProtoTCP,
		OrigSrc:  netip.AddrPortFrom(client, clientPort),
		OrigDst:  netip.MustParseAddrPort("10.0.0.80:80"),
		ReplySrc: netip.MustParseAddrPort("10.0.0.80:80"),
		ReplyDst: netip.AddrPortFrom(client, clientPort),
	}
}

func TestTCPEntriesThatMissedTheRulesAreDeletedAtStartForNewServicesAndAfterAFlush(t *testing.T) {
	table := &conntrack.Fake{}
	l := newLab(t, Options{Conntrack: table})
	l.tracker.OnServiceAdd(service("web", "10.0.0.80", v1.ProtocolTCP))
	l.tracker.OnEndpointSliceAdd(slice("web", "10.244.2.6", "node2", v1.ProtocolTCP))
	established := conntrack.Entry{Proto: conntrack.ProtoTCP, OrigSrc: netip.AddrPortFrom(client, 40000),
		OrigDst: netip.MustParseAddrPort("10.0.0.80:80"), ReplySrc: netip.MustParseAddrPort("10.244.2.6:8080")}

	// Start-up: the rules may have been missing before this process (a
	// node's first start, a crash): the SYN that found none goes, the
	// translated connection stays.
	table.Add(established, tcpSYN(40001))
	if res := l.proxier.Sync(false); res.Err != nil || len(res.Conntrack) != 1 || res.Conntrack[0].Deleted != 1 {
		t.Fatalf("first sync: err %v, conntrack %+v; want the untranslated SYN deleted", res.Err, res.Conntrack)
	}
	if got := table.Entries(); len(got) != 1 || got[0] != established {
		t.Errorf("after start-up the table holds %v, want only %v", got, established)
	}

	// Rules in place: a later sync does not read the TCP entries.
	table.Add(tcpSYN(40002))
	if res := l.proxier.Sync(false); len(res.Conntrack) != 0 {
		t.Errorf("a sync with the rules in place swept TCP: %+v", res.Conntrack)
	}

	// A new Service: a SYN sent to it before this sync found no rule; the
	// sync that programs it deletes that entry, and only entries to it.
	api := conntrack.Entry{Proto: conntrack.ProtoTCP, OrigSrc: netip.AddrPortFrom(client, 40003),
		OrigDst: netip.MustParseAddrPort("10.0.0.81:80"), ReplySrc: netip.MustParseAddrPort("10.0.0.81:80")}
	table.Add(api)
	l.tracker.OnServiceAdd(service("api", "10.0.0.81", v1.ProtocolTCP))
	l.tracker.OnEndpointSliceAdd(slice("api", "10.244.2.6", "node2", v1.ProtocolTCP))
	if res := l.proxier.Sync(false); len(res.Conntrack) != 1 || res.Conntrack[0].Deleted != 1 {
		t.Errorf("the sync that programs a new Service reconciled %+v, want the SYN sent to it before deleted", res.Conntrack)
	}
	if got := table.Entries(); len(got) != 2 || got[0] != established || got[1] != tcpSYN(40002) {
		t.Errorf("after the new Service the table holds %v, want %v and the untranslated entry to web, which was not new", got, established)
	}

	// Another program flushes the nat table: the sync that finds the
	// canary gone rewrites the rules and then sweeps.
	s := l.fake.State(iptables.IPv4)
	for _, c := range s["nat"] {
		c.Rules = nil
	}
	l.fake.SetState(iptables.IPv4, s)
	res := l.proxier.Sync(false)
	if res.Err != nil || len(res.Results) != 1 || res.Results[0].Reason != dataplane.ReasonCanary {
		t.Fatalf("the sync after the flush: err %v, results %+v; want a full apply for the lost canary", res.Err, res.Results)
	}
	if len(res.Conntrack) != 1 || res.Conntrack[0].Deleted != 1 {
		t.Errorf("the sync after the flush reconciled %+v, want the SYN sent meanwhile deleted", res.Conntrack)
	}
	if got := table.Entries(); len(got) != 1 || got[0] != established {
		t.Errorf("after the flush the table holds %v, want only %v", got, established)
	}
}
