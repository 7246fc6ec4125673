package netns

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// addCleanup registers fn to run when the lab is closed: after its processes
// have been stopped and before its namespaces are deleted, the last
// registered first. It fails, without registering fn, once the lab is
// closed, so the caller cleans up itself.
func (l *Lab) addCleanup(fn func() error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("lab %s is closed", l.prefix)
	}
	l.cleanups = append(l.cleanups, fn)
	return nil
}

// TempDir creates a new directory for files the lab's processes need
// (kubeconfigs, certificates, etcd's data) and returns its path. Its name
// carries the lab's prefix and name, so a run's files are easy to recognise.
// It is removed by Lab.Close after the processes have stopped or, should
// the test process die without closing the lab (SIGKILL, a test timeout), by
// the watchdog, so files do not outlive the lab any more than namespaces do.
func (l *Lab) TempDir(name string) (string, error) {
	return l.tempDirIn(tempBase(), name)
}

// MemoryTempDir is TempDir in memory (/dev/shm) when the machine has it:
// for etcd's data, whose every write waits for an fsync that a lab does not
// need (etcd 3.4 cannot be told to skip it), so that bulk writes (10,000
// Services) are not held up by the disk.
func (l *Lab) MemoryTempDir(name string) (string, error) {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		return l.tempDirIn("/dev/shm", name)
	}
	return l.TempDir(name)
}

func (l *Lab) tempDirIn(base, name string) (string, error) {
	if strings.ContainsAny(name, " \t\n/") {
		return "", fmt.Errorf("create temp dir %q for lab %s: name must not contain spaces or slashes", name, l.prefix)
	}
	dir, err := os.MkdirTemp(base, tempDirPrefix(l.prefix)+name+"-")
	if err != nil {
		return "", fmt.Errorf("create temp dir for lab %s: %w", l.prefix, err)
	}
	if err := watchdogNote("dir", dir); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("create temp dir for lab %s: %w", l.prefix, err)
	}
	remove := func() error {
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("remove temp dir of lab %s: %w", l.prefix, err)
		}
		watchdogNote("undir", dir)
		return nil
	}
	if err := l.addCleanup(remove); err != nil {
		return "", errors.Join(fmt.Errorf("create temp dir: %w", err), remove())
	}
	return dir, nil
}

// tempBase is the directory lab temp dirs are made in: the system's, unless
// its path has blanks (the watchdog protocol is line- and word-based).
func tempBase() string {
	base := os.TempDir()
	if strings.ContainsAny(base, " \t\n") || !filepath.IsAbs(base) {
		return "/tmp"
	}
	return base
}

// tempDirPrefix starts the names of a lab's temp dirs, so that a run's files
// are easy to recognise and an abandoned lab's can be found (claim.go).
func tempDirPrefix(labPrefix string) string { return "miniproxy-" + labPrefix }
