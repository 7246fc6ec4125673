// Command gotestprogress runs `go test -json` with the arguments it is
// given and prints what plain `go test` would print (the "ok" line of each
// package that passed, the whole text of each that failed, build errors on
// stderr, a last "FAIL"), plus progress lines on stderr: every 10 s which
// packages and tests are running and for how long, each failed test as soon
// as it fails, each test that ran longer than 10 s when it ends. It exits
// with go test's exit status.
//
// In package list mode plain go test prints nothing about a package until
// it has finished, which for the namespace lab's packages is minutes;
// go test -json streams its events as they happen, and this turns them back
// into plain text. `make test` and `make unit` run it:
//
//	gotestprogress -count=1 -timeout 25m ./...
//
// With "-" as its only argument it reads go test -json events from stdin
// instead (exit status 1 if a package or build failed):
//
//	go test -json ./pkg/... | gotestprogress -
//
// GOTESTPROGRESS_INTERVAL sets the period of the progress lines (default
// 10s); GO names the go command (default go).
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	goCmd := os.Getenv("GO")
	if goCmd == "" {
		goCmd = "go"
	}
	start := time.Now()
	p := NewPrinter(os.Stdout, os.Stderr, os.Stderr, start)
	if s := os.Getenv("GOTESTPROGRESS_INTERVAL"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			fmt.Fprintf(os.Stderr, "gotestprogress: GOTESTPROGRESS_INTERVAL=%q is not a positive duration\n", s)
			return 2
		}
		p.Interval = d
	}

	var mu sync.Mutex
	stop := make(chan struct{})
	ticked := make(chan struct{})
	go func() {
		defer close(ticked)
		t := time.NewTicker(p.Interval)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case now := <-t.C:
				mu.Lock()
				p.Tick(now)
				mu.Unlock()
			}
		}
	}()
	feed := func(r io.Reader) {
		br := bufio.NewReaderSize(r, 64<<10)
		for {
			line, err := br.ReadBytes('\n')
			if len(line) > 0 {
				mu.Lock()
				var e Event
				if bytes.HasPrefix(line, []byte("{")) && json.Unmarshal(line, &e) == nil && e.Action != "" {
					if e.Time.IsZero() {
						e.Time = time.Now()
					}
					p.Event(e)
				} else {
					os.Stdout.Write(line) // not an event: pass it on
				}
				mu.Unlock()
			}
			if err != nil {
				return
			}
		}
	}
	finish := func(code int) int {
		close(stop)
		<-ticked
		mu.Lock()
		defer mu.Unlock()
		return p.Finish(time.Now(), code)
	}

	if len(args) == 1 && args[0] == "-" {
		if m := goList(goCmd, "-m"); len(m) > 0 {
			p.Trim = m[0]
		}
		feed(os.Stdin)
		return finish(0)
	}

	// The module of each package: their number, for "12 of 27 packages
	// done", and the module path, left out of package names in progress
	// lines.
	if mods := goList(goCmd, append([]string{"-e", "-f", "{{with .Module}}{{.Path}}{{end}}"}, packageArgs(args)...)...); len(mods) > 0 {
		p.Trim, p.Total = mods[0], len(mods)
	}
	n := "packages unknown"
	if p.Total > 0 {
		n = packages(p.Total)
	}
	mu.Lock()
	p.progressf(start, "go test %s (%s): plain go test's output, each package's when it ends, and every %s a line like this one saying what runs", strings.Join(args, " "), n, p.Interval)
	mu.Unlock()
	cmd := exec.Command(goCmd, append([]string{"test", "-json"}, args...)...)
	cmd.Stdin = os.Stdin
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "gotestprogress:", err)
		return 2
	}
	// Ctrl-C reaches go test and the tests too (one process group): keep
	// reading until go test has printed what it has to say and exits. A
	// SIGTERM sent to this process alone is passed on.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "gotestprogress:", err)
		return 2
	}
	go func() {
		for s := range sigs {
			if s == syscall.SIGTERM {
				cmd.Process.Signal(s)
			}
		}
	}()
	feed(stdout)
	err = cmd.Wait()
	code := 0
	if ee, ok := errors.AsType[*exec.ExitError](err); ok {
		code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			fmt.Fprintf(os.Stderr, "gotestprogress: go test was killed by %v\n", ws.Signal())
			code = 128 + int(ws.Signal())
		}
	} else if err != nil {
		fmt.Fprintln(os.Stderr, "gotestprogress:", err)
		code = 2
	}
	return finish(code)
}

// goList runs go list with args and returns the words it printed (none if
// it failed: the progress lines do without).
func goList(goCmd string, args ...string) []string {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, goCmd, append([]string{"list"}, args...)...).Output()
	if err != nil {
		return nil
	}
	return strings.Fields(string(out))
}

// valueFlags are go test's and go build's flags that take a value as
// the next argument.
var valueFlags = map[string]bool{}

func init() {
	for _, f := range strings.Fields(`C p asmflags buildmode compiler gccgoflags gcflags installsuffix ldflags mod modfile
		overlay pgo pkgdir tags toolexec exec o vet run skip bench benchtime count cpu parallel timeout shuffle fuzz
		fuzztime fuzzminimizetime list blockprofile blockprofilerate coverprofile covermode coverpkg cpuprofile memprofile
		memprofilerate mutexprofile mutexprofilefraction outputdir trace`) {
		valueFlags[f] = true
	}
}

// packageArgs picks the package patterns out of go test's arguments:
// go test [build/test flags] [packages] [flags for the tests].
func packageArgs(args []string) []string {
	i := 0
	for i < len(args) && strings.HasPrefix(args[i], "-") {
		name := strings.TrimLeft(args[i], "-")
		i++
		if !strings.Contains(name, "=") && valueFlags[name] {
			i++
		}
	}
	var pkgs []string
	for ; i < len(args) && !strings.HasPrefix(args[i], "-"); i++ {
		pkgs = append(pkgs, args[i])
	}
	return pkgs
}
