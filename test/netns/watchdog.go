package netns

import (
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
)

// watchdogScript is run by bash with a pipe from this process on stdin. It
// records the namespaces announced with "add NAME" and forgotten with
// "del NAME"; when the pipe reaches end of file, which happens however this
// process ends (including SIGKILL and the panic of a test timeout), it kills
// every process inside the namespaces still recorded and deletes them, then
// removes the lab's temporary directories announced with "dir PATH" and not
// yet forgotten with "undir PATH" (see Lab.TempDir), and last the claim
// files announced with "claim PATH" and not forgotten with "unclaim PATH"
// (see claim.go), each only if no namespace with its lab's prefix is left,
// so that the next lab can still reap it. It
// ignores terminal signals and runs in its own process group so that Ctrl-C
// does not kill it before it has done its job.
const watchdogScript = `
trap '' INT TERM HUP
declare -A live dirs claims
while read -r op name; do
	case "$op" in
	add) live["$name"]=1 ;;
	del) unset "live[$name]" ;;
	dir) dirs["$name"]=1 ;;
	undir) unset "dirs[$name]" ;;
	claim) claims["$name"]=1 ;;
	unclaim) unset "claims[$name]" ;;
	esac
done
for n in "${!live[@]}"; do
	for round in 1 2 3; do
		pids=$(ip netns pids "$n" 2>/dev/null)
		[ -z "$pids" ] && break
		kill -9 $pids 2>/dev/null
		sleep 0.2
	done
	ip netns del "$n" 2>/dev/null
done
for d in "${!dirs[@]}"; do
	rm -rf -- "$d"
done
for c in "${!claims[@]}"; do
	p=$(basename "$c" claim)
	ls /run/netns 2>/dev/null | grep -q "^$p" || rm -f -- "$c"
done
exit 0
`

// watchdog is the per-process state of the cleanup watchdog: it is started
// once, by the first lab, and is told about every namespace before it is
// created and after it is deleted.
var watchdog struct {
	once sync.Once
	err  error
	mu   sync.Mutex
	pipe *os.File
	pid  int
}

// ensureWatchdog starts the watchdog process if it is not running yet.
func ensureWatchdog() error {
	watchdog.once.Do(func() {
		bash, err := exec.LookPath("bash")
		if err != nil {
			watchdog.err = fmt.Errorf("start watchdog: %w", err)
			return
		}
		if _, err := exec.LookPath("ip"); err != nil {
			watchdog.err = fmt.Errorf("start watchdog: %w", err)
			return
		}
		r, w, err := os.Pipe()
		if err != nil {
			watchdog.err = fmt.Errorf("start watchdog: pipe: %w", err)
			return
		}
		cmd := exec.Command(bash, "-c", watchdogScript)
		cmd.Stdin = r
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			r.Close()
			w.Close()
			watchdog.err = fmt.Errorf("start watchdog: %w", err)
			return
		}
		r.Close()
		go cmd.Wait() // reap it should it ever exit early
		watchdog.pipe = w
		watchdog.pid = cmd.Process.Pid
	})
	return watchdog.err
}

// watchdogNote tells the watchdog that namespace name was added ("add") or
// deleted ("del"). Names are validated by AddNamespace, so they contain no
// whitespace.
func watchdogNote(op, name string) error {
	watchdog.mu.Lock()
	defer watchdog.mu.Unlock()
	if watchdog.pipe == nil {
		return fmt.Errorf("watchdog not running")
	}
	if _, err := fmt.Fprintf(watchdog.pipe, "%s %s\n", op, name); err != nil {
		return fmt.Errorf("tell watchdog %s %s: %w", op, name, err)
	}
	return nil
}
