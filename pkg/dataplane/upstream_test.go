package dataplane

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/rules"
)

// kubeletInput is what a kubelet of 1.28 or later keeps in a node's tables
// (pkg/kubelet/kubelet_network_linux.go): the KUBE-IPTABLES-HINT chain, its
// canary in the three tables and, for IPv4 only, KUBE-FIREWALL with the
// martian-packet guard and the jumps to it. The IPv4 tables also hold
// KUBE-MARK-DROP with its rule, as kubelets before 1.28 left it on nodes
// upgraded in place. None of it may be touched by CleanupKubeProxy.
func kubeletInput(family iptables.Family) string {
	if family == iptables.IPv6 {
		return dedent(`
			*mangle
			:KUBE-IPTABLES-HINT - [0:0]
			:KUBE-KUBELET-CANARY - [0:0]
			COMMIT
			*nat
			:KUBE-KUBELET-CANARY - [0:0]
			COMMIT
			*filter
			:KUBE-KUBELET-CANARY - [0:0]
			COMMIT
			`)
	}
	return dedent(`
		*mangle
		:KUBE-IPTABLES-HINT - [0:0]
		:KUBE-KUBELET-CANARY - [0:0]
		COMMIT
		*nat
		:KUBE-KUBELET-CANARY - [0:0]
		:KUBE-MARK-DROP - [0:0]
		-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000
		COMMIT
		*filter
		:KUBE-FIREWALL - [0:0]
		:KUBE-KUBELET-CANARY - [0:0]
		-A INPUT -j KUBE-FIREWALL
		-A OUTPUT -j KUBE-FIREWALL
		-A KUBE-FIREWALL -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
		COMMIT
		`)
}

// otherProgramsInput is what a CNI plugin and a network policy agent keep
// on a node: flannel's masquerade and forward chains, the portmap plugin's
// host-port DNAT, and chains whose names start with KUBE- but belong to
// kube-router. CleanupKubeProxy must leave all of it alone.
func otherProgramsInput(family iptables.Family) string {
	pods, host, multicast := "10.244.0.0/16", "10.244.1.7", "224.0.0.0/4"
	if family == iptables.IPv6 {
		pods, host, multicast = "fd00:244::/56", "fd00:244:0:1::7", "ff00::/8"
	}
	dnat := host + ":8080"
	if family == iptables.IPv6 {
		dnat = "[" + host + "]:8080"
	}
	return dedent(`
		*nat
		:FLANNEL-POSTRTG - [0:0]
		:CNI-HOSTPORT-DNAT - [0:0]
		:CNI-DN-0c1f2d3e4a5b6c7d8e9f0 - [0:0]
		-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
		-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
		-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
		-A FLANNEL-POSTRTG -s ` + pods + ` -d ` + pods + ` -m comment --comment "flanneld masq" -j RETURN
		-A FLANNEL-POSTRTG -s ` + pods + ` ! -d ` + multicast + ` -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
		-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"0c1f2d3e\"" -m multiport --dports 8080 -j CNI-DN-0c1f2d3e4a5b6c7d8e9f0
		-A CNI-DN-0c1f2d3e4a5b6c7d8e9f0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination ` + dnat + `
		COMMIT
		*filter
		:FLANNEL-FWD - [0:0]
		:KUBE-ROUTER-INPUT - [0:0]
		:KUBE-POD-FW-ABCDEFGHIJKLMNOP - [0:0]
		:KUBE-NWPLCY-DEFAULT - [0:0]
		-A INPUT -m comment --comment "kube-router netpol" -j KUBE-ROUTER-INPUT
		-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
		-A FLANNEL-FWD -s ` + pods + ` -m comment --comment "flanneld forward" -j ACCEPT
		-A FLANNEL-FWD -d ` + pods + ` -m comment --comment "flanneld forward" -j ACCEPT
		-A KUBE-ROUTER-INPUT -s ` + host + ` -j KUBE-POD-FW-ABCDEFGHIJKLMNOP
		-A KUBE-POD-FW-ABCDEFGHIJKLMNOP -j KUBE-NWPLCY-DEFAULT
		-A KUBE-NWPLCY-DEFAULT -j MARK --set-xmark 0x10000/0x10000
		COMMIT
		`)
}

