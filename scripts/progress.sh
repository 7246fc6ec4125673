#!/usr/bin/env bash
# progress.sh WHAT COMMAND [ARGS...] runs COMMAND and, while it runs, says
# on stderr every 10 s that WHAT is still going and for how long; if it took
# 10 s or more, how long it took. It exits with COMMAND's status. For steps
# that say nothing while they work (go vet compiling the dependencies on a
# fresh machine, go mod download, apt-get).
set -uo pipefail
what="$1"
shift
start=$SECONDS
( while sleep 10; do echo "$what: still running, $((SECONDS - start))s so far" >&2; done ) &
ticker=$!
trap 'kill "$ticker" 2>/dev/null' EXIT
# The command runs in the foreground, so that Ctrl-C reaches it.
"$@"
rc=$?
kill "$ticker" 2>/dev/null
if ((SECONDS - start >= 10)); then
  echo "$what: took $((SECONDS - start))s" >&2
fi
exit "$rc"
