#!/bin/sh
# Entrypoint of the miniproxy image: make the container's iptables use the
# same backend (nf_tables or legacy) as the node, then run miniproxy.
#
# The image has both iptables backends. The kernel keeps their rules apart:
# rules written with one are invisible to the other, so a proxy that picks
# the wrong one programs tables the node's packets never meet, and its
# cleanup misses the rules that are there. The node's choice is read from
# what is already in its tables (the same idea as
# kubernetes-sigs/iptables-wrappers), in this order:
#
#   1. the kubelet's KUBE-IPTABLES-HINT or KUBE-KUBELET-CANARY chain (every
#      kubelet since 1.17 creates one in the mangle table): the backend that
#      has it wins;
#   2. otherwise the backend with more kube-proxy or miniproxy chains and
#      rules (lines mentioning KUBE- or MP-) wins;
#   3. otherwise the backend with more rules of any kind wins;
#   4. a tie (an empty node) means nf_tables, the default of Debian 12 and of
#      every current distribution.
#
# MINIPROXY_IPTABLES_MODE=nft or =legacy skips the detection.
# The choice is made with update-alternatives, so that iptables,
# iptables-save and iptables-restore (and the ip6tables ones) all agree;
# then miniproxy replaces this shell (exec), with the container's arguments.
set -eu

log() { echo "miniproxy-entrypoint: $*" >&2; }

# save_lines BACKEND [ARGS]: the output of iptables-BACKEND-save and
# ip6tables-BACKEND-save, nothing when a tool is missing or fails. The nft
# tools get a timeout, as some iptables-nft releases could hang.
save_lines() {
	backend=$1
	shift
	if [ "$backend" = nft ]; then
		timeout 10 iptables-nft-save "$@" 2>/dev/null || true
		timeout 10 ip6tables-nft-save "$@" 2>/dev/null || true
	else
		iptables-legacy-save "$@" 2>/dev/null || true
		ip6tables-legacy-save "$@" 2>/dev/null || true
	fi
}

count() { grep -c -E "$1" || true; }

detect_mode() {
	hint='^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY) '
	# Only the nft tools may be asked for one table: iptables-legacy-save
	# -t mangle would make the kernel create the table.
	if [ "$(save_lines nft -t mangle | count "$hint")" -gt 0 ]; then
		echo nft "(the kubelet's chains are in nf_tables)"
		return
	fi
	legacy=$(save_lines legacy)
	if [ "$(printf '%s\n' "$legacy" | count "$hint")" -gt 0 ]; then
		echo legacy "(the kubelet's chains are in legacy iptables)"
		return
	fi
	nft=$(save_lines nft)
	proxy='(KUBE-|MP-)'
	l=$(printf '%s\n' "$legacy" | grep -E '^(:|-A )' | count "$proxy")
	n=$(printf '%s\n' "$nft" | grep -E '^(:|-A )' | count "$proxy")
	if [ "$l" -ne "$n" ]; then
		if [ "$l" -gt "$n" ]; then
			echo legacy "($l kube-proxy/miniproxy lines in legacy iptables, $n in nf_tables)"
		else
			echo nft "($n kube-proxy/miniproxy lines in nf_tables, $l in legacy iptables)"
		fi
		return
	fi
	l=$(printf '%s\n' "$legacy" | count '^-A ')
	n=$(printf '%s\n' "$nft" | count '^-A ')
	if [ "$l" -gt "$n" ]; then
		echo legacy "($l rules in legacy iptables, $n in nf_tables)"
	else
		echo nft "($n rules in nf_tables, $l in legacy iptables; nf_tables on a tie)"
	fi
}

case "${MINIPROXY_IPTABLES_MODE:-}" in
nft | legacy)
	mode=$MINIPROXY_IPTABLES_MODE
	why="(MINIPROXY_IPTABLES_MODE)"
	;;
"")
	result=$(detect_mode)
	mode=${result%% *}
	why=${result#* }
	;;
*)
	log "MINIPROXY_IPTABLES_MODE must be nft or legacy, not '$MINIPROXY_IPTABLES_MODE'"
	exit 2
	;;
esac

log "using iptables-$mode $why"
sbin=${MINIPROXY_SBIN:-/usr/sbin}
for tool in iptables ip6tables; do
	if ! update-alternatives --set "$tool" "$sbin/$tool-$mode" >/dev/null; then
		log "update-alternatives --set $tool $sbin/$tool-$mode failed"
		exit 1
	fi
done
exec "${MINIPROXY_BIN:-miniproxy}" "$@"
