package main

import (
	"fmt"
	"math"
	"strings"
)

// verdict is one target's outcome at one placement: the figure compared,
// its text, and whether it holds (only meaningful when measured).
type verdict struct {
	text     string
	measured bool
	holds    bool
}

var notMeasured = verdict{text: "not measured"}

// target17 is one target of issue 17, judged at one placement.
type target17 struct {
	name, required string
	judge          func(pl string) verdict
}

// targets17 writes issue 17's targets (100,000 Services on this machine,
// and miniproxy against both upstream modes at 10,000), one column per
// placement, since they must hold wherever the endpoints live.
func (b *bench) targets17(w *strings.Builder) {
	p := func(f string, a ...any) { fmt.Fprintf(w, f, a...) }
	p("## Targets of issue 17\n\n")
	p("At 100,000 Services on this machine, and at 10,000 against both upstream modes, wherever the endpoints live.\n\n")
	p("| target | required |")
	for _, pl := range b.opts.placements {
		p(" %s |", placementText(pl))
	}
	p("\n|---|---|%s\n", strings.Repeat("---|", len(b.opts.placements)))
	for _, t := range b.targets17List() {
		p("| %s | %s |", t.name, t.required)
		for _, pl := range b.opts.placements {
			v := t.judge(pl)
			switch {
			case !v.measured:
				p(" %s |", v.text)
			case v.holds:
				p(" %s: **yes** |", v.text)
			default:
				p(" %s: **no** |", v.text)
			}
		}
		p("\n")
	}
	p("\n")
}

func (b *bench) targets17List() []target17 {
	const huge, large = 100000, 10000
	atHuge := func(pl string) *RunResult {
		if r := b.get(miniproxy, huge, pl); usable(r) {
			return r
		}
		return nil
	}
	// against judges miniproxy's figure at 10,000 against each upstream
	// mode's: the ratio to the stricter one must be at most limit. An
	// upstream start-up that did not finish bounds the ratio.
	against := func(pl string, limit float64, strict bool, fig func(*RunResult) float64, format func(float64) string) verdict {
		mp := b.get(miniproxy, large, pl)
		if !usable(mp) {
			return notMeasured
		}
		worst, bound := 0.0, false
		var parts []string
		for _, u := range upstreamModes {
			up := b.get(u, large, pl)
			switch {
			case up != nil && up.StartupDNF && fig(up) > 0:
				x := fig(mp) / fig(up)
				parts = append(parts, fmt.Sprintf("< %s %s", fmtRatio(x), strings.TrimPrefix(proxyLabel(u), "kube-proxy ")))
				worst, bound = math.Max(worst, x), true
			case usable(up) && !math.IsNaN(fig(up)):
				x := fig(mp) / fig(up)
				parts = append(parts, fmt.Sprintf("%s %s", fmtRatio(x), strings.TrimPrefix(proxyLabel(u), "kube-proxy ")))
				worst = math.Max(worst, x)
			case up != nil && up.StartupDNF:
				return verdict{text: fmt.Sprintf("%s did not finish", proxyLabel(u))}
			default:
				return verdict{text: fmt.Sprintf("%s not measured", proxyLabel(u))}
			}
		}
		holds := worst <= limit
		if strict && !bound {
			holds = worst < limit
		}
		return verdict{text: format(fig(mp)) + " (" + strings.Join(parts, ", ") + ")", measured: true, holds: holds}
	}
	return []target17{
		{"start-up at 100,000", "≤ 10 s", func(pl string) verdict {
			r := atHuge(pl)
			if r == nil {
				return notMeasured
			}
			return verdict{fmtS(r.StartupS), true, r.StartupS <= 10}
		}},
		{"one change at 100,000, p99 of the changes", "≤ 100 ms", func(pl string) verdict {
			r := atHuge(pl)
			if r == nil || changeStats(r).OK == 0 {
				return notMeasured
			}
			cs := changeStats(r)
			return verdict{fmt.Sprintf("%s (%d of %d)", fmtMS(cs.P99MS), cs.OK, cs.Of), true, cs.P99MS <= 100 && cs.OK == cs.Of}
		}},
		{"memory after the first sync at 100,000", "≤ 300 MiB", func(pl string) verdict {
			r := atHuge(pl)
			if r == nil || r.RSSMB == 0 {
				return notMeasured
			}
			return verdict{fmt.Sprintf("%.0f MiB", r.RSSMB), true, r.RSSMB <= 300}
		}},
		{"start-up at 10,000", "≤ 0.05× both upstream modes (20× faster)", func(pl string) verdict {
			return against(pl, 0.05, false, func(r *RunResult) float64 { return r.StartupS }, fmtS)
		}},
		{"one change at 10,000, p50", "faster than both upstream modes (< 1×)", func(pl string) verdict {
			return against(pl, 1, true, func(r *RunResult) float64 {
				if r.StartupDNF {
					return math.NaN()
				}
				return changeStats(r).P50MS
			}, fmtMS)
		}},
		{"memory after the first sync at 10,000", "≤ 0.4× the lighter upstream mode", func(pl string) verdict {
			return against(pl, 0.4, false, func(r *RunResult) float64 {
				if r.StartupDNF || r.RSSMB == 0 {
					return math.NaN()
				}
				return r.RSSMB
			}, func(x float64) string { return fmt.Sprintf("%.0f MiB", x) })
		}},
	}
}
