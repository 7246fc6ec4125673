package config

import (
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"
)

// kind is the JSON shape a field of the file must have.
type kind int

const (
	kString     kind = iota // a string
	kBool                   // true or false
	kInt32                  // a whole number that fits an int32
	kUint32                 // a whole number that fits a uint32
	kFloat                  // any number
	kDuration               // a string time.ParseDuration accepts, as metav1.Duration
	kStringList             // a list of strings
	kBoolMap                // an object of booleans (featureGates)
	kObject                 // an object whose fields are in children
	kAny                    // anything; not looked into (logging options and the like)
)

// node is one field of the schema: its kind and, for objects, its fields.
type node struct {
	kind     kind
	children map[string]*node
}

func leaf(k kind) *node                      { return &node{kind: k} }
func object(children map[string]*node) *node { return &node{kind: kObject, children: children} }

// schema is kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration as of
// Kubernetes 1.37 (k8s.io/kube-proxy/config/v1alpha1), field by field, so
// that a field the file has and the schema lacks is reported as unknown and
// a value of the wrong shape as an error naming the field. TestSchema
// checks it against the upstream Go type.
var schema = object(map[string]*node{
	"apiVersion":   leaf(kString),
	"kind":         leaf(kString),
	"featureGates": leaf(kBoolMap),
	"clientConnection": object(map[string]*node{
		"kubeconfig":         leaf(kString),
		"acceptContentTypes": leaf(kString),
		"contentType":        leaf(kString),
		"qps":                leaf(kFloat),
		"burst":              leaf(kInt32),
	}),
	"logging": object(map[string]*node{
		"format": leaf(kString),
		// A duration string or a number of nanoseconds.
		"flushFrequency": leaf(kAny),
		"verbosity":      leaf(kUint32),
		"vmodule":        leaf(kAny),
		"options":        leaf(kAny),
	}),
	"hostnameOverride":            leaf(kString),
	"bindAddress":                 leaf(kString),
	"healthzBindAddress":          leaf(kString),
	"metricsBindAddress":          leaf(kString),
	"bindAddressHardFail":         leaf(kBool),
	"enableProfiling":             leaf(kBool),
	"showHiddenMetricsForVersion": leaf(kString),
	"mode":                        leaf(kString),
	"iptables": object(map[string]*node{
		"masqueradeBit":      leaf(kInt32),
		"masqueradeAll":      leaf(kBool),
		"localhostNodePorts": leaf(kBool),
		"syncPeriod":         leaf(kDuration),
		"minSyncPeriod":      leaf(kDuration),
	}),
	"ipvs": object(map[string]*node{
		"syncPeriod":    leaf(kDuration),
		"minSyncPeriod": leaf(kDuration),
		"scheduler":     leaf(kString),
		"excludeCIDRs":  leaf(kStringList),
		"strictARP":     leaf(kBool),
		"tcpTimeout":    leaf(kDuration),
		"tcpFinTimeout": leaf(kDuration),
		"udpTimeout":    leaf(kDuration),
	}),
	"nftables": object(map[string]*node{
		"masqueradeBit": leaf(kInt32),
		"masqueradeAll": leaf(kBool),
		"syncPeriod":    leaf(kDuration),
		"minSyncPeriod": leaf(kDuration),
	}),
	"winkernel": object(map[string]*node{
		"networkName":           leaf(kString),
		"sourceVip":             leaf(kString),
		"enableDSR":             leaf(kBool),
		"rootHnsEndpointName":   leaf(kString),
		"forwardHealthCheckVip": leaf(kBool),
	}),
	"detectLocalMode": leaf(kString),
	"detectLocal": object(map[string]*node{
		"bridgeInterface":     leaf(kString),
		"interfaceNamePrefix": leaf(kString),
	}),
	"clusterCIDR":       leaf(kString),
	"nodePortAddresses": leaf(kStringList),
	"oomScoreAdj":       leaf(kInt32),
	"conntrack": object(map[string]*node{
		"maxPerCore":            leaf(kInt32),
		"min":                   leaf(kInt32),
		"tcpEstablishedTimeout": leaf(kDuration),
		"tcpCloseWaitTimeout":   leaf(kDuration),
		"tcpBeLiberal":          leaf(kBool),
		"udpTimeout":            leaf(kDuration),
		"udpStreamTimeout":      leaf(kDuration),
	}),
	"configSyncPeriod":    leaf(kDuration),
	"portRange":           leaf(kString),
	"windowsRunAsService": leaf(kBool),
})