// kubeProxyInput is what upstream kube-proxy 1.37 in iptables mode writes
// on a node of the tutorial's cluster, in iptables-save's own spelling:
// the API server's Service, kube-dns (two endpoints, UDP and TCP), the
// tutorial's NodePort Service with externalTrafficPolicy Local (KUBE-EXT-
// and KUBE-SVL-), a load balancer with loadBalancerSourceRanges (KUBE-FW-)
// and session affinity, a Service without endpoints (REJECT in filter),
// its canary in mangle, nat and filter, and the jumps it prepends to the
// built-in chains. The IPv4 tables also hold what kube-proxy 1.23 left on
// a node upgraded in place: a KUBE-XLB- chain and a KUBE-FW- chain that
// jumps to the kubelet's KUBE-MARK-DROP.
//
// It is applied with -I so that kube-proxy's jumps come first, as
// kube-proxy's own "prepend if missing" leaves them.
func kubeProxyInput(family iptables.Family) string {
	if family == iptables.IPv6 {
		return dedent(`
			*mangle
			:KUBE-PROXY-CANARY - [0:0]
			COMMIT
			*nat
			:KUBE-SERVICES - [0:0]
			:KUBE-NODEPORTS - [0:0]
			:KUBE-POSTROUTING - [0:0]
			:KUBE-MARK-MASQ - [0:0]
			:KUBE-PROXY-CANARY - [0:0]
			:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
			:KUBE-SEP-6E7XQMQ4RAYOWTTM - [0:0]
			-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
			-I OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
			-I POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
			-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
			-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
			-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
			-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
			-A KUBE-SERVICES -d fd00:96::a/128 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
			-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
			-A KUBE-SVC-TCOU7JCQXEZGVUNU ! -s fd00:244::/56 -d fd00:96::a/128 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-MARK-MASQ
			-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "kube-system/kube-dns:dns -> [fd00:244::2]:53" -j KUBE-SEP-6E7XQMQ4RAYOWTTM
			-A KUBE-SEP-6E7XQMQ4RAYOWTTM -s fd00:244::2/128 -m comment --comment "kube-system/kube-dns:dns" -j KUBE-MARK-MASQ
			-A KUBE-SEP-6E7XQMQ4RAYOWTTM -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp -j DNAT --to-destination [fd00:244::2]:53
			COMMIT
			*filter
			:KUBE-SERVICES - [0:0]
			:KUBE-EXTERNAL-SERVICES - [0:0]
			:KUBE-NODEPORTS - [0:0]
			:KUBE-FORWARD - [0:0]
			:KUBE-PROXY-FIREWALL - [0:0]
			:KUBE-PROXY-CANARY - [0:0]
			-I INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
			-I INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
			-I INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
			-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
			-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
			-I FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
			-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
			-I OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
			-I OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
			-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
			-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
			-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
			COMMIT
			`)
	}
	return dedent(`
		*mangle
		:KUBE-PROXY-CANARY - [0:0]
		COMMIT
		*nat
		:KUBE-SERVICES - [0:0]
		:KUBE-NODEPORTS - [0:0]
		:KUBE-POSTROUTING - [0:0]
		:KUBE-MARK-MASQ - [0:0]
		:KUBE-PROXY-CANARY - [0:0]
		:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
		:KUBE-SEP-WXWGHGKZOCNYRYI7 - [0:0]
		:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
		:KUBE-SEP-6E7XQMQ4RAYOWTTM - [0:0]
		:KUBE-SEP-N4G2XR5TDX7PQE7P - [0:0]
		:KUBE-SVC-ERIFXISQEP7F7OF4 - [0:0]
		:KUBE-SEP-ZXMNUKOKXUTL2MK2 - [0:0]
		:KUBE-SEP-ZP3FB6NMPNCO4VBJ - [0:0]
		:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
		:KUBE-SVL-XPGD46QRK7WJZT7O - [0:0]
		:KUBE-EXT-XPGD46QRK7WJZT7O - [0:0]
		:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
		:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
		:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
		:KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
		:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
		:KUBE-XLB-OLDSVCFROM1X23AB - [0:0]
		:KUBE-FW-OLDSVCFROM1X23AB - [0:0]
		-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
		-I OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
		-I POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
		-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
		-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
		-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
		-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
		-A KUBE-NODEPORTS -p tcp -m comment --comment "default/source-ip-app" -m tcp --dport 31021 -j KUBE-EXT-XPGD46QRK7WJZT7O
		-A KUBE-NODEPORTS -p tcp -m comment --comment "default/loadbalancer" -m tcp --dport 30417 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
		-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
		-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
		-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp cluster IP" -m tcp --dport 53 -j KUBE-SVC-ERIFXISQEP7F7OF4
		-A KUBE-SERVICES -d 10.96.122.57/32 -p tcp -m comment --comment "default/source-ip-app cluster IP" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
		-A KUBE-SERVICES -d 10.96.40.12/32 -p tcp -m comment --comment "default/loadbalancer cluster IP" -m tcp --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
		-A KUBE-SERVICES -d 203.0.113.140/32 -p tcp -m comment --comment "default/loadbalancer loadbalancer IP" -m tcp --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
		-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
		-A KUBE-SVC-NPX46M4PTMTKRN6Y ! -s 10.244.0.0/16 -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-MARK-MASQ
		-A KUBE-SVC-NPX46M4PTMTKRN6Y -m comment --comment "default/kubernetes:https -> 10.240.0.2:6443" -j KUBE-SEP-WXWGHGKZOCNYRYI7
		-A KUBE-SEP-WXWGHGKZOCNYRYI7 -s 10.240.0.2/32 -m comment --comment "default/kubernetes:https" -j KUBE-MARK-MASQ
		-A KUBE-SEP-WXWGHGKZOCNYRYI7 -p tcp -m comment --comment "default/kubernetes:https" -m tcp -j DNAT --to-destination 10.240.0.2:6443
		-A KUBE-SVC-TCOU7JCQXEZGVUNU ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-MARK-MASQ
		-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "kube-system/kube-dns:dns -> 10.244.0.2:53" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-6E7XQMQ4RAYOWTTM
		-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "kube-system/kube-dns:dns -> 10.244.0.3:53" -j KUBE-SEP-N4G2XR5TDX7PQE7P
		-A KUBE-SEP-6E7XQMQ4RAYOWTTM -s 10.244.0.2/32 -m comment --comment "kube-system/kube-dns:dns" -j KUBE-MARK-MASQ
		-A KUBE-SEP-6E7XQMQ4RAYOWTTM -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp -j DNAT --to-destination 10.244.0.2:53
		-A KUBE-SEP-N4G2XR5TDX7PQE7P -s 10.244.0.3/32 -m comment --comment "kube-system/kube-dns:dns" -j KUBE-MARK-MASQ
		-A KUBE-SEP-N4G2XR5TDX7PQE7P -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp -j DNAT --to-destination 10.244.0.3:53
		-A KUBE-SVC-ERIFXISQEP7F7OF4 ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp cluster IP" -m tcp --dport 53 -j KUBE-MARK-MASQ
		-A KUBE-SVC-ERIFXISQEP7F7OF4 -m comment --comment "kube-system/kube-dns:dns-tcp -> 10.244.0.2:53" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-ZXMNUKOKXUTL2MK2
		-A KUBE-SVC-ERIFXISQEP7F7OF4 -m comment --comment "kube-system/kube-dns:dns-tcp -> 10.244.0.3:53" -j KUBE-SEP-ZP3FB6NMPNCO4VBJ
		-A KUBE-SEP-ZXMNUKOKXUTL2MK2 -s 10.244.0.2/32 -m comment --comment "kube-system/kube-dns:dns-tcp" -j KUBE-MARK-MASQ
		-A KUBE-SEP-ZXMNUKOKXUTL2MK2 -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp" -m tcp -j DNAT --to-destination 10.244.0.2:53
		-A KUBE-SEP-ZP3FB6NMPNCO4VBJ -s 10.244.0.3/32 -m comment --comment "kube-system/kube-dns:dns-tcp" -j KUBE-MARK-MASQ
		-A KUBE-SEP-ZP3FB6NMPNCO4VBJ -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp" -m tcp -j DNAT --to-destination 10.244.0.3:53
		-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s 10.244.0.0/16 -d 10.96.122.57/32 -p tcp -m comment --comment "default/source-ip-app cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
		-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "default/source-ip-app -> 10.244.1.5:8080" -j KUBE-SEP-SXIVWICOYRO3J4NJ
		-A KUBE-EXT-XPGD46QRK7WJZT7O -s 10.244.0.0/16 -m comment --comment "pod traffic for default/source-ip-app external destinations" -j KUBE-SVC-XPGD46QRK7WJZT7O
		-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade LOCAL traffic for default/source-ip-app external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
		-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "route LOCAL traffic for default/source-ip-app external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-XPGD46QRK7WJZT7O
		-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVL-XPGD46QRK7WJZT7O
		-A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment "default/source-ip-app -> 10.244.1.5:8080" -j KUBE-SEP-SXIVWICOYRO3J4NJ
		-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.244.1.5/32 -m comment --comment "default/source-ip-app" -j KUBE-MARK-MASQ
		-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "default/source-ip-app" -m tcp -j DNAT --to-destination 10.244.1.5:8080
		-A KUBE-SVC-NUKIZ6OKUXPJNT4C ! -s 10.244.0.0/16 -d 10.96.40.12/32 -p tcp -m comment --comment "default/loadbalancer cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
		-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "default/loadbalancer -> 10.244.2.9:8080" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-I77PXRDZVX7PMWMN --mask 255.255.255.255 --rsource -j KUBE-SEP-I77PXRDZVX7PMWMN
		-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "default/loadbalancer -> 10.244.2.9:8080" -j KUBE-SEP-I77PXRDZVX7PMWMN
		-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for default/loadbalancer external destinations" -j KUBE-MARK-MASQ
		-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
		-A KUBE-FW-NUKIZ6OKUXPJNT4C -s 198.51.100.0/24 -m comment --comment "default/loadbalancer loadbalancer IP" -j KUBE-EXT-NUKIZ6OKUXPJNT4C
		-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to default/loadbalancer will be dropped by KUBE-PROXY-FIREWALL"
		-A KUBE-SEP-I77PXRDZVX7PMWMN -s 10.244.2.9/32 -m comment --comment "default/loadbalancer" -j KUBE-MARK-MASQ
		-A KUBE-SEP-I77PXRDZVX7PMWMN -p tcp -m comment --comment "default/loadbalancer" -m recent --set --name KUBE-SEP-I77PXRDZVX7PMWMN --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.2.9:8080
		-A KUBE-XLB-OLDSVCFROM1X23AB -m comment --comment "default/old has no local endpoints" -j KUBE-MARK-DROP
		-A KUBE-FW-OLDSVCFROM1X23AB -m comment --comment "default/old loadbalancer IP" -j KUBE-XLB-OLDSVCFROM1X23AB
		-A KUBE-FW-OLDSVCFROM1X23AB -m comment --comment "default/old loadbalancer IP" -j KUBE-MARK-DROP
		COMMIT
		*filter
		:KUBE-SERVICES - [0:0]
		:KUBE-EXTERNAL-SERVICES - [0:0]
		:KUBE-NODEPORTS - [0:0]
		:KUBE-FORWARD - [0:0]
		:KUBE-PROXY-FIREWALL - [0:0]
		:KUBE-PROXY-CANARY - [0:0]
		-I INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
		-I INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
		-I INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
		-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
		-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
		-I FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
		-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
		-I OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
		-I OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
		-A KUBE-NODEPORTS -p tcp -m comment --comment "default/source-ip-app health check node port" -m tcp --dport 32122 -j ACCEPT
		-A KUBE-SERVICES -d 10.96.7.7/32 -p tcp -m comment --comment "default/nobody has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
		-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "default/source-ip-app has no local endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 31021 -j DROP
		-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
		-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
		-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
		-A KUBE-PROXY-FIREWALL -d 203.0.113.140/32 -p tcp -m comment --comment "default/loadbalancer traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp --dport 80 -j DROP
		COMMIT
		`)
}

