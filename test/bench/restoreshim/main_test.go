package main

import (
	"reflect"
	"testing"
)

func TestCountNFTTransaction(t *testing.T) {
	input := `add table ip kube-proxy { comment "rules for kube-proxy" ; }
add chain ip kube-proxy service-ABCD-bench/svc-00001/tcp/
flush chain ip kube-proxy service-ABCD-bench/svc-00001/tcp/
add rule ip kube-proxy service-ABCD-bench/svc-00001/tcp/ ip daddr 10.96.0.1 tcp dport 80 numgen random mod 2 vmap { 0 : goto endpoint-A , 1 : goto endpoint-B }
add rule ip kube-proxy endpoint-A meta l4proto tcp dnat to 10.248.0.2:8080
add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 80 : goto service-ABCD-bench/svc-00001/tcp/ }
delete chain ip kube-proxy endpoint-OLD
add table ip6 kube-proxy
`
	var rec Record
	countNFT(&rec, []byte(input))
	want := Record{Lines: 8, Rules: 2, Chains: 1, Deletes: 2, DNAT: 1, Elements: 1, Tables: []string{"ip kube-proxy", "ip6 kube-proxy"}}
	if !reflect.DeepEqual(rec, want) {
		t.Errorf("countNFT:\n got %+v\nwant %+v", rec, want)
	}
}

func TestCountRestore(t *testing.T) {
	input := "*nat\n:MP-SERVICES - [0:0]\n-A MP-SERVICES -d 10.96.0.1/32 -j DNAT --to-destination 10.248.0.2:8080\n-X MP-OLD\nCOMMIT\n"
	var rec Record
	countRestore(&rec, []byte(input))
	want := Record{Lines: 5, Rules: 1, Chains: 1, Deletes: 1, DNAT: 1, Tables: []string{"nat"}}
	if !reflect.DeepEqual(rec, want) {
		t.Errorf("countRestore:\n got %+v\nwant %+v", rec, want)
	}
}
