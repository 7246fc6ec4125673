// Package features holds kube-proxy's feature gates, so that --feature-gates
// (and a file's featureGates) accept and refuse exactly what kube-proxy 1.37
// does, with its messages, and so that the few gates that change what the
// iptables mode does can be asked. The list (kube-proxy.tsv) is generated
// from upstream's own registry by test/tools/featuregates.
package features

import (
	_ "embed"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	"k8s.io/component-base/featuregate"
)

// The gates miniproxy acts on.
const (
	// AllowServiceExternalIPs off makes kube-proxy ignore spec.externalIPs.
	AllowServiceExternalIPs featuregate.Feature = "AllowServiceExternalIPs"
	// PreferSameTrafficDistribution is locked on in 1.37: same-node hints
	// are honoured (it can be named, but not turned off).
	PreferSameTrafficDistribution featuregate.Feature = "PreferSameTrafficDistribution"
)

//go:embed kube-proxy.tsv
var table string

// Specs is kube-proxy's gate list: name to default, stage and lock.
func Specs() map[featuregate.Feature]featuregate.FeatureSpec {
	specs := map[featuregate.Feature]featuregate.FeatureSpec{}
	for _, line := range strings.Split(table, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Split(line, "\t")
		if len(f) != 4 {
			panic(fmt.Sprintf("features: bad line %q in kube-proxy.tsv", line))
		}
		def, _ := strconv.ParseBool(f[1])
		locked, _ := strconv.ParseBool(f[3])
		spec := featuregate.FeatureSpec{Default: def, LockToDefault: locked}
		for _, stage := range []featuregate.FeatureSpec{{PreRelease: featuregate.PreAlpha}, {PreRelease: featuregate.Alpha},
			{PreRelease: featuregate.Beta}, {PreRelease: featuregate.GA}, {PreRelease: featuregate.Deprecated}} {
			if string(stage.PreRelease) == f[2] || (f[2] == "GA" && stage.PreRelease == featuregate.GA) {
				spec.PreRelease = stage.PreRelease
			}
		}
		specs[featuregate.Feature(f[0])] = spec
	}
	return specs
}

// Check says whether kube-proxy would accept set, with its messages: a
// gate it does not know, or a locked gate set to the other value, is an
// error.
func Check(set map[string]bool) error {
	specs := Specs()
	for _, name := range slices.Sorted(maps.Keys(set)) {
		spec, ok := specs[featuregate.Feature(name)]
		switch {
		case !ok:
			return fmt.Errorf("unrecognized feature gate: %s", name)
		case spec.LockToDefault && spec.Default != set[name]:
			return fmt.Errorf("cannot set feature gate %s to %t, feature is locked to %t", name, set[name], spec.Default)
		}
	}
	return nil
}

// Effective is kube-proxy's gates with set applied (set must pass Check).
func Effective(set map[string]bool) featuregate.FeatureGate {
	specs := Specs()
	for name, on := range set {
		if spec, ok := specs[featuregate.Feature(name)]; ok && !spec.LockToDefault {
			spec.Default = on
			specs[featuregate.Feature(name)] = spec
		}
	}
	g := featuregate.NewFeatureGate()
	if err := g.Add(specs); err != nil {
		panic(fmt.Sprintf("features: kube-proxy.tsv: %v", err))
	}
	return g
}
