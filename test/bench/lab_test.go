package main

import (
	"net/netip"
	"testing"
)

// Every endpoint address is distinct and inside its sink's range, up to the
// largest size the benchmark runs.
func TestEndpointAddressesFitTheirSink(t *testing.T) {
	if maxServices < 100000 {
		t.Fatalf("maxServices = %d, want at least 100,000", maxServices)
	}
	seen := map[netip.Addr]bool{}
	for _, s := range sinks {
		block := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, s.block, 0, 0}), sinkBits)
		for _, i := range []int{0, 1, 254, 255, 65534, 65535, 99999, maxServices - 1} {
			a := endpointIP(s.block, i)
			if !block.Contains(a) || a == block.Addr() {
				t.Errorf("%s: endpoint %d is %s, outside %s or its network address", s.name, i, a, block)
			}
			if seen[a] {
				t.Errorf("%s: endpoint %d is %s, used twice", s.name, i, a)
			}
			seen[a] = true
		}
	}
}
