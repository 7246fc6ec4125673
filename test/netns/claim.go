package netns

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// claimDir holds one claim file per lab, named after its prefix. The lab's
// process holds an exclusive flock on it for as long as it lives; the kernel
// drops the lock when the process dies, however it dies.
const claimDir = "/run/miniproxy-lab"

// claimSuffix ends every claim file's name: "<prefix>claim".
const claimSuffix = "claim"

// claim takes the claim of the lab with prefix. The file is created and
// locked under a temporary name and then renamed into place, so that no
// other process ever sees it unlocked.
func claim(prefix string) (*os.File, error) {
	if err := os.MkdirAll(claimDir, 0o700); err != nil {
		return nil, fmt.Errorf("claim lab %s: %w", prefix, err)
	}
	f, err := os.CreateTemp(claimDir, ".new-")
	if err != nil {
		return nil, fmt.Errorf("claim lab %s: %w", prefix, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("claim lab %s: lock: %w", prefix, err)
	}
	path := filepath.Join(claimDir, prefix+claimSuffix)
	if err := os.Rename(f.Name(), path); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("claim lab %s: %w", prefix, err)
	}
	// The watchdog removes the claim with the namespaces, so that a run it
	// cleaned up after leaves nothing at all.
	if err := watchdogNote("claim", path); err != nil {
		release(prefix, f)
		return nil, fmt.Errorf("claim lab %s: %w", prefix, err)
	}
	return f, nil
}

// release gives up a lab's claim once its namespaces are gone.
func release(prefix string, f *os.File) error {
	if f == nil {
		return nil
	}
	path := filepath.Join(claimDir, prefix+claimSuffix)
	err := os.Remove(path)
	f.Close()
	watchdogNote("unclaim", path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("release claim of lab %s: %w", prefix, err)
	}
	return nil
}

// reapAbandoned deletes what labs left behind when their process and its
// watchdog were both killed (a CI job or a whole session stopped with
// SIGKILL): the namespaces with their prefix, after killing every process in
// them, and their temporary directories. A lab is abandoned when nobody
// holds its claim; a lab of a live process, this one included, is never
// touched. It returns the namespaces it deleted.
func reapAbandoned() ([]string, error) {
	entries, err := os.ReadDir(claimDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reap abandoned labs: %w", err)
	}
	var reaped []string
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if !strings.HasSuffix(name, claimSuffix) || strings.HasPrefix(name, ".") {
			continue
		}
		prefix := strings.TrimSuffix(name, claimSuffix)
		deleted, err := reapLab(prefix, filepath.Join(claimDir, name))
		reaped = append(reaped, deleted...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	return reaped, errors.Join(errs...)
}

// reapLab cleans up one lab if its claim at path is not held.
func reapLab(prefix, path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil // released meanwhile
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return nil, nil // its process is alive
	}
	names, err := namespacesWithPrefix(prefix)
	if err != nil {
		return nil, err
	}
	var deleted []string
	var errs []error
	for _, n := range names {
		var st syscall.Stat_t
		if err := syscall.Stat(nsPath(n), &st); err == nil {
			if err := killProcessesIn(st.Dev, st.Ino); err != nil {
				errs = append(errs, fmt.Errorf("reap namespace %s: %w", n, err))
				continue
			}
		}
		if err := removeNamed(n); err != nil {
			errs = append(errs, fmt.Errorf("reap namespace %s: %w", n, err))
			continue
		}
		deleted = append(deleted, n)
	}
	dirs, _ := filepath.Glob(filepath.Join(tempBase(), tempDirPrefix(prefix)+"*"))
	inMemory, _ := filepath.Glob(filepath.Join("/dev/shm", tempDirPrefix(prefix)+"*"))
	for _, d := range append(dirs, inMemory...) {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, fmt.Errorf("reap lab %s: %w", prefix, err))
		}
	}
	if len(errs) == 0 {
		os.Remove(path) // still locked by us: nobody else reaps it meanwhile
	}
	return deleted, errors.Join(errs...)
}