func TestIsKubeProxyChain(t *testing.T) {
	for chain, want := range map[string]bool{
		"KUBE-SERVICES": true, "KUBE-NODEPORTS": true, "KUBE-POSTROUTING": true, "KUBE-MARK-MASQ": true,
		"KUBE-EXTERNAL-SERVICES": true, "KUBE-FORWARD": true, "KUBE-PROXY-FIREWALL": true, "KUBE-PROXY-CANARY": true,
		"KUBE-SVC-XPGD46QRK7WJZT7O": true, "KUBE-SVL-XPGD46QRK7WJZT7O": true, "KUBE-EXT-XPGD46QRK7WJZT7O": true,
		"KUBE-FW-NUKIZ6OKUXPJNT4C": true, "KUBE-SEP-SXIVWICOYRO3J4NJ": true, "KUBE-XLB-OLDSVCFROM1X23AB": true,
		// The kubelet's.
		"KUBE-FIREWALL": false, "KUBE-KUBELET-CANARY": false, "KUBE-IPTABLES-HINT": false, "KUBE-MARK-DROP": false,
		// Other programs', and kube-proxy's IPVS mode.
		"KUBE-ROUTER-INPUT": false, "KUBE-POD-FW-ABCDEFGHIJKLMNOP": false, "KUBE-NWPLCY-DEFAULT": false,
		"KUBE-HOSTPORTS": false, "KUBE-HP-ABCDEFGHIJKLMNOP": false, "KUBE-LOAD-BALANCER": false,
		"KUBE-SERVICES-X": false, "KUBE-SVC": false,
		// miniproxy's own and the built-in chains.
		"MP-SERVICES": false, "MP-CANARY": false, "PREROUTING": false, "INPUT": false,
	} {
		if got := IsKubeProxyChain(chain); got != want {
			t.Errorf("IsKubeProxyChain(%q) = %v, want %v", chain, got, want)
		}
	}
}

