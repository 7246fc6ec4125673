package netns

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Process is a background process running in a lab namespace, such as an
// echo server, miniproxy or the API server. It runs in its own process group
// so that stopping it also stops what it spawned, and its combined output is
// kept (the last MiB) for failure messages.
type Process struct {
	ns   *Namespace
	name string
	cmd  *exec.Cmd
	out  *tailBuffer
	done chan struct{}
	err  error

	stopOnce sync.Once
}

// stopGrace is how long Stop waits after SIGTERM before SIGKILL.
const stopGrace = 3 * time.Second

// Start starts name with args in the namespace in the background. The
// process is stopped by Process.Stop or, at the latest, by Lab.Close.
func (n *Namespace) Start(name string, args ...string) (*Process, error) {
	return n.StartCmd(exec.Command(name, args...))
}

// StartCmd is Start for a command prepared by the caller, e.g. with Env or
// Dir set. cmd must not have been started. Its Stdout and Stderr, if set,
// still receive the output, which is also captured for Output. The process
// group setting is forced, since Stop and Close rely on it.
func (n *Namespace) StartCmd(cmd *exec.Cmd) (*Process, error) {
	name := filepath.Base(cmd.Path)
	if cmd.Process != nil {
		return nil, fmt.Errorf("start %s in %s: command already started", name, n.name)
	}
	p := &Process{ns: n, name: name, cmd: cmd, out: newTailBuffer(1 << 20), done: make(chan struct{})}
	cmd.Stdout = teeTo(cmd.Stdout, p.out)
	if cmd.Stderr == nil {
		cmd.Stderr = cmd.Stdout // one pipe, so the output stays in order
	} else {
		cmd.Stderr = teeTo(cmd.Stderr, p.out)
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	// Grandchildren holding the output pipe must not block Wait forever.
	cmd.WaitDelay = 2 * time.Second

	l := n.lab
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, fmt.Errorf("start %s in %s: lab is closed", name, n.name)
	}
	if err := n.Do(cmd.Start); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", name, n.name, err)
	}
	l.procs = append(l.procs, p)
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// teeTo returns a writer that sends to both w (when not nil) and tail.
func teeTo(w io.Writer, tail *tailBuffer) io.Writer {
	if w == nil {
		return tail
	}
	return io.MultiWriter(w, tail)
}

// Pid returns the process id, which is also its process group id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Output returns what the process wrote to stdout and stderr so far (the
// last MiB of it), to explain failures.
func (p *Process) Output() string { return p.out.String() }

// Done is closed when the process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err returns how the process ended (nil for exit status 0), once Done is
// closed; before that it returns nil.
func (p *Process) Err() error {
	select {
	case <-p.done:
		return p.err
	default:
		return nil
	}
}

// Stop sends SIGTERM to the process group, waits up to 3 seconds for the
// process to exit, then sends SIGKILL. It returns an error only if the
// process could not be ended; descendants that left the process group are
// killed by Lab.Close, which kills everything in the lab's namespaces.
func (p *Process) Stop() error {
	var err error
	p.stopOnce.Do(func() {
		select {
		case <-p.done:
			return
		default:
		}
		pgid := p.cmd.Process.Pid
		syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-p.done:
			return
		case <-time.After(stopGrace):
		}
		syscall.Kill(-pgid, syscall.SIGKILL)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			err = fmt.Errorf("stop %s (pid %d) in %s: still running after SIGKILL", p.name, pgid, p.ns.name)
		}
	})
	return err
}

// WaitForOutput waits until the process has written want (e.g. a "listening
// on" line), so tests can start using a server as soon as it is ready. It
// fails if the process exits first or ctx ends.
func (p *Process) WaitForOutput(ctx context.Context, want string) error {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if strings.Contains(p.out.String(), want) {
			return nil
		}
		select {
		case <-p.done:
			if strings.Contains(p.out.String(), want) {
				return nil
			}
			return fmt.Errorf("%s in %s exited (%v) before writing %q; output:\n%s", p.name, p.ns.name, p.err, want, p.Output())
		case <-ctx.Done():
			return fmt.Errorf("wait for %q from %s in %s: %w; output:\n%s", want, p.name, p.ns.name, ctx.Err(), p.Output())
		case <-tick.C:
		}
	}
}

// Run runs name with args in the namespace, waits for it and returns its
// stdout and stderr. A non-zero exit is an error that quotes stderr. When ctx
// ends, the command's whole process group is killed.
func (n *Namespace) Run(ctx context.Context, name string, args ...string) (stdout, stderr string, err error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	if err := n.Do(cmd.Start); err != nil {
		return "", "", fmt.Errorf("run %s in %s: %w", name, n.name, err)
	}
	err = cmd.Wait()
	if err != nil {
		err = fmt.Errorf("run %s %s in %s: %w: %s", name, strings.Join(args, " "), n.name, err, strings.TrimSpace(se.String()))
	}
	return so.String(), se.String(), err
}

// tailBuffer is a goroutine-safe writer that keeps the last max bytes.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{max: max} }

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if len(b.buf) > 2*b.max {
		b.buf = append([]byte(nil), b.buf[len(b.buf)-b.max:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.buf) > b.max {
		return string(b.buf[len(b.buf)-b.max:])
	}
	return string(b.buf)
}
