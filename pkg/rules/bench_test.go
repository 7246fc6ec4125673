package rules

import (
	"fmt"
	"testing"
)

// BenchmarkBuild measures computing the whole ruleset, which every sync does
// before the dataplane picks out what changed.
func BenchmarkBuild(b *testing.B) {
	for _, n := range []int{1000, 10000, 30000} {
		snap := manyServices(n, 7)
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				Build(snap, testConfig())
			}
		})
	}
}
