package conntrack

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/miniproxy/miniproxy/pkg/endpoints"
)

var dns = endpoints.ServicePortName{Namespace: "kube-system", Name: "kube-dns", Port: "dns"}

func udpService(nodePort int32) *endpoints.ServicePort {
	return &endpoints.ServicePort{
		Name: dns, Protocol: endpoints.UDP, Port: 53, NodePort: nodePort,
		ClusterIPs: []netip.Addr{netip.MustParseAddr("10.96.0.10")},
	}
}

func ep(ip string, ready bool) endpoints.Endpoint {
	return endpoints.Endpoint{IP: netip.MustParseAddr(ip), Port: 53, Ready: ready, Serving: ready}
}

func snap(svc *endpoints.ServicePort, eps ...endpoints.Endpoint) *endpoints.Snapshot {
	s := &endpoints.Snapshot{Services: map[endpoints.ServicePortName]*endpoints.ServicePort{}, Endpoints: map[endpoints.ServicePortName][]endpoints.Endpoint{}}
	if svc != nil {
		s.Services[svc.Name] = svc
		s.Endpoints[svc.Name] = eps
	}
	return s
}

func TestStale(t *testing.T) {
	tests := []struct {
		name      string
		prev, cur *endpoints.Snapshot
		want      []string
	}{
		{
			name: "an endpoint leaves a UDP Service: its entries from the ClusterIP go",
			prev: snap(udpService(0), ep("10.244.1.5", true), ep("10.244.2.6", true)),
			cur:  snap(udpService(0), ep("10.244.2.6", true)),
			want: []string{"-p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --reply-src 10.244.1.5"},
		},
		{
			name: "an endpoint of a UDP NodePort Service leaves: ClusterIP and NodePort entries go",
			prev: snap(udpService(30053), ep("10.244.1.5", true), ep("10.244.2.6", true)),
			cur:  snap(udpService(30053), ep("10.244.2.6", true)),
			want: []string{
				"-p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --reply-src 10.244.1.5",
				"-p udp --orig-port-dst 30053 --reply-src 10.244.1.5",
			},
		},
		{
			name: "an endpoint stops being ready: it is stale too",
			prev: snap(udpService(0), ep("10.244.1.5", true), ep("10.244.2.6", true)),
			cur:  snap(udpService(0), ep("10.244.1.5", false), ep("10.244.2.6", true)),
			want: []string{"-p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --reply-src 10.244.1.5"},
		},
		{
			name: "a UDP Service gets its first endpoint: every entry to it goes",
			prev: snap(udpService(0)),
			cur:  snap(udpService(0), ep("10.244.1.5", true)),
			want: []string{"-p udp --orig-dst 10.96.0.10 --orig-port-dst 53"},
		},
		{
			name: "a UDP Service is deleted: entries to its endpoints go",
			prev: snap(udpService(0), ep("10.244.1.5", true)),
			cur:  snap(nil),
			want: []string{"-p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --reply-src 10.244.1.5"},
		},
		{
			name: "nothing changed: nothing goes",
			prev: snap(udpService(0), ep("10.244.1.5", true)),
			cur:  snap(udpService(0), ep("10.244.1.5", true)),
		},
		{
			name: "a TCP Service loses an endpoint: TCP needs no cleanup",
			prev: snap(func() *endpoints.ServicePort { s := udpService(0); s.Protocol = endpoints.TCP; return s }(), ep("10.244.1.5", true)),
			cur:  snap(nil),
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, f := range Stale(tc.prev, tc.cur) {
				got = append(got, fmt.Sprint(f))
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("stale flows (-want +got):\n%s", diff)
			}
		})
	}
}