// installMiniproxy applies testRuleset with a Dataplane, as a running
// miniproxy would have.
func installMiniproxy(t *testing.T, r Runner, family iptables.Family) {
	t.Helper()
	dp, err := New(r, family, rules.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dp.Apply(testRuleset(t, family, nil), false); err != nil {
		t.Fatalf("apply miniproxy's rules: %v", err)
	}
}

func TestCleanupKubeProxyWithFake(t *testing.T) {
	v6 := iptables.IPv6
	tests := []struct {
		name string
		// others are installed first and must survive; kubeProxy after them.
		others    func(t *testing.T, f *Fake)
		kubeProxy bool
		families  []iptables.Family
		failNext  int
		noRestore bool
	}{
		{
			name:      "a node that never ran kube-proxy is left alone and nothing is written",
			others:    func(t *testing.T, f *Fake) {},
			noRestore: true,
		},
		{
			name: "kube-proxy's chains and jumps go; the kubelet's, flannel's, kube-router's and miniproxy's stay",
			others: func(t *testing.T, f *Fake) {
				for _, fam := range []iptables.Family{v4, v6} {
					restoreFake(t, f, fam, kubeletInput(fam))
					restoreFake(t, f, fam, otherProgramsInput(fam))
					installMiniproxy(t, f, fam)
				}
			},
			kubeProxy: true,
		},
		{
			name: "both families are cleaned when none is named",
			others: func(t *testing.T, f *Fake) {
				for _, fam := range []iptables.Family{v4, v6} {
					restoreFake(t, f, fam, kubeletInput(fam))
				}
			},
			kubeProxy: true,
			families:  []iptables.Family{},
		},
		{
			name: "when the one-shot delete is refused, chains are flushed and deleted one by one",
			others: func(t *testing.T, f *Fake) {
				restoreFake(t, f, v4, kubeletInput(v4))
				restoreFake(t, f, v6, kubeletInput(v6))
			},
			kubeProxy: true,
			families:  []iptables.Family{v4, v6},
			failNext:  1,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := NewFake()
			tc.others(t, f)
			before := map[iptables.Family]iptables.State{v4: f.State(v4), v6: f.State(v6)}
			if tc.kubeProxy {
				restoreFake(t, f, v4, kubeProxyInput(v4))
				restoreFake(t, f, v6, kubeProxyInput(v6))
				if _, ok := f.State(v4)["nat"]["KUBE-SVC-TCOU7JCQXEZGVUNU"]; !ok {
					t.Fatal("the kube-proxy fixture did not go in")
				}
			}
			nInputs := len(f.Inputs())
			f.FailNext(tc.failNext)
			families := tc.families
			if families == nil {
				families = []iptables.Family{v4, v6}
			}
			if _, err := CleanupKubeProxy(f, families...); err != nil {
				t.Fatalf("CleanupKubeProxy: %v", err)
			}
			for _, fam := range []iptables.Family{v4, v6} {
				if diff := cmp.Diff(before[fam], f.State(fam)); diff != "" {
					t.Errorf("%s tables after CleanupKubeProxy (-before kube-proxy +after cleanup):\n%s", fam, diff)
				}
			}
			if tc.noRestore && len(f.Inputs()) != nInputs {
				t.Errorf("CleanupKubeProxy wrote %d restore inputs on a node without kube-proxy's rules, want none: %+v", len(f.Inputs())-nInputs, f.Inputs()[nInputs:])
			}
			// A second run finds nothing and changes nothing.
			n := len(f.Inputs())
			if _, err := CleanupKubeProxy(f, families...); err != nil {
				t.Fatalf("second CleanupKubeProxy: %v", err)
			}
			if len(f.Inputs()) != n {
				t.Errorf("the second CleanupKubeProxy wrote %d restore inputs, want none", len(f.Inputs())-n)
			}
		})
	}
}

