package dataplane

import (
	"net"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// The real Runner's single-rule calls answer as recorded in
// singleRuleCalls, as the Fake's do (TestFakeSingleRuleCallsAnswerAsIptables),
// so the two agree.
func TestKernelSingleRuleCallsAnswerAsIptables(t *testing.T) {
	for _, family := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		t.Run(family.String(), func(t *testing.T) {
			ns := enterTestNetns(t)
			runSingleRuleCalls(t, NewRunner(), family, func() { ns.check(t) })
		})
	}
}

// SaveCounters gives each rule's counters, which the kernel counts per
// packet, and the Fake's rendering reads back as the same rules.
func TestKernelSaveCountersCountsPackets(t *testing.T) {
	ns := enterTestNetns(t)
	ns.run(t, "", "ip", "link", "set", "lo", "up")
	ns.restore(t, iptables.IPv4, "*filter\n:MP-COUNT - [0:0]\n-A OUTPUT -j MP-COUNT\n-A MP-COUNT -p udp -m udp --dport 9 -j ACCEPT\nCOMMIT\n")
	for i := 0; i < 3; i++ {
		conn, err := net.Dial("udp", "127.0.0.1:9")
		if err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte("x"))
		conn.Close()
	}
	ns.check(t)
	out, err := NewRunner().SaveCounters(iptables.IPv4)
	if err != nil {
		t.Fatal(err)
	}
	got := iptables.ParseSave(string(out))[iptables.Filter].Counters["MP-COUNT"]
	if len(got) != 1 || got[0].Packets != 3 || got[0].Bytes != 3*29 {
		t.Errorf("MP-COUNT counters %v, want 3 packets of 29 bytes (IPv4 and UDP headers, one byte)", got)
	}

	fake := NewFake()
	fake.SetState(iptables.IPv4, iptables.ParseSave(string(out)).State())
	fout, err := fake.SaveCounters(iptables.IPv4)
	if err != nil {
		t.Fatal(err)
	}
	fc := iptables.ParseSave(string(fout))[iptables.Filter]
	if r := fc.Rules["MP-COUNT"]; len(r) != 1 || len(fc.Counters["MP-COUNT"]) != 1 || fc.Counters["MP-COUNT"][0] != (iptables.Counter{}) {
		t.Errorf("the Fake's save with counters reads back as %v with counters %v, want the rule with zero counters", r, fc.Counters["MP-COUNT"])
	}
}
