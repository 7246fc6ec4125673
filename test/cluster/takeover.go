package cluster

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TakeOverProxy stops n's usual miniproxy for a test that starts its own
// (its rules stay, as when a DaemonSet pod is replaced), and brings the
// usual one back when the test ends.
func (c *Cluster) TakeOverProxy(t testing.TB, n *Node) {
	t.Helper()
	if err := c.StopProxy(n); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.StopProxy(n)
		if err := c.StartProxy(context.Background(), n, nil); err != nil {
			t.Errorf("restart %s's usual miniproxy: %v", n.Name, err)
		}
	})
}

// WrapTool writes a shell script named tool into a directory of the test's
// own, to put first on a proxy's PATH in front of the real tool: script is
// given the real tool's path and returns the script's text. It returns the
// directory.
func WrapTool(t testing.TB, tool string, script func(real string) string) (dir string) {
	t.Helper()
	real, err := exec.LookPath(tool)
	if err != nil {
		t.Fatal(err)
	}
	dir = t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, tool), []byte(script(real)), 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}
