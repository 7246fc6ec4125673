package main

import "testing"

func TestParseNFTCountsRulesAndDNATs(t *testing.T) {
	list := `table ip kube-proxy {
	comment "rules for kube-proxy"
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
		elements = { 10.96.0.1 . tcp . 80 : goto service-ABCD-bench/svc-00001/tcp/ }
	}
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}
	chain services {
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
	chain endpoint-A-bench/svc-00001/tcp/__10.248.0.2/8080 {
		ip saddr 10.248.0.2 jump mark-for-masquerade
		meta l4proto tcp dnat ip to 10.248.0.2:8080
	}
	chain endpoint-B-bench/svc-00001/tcp/__10.250.0.2/8080 {
		meta l4proto tcp dnat to 10.250.0.2:8080
	}
	chain service-C-bench/svc-00002/tcp/ {
		ip daddr 10.96.0.2 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
		meta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.248.0.3 . 8080, 1 : 10.250.0.3 . 8080 }
	}
}
`
	tb := parseNFT(list)
	if tb.chains != 5 || tb.rules != 7 {
		t.Errorf("chains, rules = %d, %d; want 5, 7", tb.chains, tb.rules)
	}
	for _, ep := range []string{"10.248.0.2:8080", "10.250.0.2:8080", "10.248.0.3:8080", "10.250.0.3:8080"} {
		if !tb.dnats[ep] {
			t.Errorf("no DNAT to %s in %v", ep, tb.dnats)
		}
	}
	if len(tb.dnats) != 4 {
		t.Errorf("dnats = %v", tb.dnats)
	}
}
