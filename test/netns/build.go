package netns

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// builds remembers, per package path, the binary built by this process, so
// every test of a run shares one build.
var builds sync.Map // package path -> *buildResult

type buildResult struct {
	once sync.Once
	path string
	err  error
}

// Build compiles the main package pkg (e.g.
// "github.com/miniproxy/miniproxy/cmd/echoserver") of the module containing
// the working directory, once per process, and returns the binary's path.
// Binaries go to a fixed per-user directory under os.TempDir, one file per
// package, replaced atomically, so concurrent test processes do not collide
// and repeated runs do not pile up files; the Go build cache keeps rebuilds
// fast.
func Build(pkg string) (string, error) {
	v, _ := builds.LoadOrStore(pkg, &buildResult{})
	r := v.(*buildResult)
	r.once.Do(func() { r.path, r.err = build(pkg) })
	return r.path, r.err
}

// BuildBinary is Build for tests: it fails the test if the build fails.
func BuildBinary(t testing.TB, pkg string) string {
	t.Helper()
	p, err := Build(pkg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func build(pkg string) (string, error) {
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("build %s: find module: %w", pkg, err)
	}
	modFile := strings.TrimSpace(string(gomod))
	if modFile == "" || modFile == os.DevNull {
		return "", fmt.Errorf("build %s: working directory is not inside a Go module", pkg)
	}
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("miniproxy-lab-bin-%d", os.Getuid()))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("build %s: %w", pkg, err)
	}
	sum := sha256.Sum256([]byte(modFile + "\x00" + pkg))
	out := filepath.Join(dir, path.Base(pkg)+"-"+hex.EncodeToString(sum[:4]))
	tmp := fmt.Sprintf("%s.tmp%d", out, os.Getpid())
	cmd := exec.Command("go", "build", "-o", tmp, pkg)
	cmd.Dir = filepath.Dir(modFile)
	if b, err := cmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("build %s: %w\n%s", pkg, err, b)
	}
	if err := os.Rename(tmp, out); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("build %s: %w", pkg, err)
	}
	return out, nil
}

// LeaveConntrackAlone are the flags that keep a proxy (miniproxy or
// kube-proxy, which take the same flags) from changing conntrack settings
// when it starts in a lab namespace: nf_conntrack_max and the conntrack
// hash size belong to the whole machine, and the lab never changes the
// machine; the timeouts are left as the kernel has them too, so that both
// proxies see the same.
var LeaveConntrackAlone = []string{"--conntrack-max-per-core=0", "--conntrack-min=0",
	"--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0"}
