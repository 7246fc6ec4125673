package config

import (
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/kube-proxy/config/v1alpha1"
)

// TestSchemaMatchesUpstream compares the schema with the upstream Go type
// field by field, so that a field added to KubeProxyConfiguration in a new
// Kubernetes release is noticed here (and classified) instead of being
// reported to operators as unknown.
func TestSchemaMatchesUpstream(t *testing.T) {
	upstream := map[string]bool{"apiVersion": true, "kind": true}
	goFields("", reflect.TypeOf(v1alpha1.KubeProxyConfiguration{}), upstream)
	ours := map[string]bool{}
	schemaFields("", schema, ours)
	if diff := cmp.Diff(sorted(upstream), sorted(ours)); diff != "" {
		t.Errorf("schema fields (-upstream v1alpha1 +ours):\n%s", diff)
	}
}

// leafTypes are struct types the file spells as one value.
var leafTypes = map[reflect.Type]bool{
	reflect.TypeOf(metav1.Duration{}): true,
}

// goFields collects the JSON paths of a Go struct's fields, going into
// nested structs except those that are one value in the file and those the
// schema takes as a whole (the logging options).
func goFields(path string, typ reflect.Type, out map[string]bool) {
	for typ.Kind() == reflect.Pointer {
		typ = typ.Elem()
	}
	for i := 0; i < typ.NumField(); i++ {
		f := typ.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		ft := f.Type
		for ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		if f.Anonymous && name == "" {
			if ft == reflect.TypeOf(metav1.TypeMeta{}) {
				continue // apiVersion and kind, added by the caller
			}
			goFields(path, ft, out)
			continue
		}
		p := join(path, name)
		if ft.Kind() == reflect.Struct && !leafTypes[ft] && p != "logging.flushFrequency" && p != "logging.options" {
			goFields(p, ft, out)
			continue
		}
		out[p] = true
	}
}

func schemaFields(path string, n *node, out map[string]bool) {
	if n.kind != kObject {
		out[path] = true
		return
	}
	for k, c := range n.children {
		schemaFields(join(path, k), c, out)
	}
}

func sorted(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
