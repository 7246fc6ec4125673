package main

import (
	"math"
	"testing"
)

func TestPercentileIsNearestRank(t *testing.T) {
	var twenty []float64
	for i := 20; i >= 1; i-- {
		twenty = append(twenty, float64(i*10))
	}
	for _, c := range []struct {
		xs   []float64
		p    float64
		want float64
	}{
		{twenty, 50, 100},
		{twenty, 95, 190},
		{twenty, 99, 200}, // of 20 samples, the slowest
		{twenty, 100, 200},
		{twenty, 5, 10},
		{[]float64{7}, 99, 7},
		{[]float64{3, 1, 2}, 50, 2},
		{[]float64{1, 2, 3, 4}, 50, 2},
	} {
		if got := percentile(c.xs, c.p); got != c.want {
			t.Errorf("percentile(%v, %v) = %v, want %v", c.xs, c.p, got, c.want)
		}
	}
	if got := percentile(nil, 50); !math.IsNaN(got) {
		t.Errorf("percentile of nothing = %v, want NaN", got)
	}
}

func TestChangeStatsLeavesFailedChangesOut(t *testing.T) {
	r := &RunResult{}
	for i := 1; i <= 20; i++ {
		r.Changes = append(r.Changes, ChangeResult{LatencyMS: float64(i), CPUS: 0.01, Restore: RestoreSize{Lines: 10, Bytes: 100}})
	}
	r.Changes = append(r.Changes, ChangeResult{LatencyMS: 5000, Err: "traffic still reaches the old endpoints"})
	s := changeStats(r)
	if s.OK != 20 || s.Of != 21 || s.P50MS != 10 || s.P99MS != 20 || s.Lines != 10 || s.Bytes != 100 {
		t.Errorf("changeStats = %+v", s)
	}
}

func TestChangeRangeSaysFastestSlowestAndFailures(t *testing.T) {
	cs := []ChangeResult{
		{LatencyMS: 48, Restore: RestoreSize{Lines: 3}},
		{LatencyMS: 231, Restore: RestoreSize{Lines: 1066}},
		{Err: "traffic still reaches the old endpoints after 5m0s\nmore"},
		{LatencyMS: 9.5, Restore: RestoreSize{Lines: 1034}},
	}
	want := "9.5 ms-231 ms (3-1,066 lines); 1 failed: traffic still reaches the old endpoints after 5m0s"
	if got := changeRange(cs); got != want {
		t.Errorf("changeRange = %q, want %q", got, want)
	}
	if got := changeRange(nil); got != "-" {
		t.Errorf("changeRange of none = %q", got)
	}
}
