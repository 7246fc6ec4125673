package features

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// The embedded list is what upstream kube-proxy's own registry holds, at
// the release test/tools pins: regenerate it with
// `cd test/tools && go run ./featuregates > ../../pkg/features/kube-proxy.tsv`.
func TestGatesAreKubeProxys(t *testing.T) {
	_, self, _, _ := runtime.Caller(0)
	tools := filepath.Join(filepath.Dir(self), "..", "..", "test", "tools")
	if _, err := exec.LookPath("go"); err != nil {
		t.Skipf("no go command to build test/tools: %v", err)
	}
	cmd := exec.Command("go", "run", "./featuregates")
	cmd.Dir = tools
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=readonly")
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go run ./featuregates in %s: %v", tools, err)
	}
	if string(out) != table {
		t.Errorf("pkg/features/kube-proxy.tsv is not what upstream's registry holds; regenerate it (see the test's comment)")
	}
}

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  map[string]bool
		err  string
	}{
		{"nothing set", nil, ""},
		{"a GA gate that may be turned off", map[string]bool{"AllowServiceExternalIPs": false}, ""},
		{"a locked gate at its value", map[string]bool{"PreferSameTrafficDistribution": true}, ""},
		{"a locked gate turned off", map[string]bool{"PreferSameTrafficDistribution": false},
			"cannot set feature gate PreferSameTrafficDistribution to false, feature is locked to true"},
		{"a gate kube-proxy does not know", map[string]bool{"NoSuchGate": true}, "unrecognized feature gate: NoSuchGate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Check(tc.set)
			if (err == nil) != (tc.err == "") || (err != nil && err.Error() != tc.err) {
				t.Errorf("Check = %v, want %q", err, tc.err)
			}
		})
	}
}

func TestEffective(t *testing.T) {
	if !Effective(nil).Enabled(AllowServiceExternalIPs) {
		t.Errorf("AllowServiceExternalIPs is on by default in kube-proxy 1.37")
	}
	if Effective(map[string]bool{"AllowServiceExternalIPs": false}).Enabled(AllowServiceExternalIPs) {
		t.Errorf("AllowServiceExternalIPs=false left it on")
	}
	if !Effective(nil).Enabled(PreferSameTrafficDistribution) {
		t.Errorf("PreferSameTrafficDistribution is locked on in 1.37")
	}
}
