package iptables_test

import (
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/iptables/iptablestest"
)

// The model gives the real iptables-restore's verdict on every recorded
// case (pkg/dataplane's kernel test holds the recordings to the kernel).
func TestModelGivesTheKernelsVerdicts(t *testing.T) {
	cases, err := iptablestest.Verdicts()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			s := iptables.NewState()
			for i, text := range c.Inputs {
				in, err := iptables.ParseRestore(text)
				if err == nil {
					s, err = s.Apply(c.Family, in, true)
				}
				last := i == len(c.Inputs)-1
				switch {
				case !last && err != nil:
					t.Fatalf("input %d of %d is accepted by the kernel, refused by the model: %v", i+1, len(c.Inputs), err)
				case last && c.Accept && err != nil:
					t.Errorf("the kernel accepts it; the model refuses: %v", err)
				case last && !c.Accept && err == nil:
					t.Error("the kernel refuses it; the model accepts it")
				}
			}
		})
	}
}
