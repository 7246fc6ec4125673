package main

import (
	"context"
	"regexp"
	"strings"
	"time"

	"github.com/miniproxy/miniproxy/test/netns"
)

// nftTable is upstream's nftables-mode table as `nft list table` prints
// it, read just enough to count its chains and rules and to see which
// endpoints have a DNAT: "dnat to A:P" for a Service with one endpoint,
// "dnat ip to numgen random mod N map { 0 : A . P, ... }" for several. A first packet does not walk a list here: a
// ClusterIP is one lookup in the service-ips verdict map, so there is no
// depth to compute.
type nftTable struct {
	chains, rules int
	dnats         map[string]bool // every "dnat to" address:port
}

var (
	nftDNAT    = regexp.MustCompile(`\bdnat (?:ip |ip6 )?to ([0-9.]+:[0-9]+)`)
	nftDNATMap = regexp.MustCompile(`([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+) \. ([0-9]+)`)
)

func parseNFT(list string) *nftTable {
	t := &nftTable{dnats: map[string]bool{}}
	inChain := false
	for _, line := range strings.Split(list, "\n") {
		l := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(l, "chain ") && strings.HasSuffix(l, "{"):
			inChain = true
			t.chains++
		case !inChain || l == "":
		case l == "}":
			inChain = false
		case strings.HasPrefix(l, "type "), strings.HasPrefix(l, "comment "), strings.HasPrefix(l, "policy "):
			// a base chain's hook, or a chain's comment: not a rule
		default:
			t.rules++
			if !strings.Contains(l, "dnat ") {
				continue
			}
			if m := nftDNAT.FindStringSubmatch(l); m != nil {
				t.dnats[m[1]] = true
			}
			for _, m := range nftDNATMap.FindAllStringSubmatch(l, -1) {
				t.dnats[m[1]+":"+m[2]] = true
			}
		}
	}
	return t
}

// upstreamNFTTable is the IPv4 table kube-proxy's nftables mode writes.
const upstreamNFTTable = "kube-proxy"

func saveNFT(ctx context.Context, ns *netns.Namespace) (*nftTable, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	out, _, err := ns.Run(ctx, "nft", "list", "table", "ip", upstreamNFTTable)
	if err != nil {
		return nil, err
	}
	return parseNFT(out), nil
}