// TestCleanupKubeProxyReportsWhatItCouldNotDelete checks that a jump that
// cannot be deleted is reported with its chain, and that everything else
// is still removed.
func TestCleanupKubeProxyReportsWhatItCouldNotDelete(t *testing.T) {
	f := &refusingFake{Fake: NewFake(), refuse: "KUBE-PROXY-FIREWALL"}
	restoreFake(t, f.Fake, v4, kubeletInput(v4))
	restoreFake(t, f.Fake, v4, kubeProxyInput(v4))
	_, err := CleanupKubeProxy(f, v4)
	if err == nil || !strings.Contains(err.Error(), "KUBE-PROXY-FIREWALL") || !strings.Contains(err.Error(), "IPv4") {
		t.Fatalf("CleanupKubeProxy error = %v, want one naming the IPv4 jump to KUBE-PROXY-FIREWALL", err)
	}
	s := f.State(v4)
	var left []string
	for table, tab := range s {
		for name := range tab {
			if IsKubeProxyChain(name) {
				left = append(left, string(table)+" "+name)
			}
		}
	}
	if len(left) != 1 || left[0] != "filter KUBE-PROXY-FIREWALL" {
		t.Errorf("kube-proxy chains left = %v, want only filter KUBE-PROXY-FIREWALL (still referenced)", left)
	}
}

// refusingFake is a Fake whose DeleteRule refuses rules jumping to one
// chain, as iptables -D does for a rule it cannot parse back.
type refusingFake struct {
	*Fake
	refuse string
}

func (r *refusingFake) DeleteRule(family iptables.Family, table iptables.Table, chain string, rule iptables.Rule) error {
	if rule.Target() == r.refuse {
		return errInjected
	}
	return r.Fake.DeleteRule(family, table, chain, rule)
}

// restoreFake feeds a test input to the Fake, failing the test if it is
// refused.
func restoreFake(t *testing.T, f *Fake, family iptables.Family, input string) {
	t.Helper()
	if err := f.Restore(family, []byte(input)); err != nil {
		t.Fatalf("restore test input into the fake: %v", err)
	}
}
