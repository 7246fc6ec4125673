#!/usr/bin/env bash
# Records what go test prints for the fixture packages, plain and with
# -json, for printer_test.go: <case>.json (go test -json's stdout),
# <case>.txt and <case>.err (plain go test's stdout and stderr) and
# <case>.exit (its exit status). Run it again after a Go upgrade.
set -uo pipefail
cd "$(dirname "$0")"
record() {
  local name="$1"; shift
  (cd fixtures && go test -trimpath -count=1 -json "$@" >"../$name.json" 2>/dev/null)
  (cd fixtures && go test -trimpath -count=1 "$@" >"../$name.txt" 2>"../$name.err"; echo $? >"../$name.exit")
}
record pass ./pass ./notests
record fail ./failing ./mainprint
record build ./broken ./vetbad ./pass
record panic ./panicky
record timeout -timeout 2s ./timeout
