package netns

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestTempDirRemovedByClose(t *testing.T) {
	l := NewLab(t)
	dir, err := l.TempDir("files")
	must(t, err)
	if !strings.Contains(filepath.Base(dir), l.Prefix()+"files") {
		t.Errorf("temp dir %s does not carry the lab prefix %s and its name", dir, l.Prefix())
	}
	must(t, os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o600))
	must(t, l.Close())
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temp dir %s survived Lab.Close: %v", dir, err)
	}
	if _, err := l.TempDir("late"); err == nil {
		t.Error("TempDir on a closed lab succeeded")
	}
}

// tempDirHelperEnv makes the test binary run TestHelperTempDir as a child
// process that creates a lab temp dir and waits to be killed.
const tempDirHelperEnv = "MINIPROXY_NETNS_TEMPDIR_HELPER"

func TestHelperTempDir(t *testing.T) {
	if os.Getenv(tempDirHelperEnv) == "" {
		t.Skip("helper for TestWatchdogRemovesTempDir")
	}
	l, err := New()
	must(t, err)
	dir, err := l.TempDir("victim")
	must(t, err)
	must(t, os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o600))
	fmt.Printf("READY %s\n", dir)
	time.Sleep(60 * time.Second)
	t.Fatal("not killed")
}

// TestWatchdogRemovesTempDir: a test process killed with SIGKILL leaves no
// temp dir behind.
func TestWatchdogRemovesTempDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperTempDir$", "-test.v")
	cmd.Env = append(os.Environ(), tempDirHelperEnv+"=1")
	stdout, err := cmd.StdoutPipe()
	must(t, err)
	must(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill() })
	var dir string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if _, err := fmt.Sscanf(sc.Text(), "READY %s", &dir); err == nil {
			break
		}
	}
	if dir == "" {
		t.Fatalf("helper ended without READY: %v", sc.Err())
	}
	go func() {
		for sc.Scan() {
		}
	}()
	must(t, cmd.Process.Kill())
	cmd.Wait()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("temp dir %s survived the SIGKILL of its test process", dir)
	os.RemoveAll(dir)
}