// values holds the fields a file set (null counts as not set), by dotted
// path ("iptables.syncPeriod"), each converted to its Go type: string,
// bool, int64, float64, time.Duration, []string, map[string]bool, or the
// raw decoded value for kAny.
type values map[string]any

// walk checks v against n, recording converted values, an error for every
// value of the wrong shape and a warning for every field the schema does
// not know. Fields are visited in sorted order so that messages come out
// in the same order every time.
func walk(path string, v any, n *node, out values, errs *[]error, warns *[]Warning) {
	if v == nil {
		return // null: as if absent, which is what kube-proxy's decoder does
	}
	fail := func(format string, args ...any) {
		*errs = append(*errs, &FieldError{Field: path, Message: fmt.Sprintf(format, args...)})
	}
	switch n.kind {
	case kAny:
		out[path] = v
	case kString:
		s, ok := v.(string)
		if !ok {
			fail("want a string, got %s", describe(v))
			return
		}
		out[path] = s
	case kBool:
		b, ok := v.(bool)
		if !ok {
			fail("want true or false, got %s", describe(v))
			return
		}
		out[path] = b
	case kInt32, kUint32:
		num, ok := v.(json.Number)
		if !ok {
			fail("want a whole number, got %s", describe(v))
			return
		}
		i, err := num.Int64()
		if err != nil {
			fail("want a whole number, got %s", num)
			return
		}
		lo, hi := int64(math.MinInt32), int64(math.MaxInt32)
		if n.kind == kUint32 {
			lo, hi = 0, math.MaxUint32
		}
		if i < lo || i > hi {
			fail("%d is out of range (%d to %d)", i, lo, hi)
			return
		}
		out[path] = i
	case kFloat:
		num, ok := v.(json.Number)
		if !ok {
			fail("want a number, got %s", describe(v))
			return
		}
		f, err := num.Float64()
		if err != nil {
			fail("want a number, got %s", num)
			return
		}
		out[path] = f
	case kDuration:
		s, ok := v.(string)
		if !ok {
			fail("want a duration such as \"30s\" or \"1m\", got %s", describe(v))
			return
		}
		d, err := time.ParseDuration(s)
		if err != nil {
			fail("cannot parse %q as a duration (e.g. \"30s\", \"1m30s\")", s)
			return
		}
		out[path] = d
	case kStringList:
		list, ok := v.([]any)
		if !ok {
			fail("want a list of strings, got %s", describe(v))
			return
		}
		strs := make([]string, 0, len(list))
		for i, e := range list {
			s, ok := e.(string)
			if !ok {
				*errs = append(*errs, &FieldError{Field: fmt.Sprintf("%s[%d]", path, i), Message: "want a string, got " + describe(e)})
				continue
			}
			strs = append(strs, s)
		}
		if len(strs) == len(list) {
			out[path] = strs
		}
	case kBoolMap:
		m, ok := v.(map[string]any)
		if !ok {
			fail("want a map of names to true or false, got %s", describe(v))
			return
		}
		bools := map[string]bool{}
		for _, k := range sortedKeys(m) {
			b, ok := m[k].(bool)
			if !ok {
				*errs = append(*errs, &FieldError{Field: path + "." + k, Message: "want true or false, got " + describe(m[k])})
				continue
			}
			bools[k] = b
		}
		out[path] = bools
	case kObject:
		m, ok := v.(map[string]any)
		if !ok {
			fail("want an object, got %s", describe(v))
			return
		}
		for _, k := range sortedKeys(m) {
			child := join(path, k)
			c, ok := n.children[k]
			if !ok {
				*warns = append(*warns, Warning{Field: child, Message: unknownField(n, k)})
				continue
			}
			walk(child, m[k], c, out, errs, warns)
		}
	}
}

// unknownField explains an unknown field, pointing at a known one that
// differs only in case (YAML keys are case-sensitive, a common slip).
func unknownField(parent *node, name string) string {
	for k := range parent.children {
		if strings.EqualFold(k, name) {
			return fmt.Sprintf("unknown field (did you mean %q?); ignored", k)
		}
	}
	return "unknown field: kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration has no such field (it may belong to another version of kube-proxy); ignored"
}

func join(path, k string) string {
	if path == "" {
		return k
	}
	return path + "." + k
}

// describe names a decoded JSON value for an error message, quoting it
// when it is short.
func describe(v any) string {
	switch x := v.(type) {
	case string:
		return fmt.Sprintf("the string %q", x)
	case bool:
		return fmt.Sprintf("the boolean %v", x)
	case json.Number:
		return "the number " + x.String()
	case []any:
		return "a list"
	case map[string]any:
		return "an object"
	}
	return fmt.Sprintf("%v", v)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
