package main

import (
	"math"
	"sort"
)

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// percentile is the nearest-rank percentile (0 < p <= 100): the smallest
// value that at least p% of xs do not exceed. It is always a value that was
// measured, so p99 of 20 changes is the slowest of them, not an
// interpolation beyond the data.
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 || p <= 0 || p > 100 {
		return math.NaN()
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	rank := int(math.Ceil(p / 100 * float64(len(s))))
	return s[max(rank, 1)-1]
}

// changeSummary is what the report says about a run's changes: latency
// percentiles, and medians of the rest, over the changes that succeeded.
type changeSummary struct {
	OK, Of       int
	P50MS, P99MS float64
	CPUS         float64
	Lines, Bytes float64
}

func changeStats(r *RunResult) changeSummary {
	var l, c, li, by []float64
	for _, ch := range r.Changes {
		if ch.Err != "" {
			continue
		}
		l = append(l, ch.LatencyMS)
		c = append(c, ch.CPUS)
		li = append(li, float64(ch.Restore.Lines))
		by = append(by, float64(ch.Restore.Bytes))
	}
	return changeSummary{OK: len(l), Of: len(r.Changes), P50MS: percentile(l, 50), P99MS: percentile(l, 99),
		CPUS: median(c), Lines: median(li), Bytes: median(by)}
}
