// Command restoreshim stands in for iptables-restore, ip6tables-restore and
// nft on the PATH of a proxy under benchmark (test/bench), so that the size
// of every restore input can be measured the same way for miniproxy and for
// upstream kube-proxy in either mode, which does not export it (its
// nftables mode writes each transaction with `nft -f -`).
//
// It reads its whole standard input, runs the real command (named like
// itself, from the directory in $BENCH_REAL_DIR) with the same arguments and
// that input, passes on its output and exit status, and then appends one
// JSON line to $BENCH_RESTORE_LOG: when it started, when the real command
// ended, its exit status, and the input's size in bytes and lines with its
// rule, chain and DNAT counts. It never changes the input. Its own cost is
// one extra process and one copy of the input (about a millisecond), and the
// log line is written after the real command has exited, so the rules are
// in the kernel before the shim spends any time of its own.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Record is one line of the log; test/bench reads it back.
type Record struct {
	Command string   `json:"command"`
	Args    []string `json:"args"`
	Start   int64    `json:"start"` // Unix nanoseconds, when the shim started
	Exec    int64    `json:"exec"`  // when the real command was started
	End     int64    `json:"end"`   // when it had exited
	Exit    int      `json:"exit"`
	Bytes   int      `json:"bytes"`
	Lines   int      `json:"lines"`
	Rules   int      `json:"rules"`  // "-A" lines
	Chains  int      `json:"chains"` // ":" lines (chains declared, so flushed or created)
	Deletes int      `json:"deletes"`
	DNAT    int      `json:"dnat"`
	// Elements are nft "add element" lines: in upstream's nftables mode
	// the Services live in verdict maps, one element per Service port.
	Elements int      `json:"elements,omitempty"`
	Tables   []string `json:"tables"`
}

func main() {
	start := time.Now()
	name := filepath.Base(os.Args[0])
	realDir := os.Getenv("BENCH_REAL_DIR")
	if realDir == "" {
		fmt.Fprintln(os.Stderr, "restoreshim: BENCH_REAL_DIR is not set")
		os.Exit(2)
	}
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "restoreshim: read stdin:", err)
		os.Exit(2)
	}
	real := filepath.Join(realDir, name)
	cmd := exec.Command(real, os.Args[1:]...)
	cmd.Stdin = bytes.NewReader(input)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	execAt := time.Now()
	err = cmd.Run()
	end := time.Now()
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else {
			fmt.Fprintln(os.Stderr, "restoreshim:", err)
			code = 2
		}
	}
	rec := Record{Command: name, Args: os.Args[1:], Start: start.UnixNano(), Exec: execAt.UnixNano(),
		End: end.UnixNano(), Exit: code, Bytes: len(input)}
	if name == "nft" {
		countNFT(&rec, input)
	} else {
		countRestore(&rec, input)
	}
	if path := os.Getenv("BENCH_RESTORE_LOG"); path != "" {
		if b, err := json.Marshal(rec); err == nil {
			if f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644); err == nil {
				f.Write(append(b, '\n'))
				f.Close()
			}
		}
	}
	os.Exit(code)
}

// countRestore counts the lines of an iptables-restore input.
func countRestore(rec *Record, input []byte) {
	sc := bufio.NewScanner(bytes.NewReader(input))
	sc.Buffer(make([]byte, 1<<20), 1<<26)
	for sc.Scan() {
		l := sc.Text()
		rec.Lines++
		switch {
		case strings.HasPrefix(l, "-A "), strings.HasPrefix(l, "-I "):
			rec.Rules++
			if strings.Contains(l, "-j DNAT") {
				rec.DNAT++
			}
		case strings.HasPrefix(l, ":"):
			rec.Chains++
		case strings.HasPrefix(l, "-X "), strings.HasPrefix(l, "-D "), strings.HasPrefix(l, "-F "):
			rec.Deletes++
		case strings.HasPrefix(l, "*"):
			rec.Tables = append(rec.Tables, strings.TrimPrefix(l, "*"))
		}
	}
}

// countNFT counts the commands of an `nft -f` input ("add rule ip
// kube-proxy <chain> ..."); Tables names each table written to, as
// "<family> <name>". A call without input (`nft --version`, a listing)
// names none.
func countNFT(rec *Record, input []byte) {
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(input))
	sc.Buffer(make([]byte, 1<<20), 1<<26)
	for sc.Scan() {
		l := sc.Text()
		rec.Lines++
		f := strings.Fields(l)
		if len(f) < 4 {
			continue
		}
		verb, object := f[0], f[1]
		switch verb {
		case "add", "create", "insert", "replace", "delete", "destroy", "flush":
		default:
			continue
		}
		if t := f[2] + " " + f[3]; !seen[t] {
			seen[t] = true
			rec.Tables = append(rec.Tables, t)
		}
		switch {
		case verb == "delete" || verb == "destroy" || verb == "flush":
			rec.Deletes++
		case object == "rule":
			rec.Rules++
			if strings.Contains(l, " dnat ") {
				rec.DNAT++
			}
		case object == "chain":
			rec.Chains++
		case object == "element":
			rec.Elements++
		}
	}
}
