#!/usr/bin/env bash
# Builds the real kube-apiserver and kube-controller-manager (the namespace
# lab's control plane; the controller manager runs the EndpointSlice
# controller) and upstream kube-proxy (the benchmark's and the parity test's
# baseline) from the k8s.io/kubernetes Go module,
# at the release pinned in test/tools/go.mod, using only the Go module proxy:
# no Kubernetes checkout, no release download.
#
# A build takes several minutes on 2 cores, so the binaries are cached once
# per machine, outside the checkout, in a directory keyed by the release:
#
#   ${MINIPROXY_K8S_CACHE:-/var/cache/miniproxy}/k8s-<version>/{kube-apiserver,kube-proxy,kube-controller-manager}
#
# Nothing is built when all binaries are there and answer --version with the
# expected release. Binaries are built into a temporary directory next to the
# cache and renamed into place, so an interrupted build never leaves a
# half-written binary; concurrent runs wait for each other (flock).
#
# On success stdout holds exactly four lines, the paths of kube-apiserver,
# kube-proxy, kube-controller-manager and kubectl (test/netns reads them;
# the demo and the deploy tests use this kubectl, not one on the machine); progress
# goes to stderr, with a line every 10 s while the build runs.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/test/tools"
export PATH="$PATH:/usr/local/go/bin"

log() { echo "build-k8s: $*" >&2; }

version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$tools/go.mod")"
if [ -z "$version" ]; then
  log "cannot find the k8s.io/kubernetes version in $tools/go.mod"
  exit 1
fi
base="${MINIPROXY_K8S_CACHE:-/var/cache/miniproxy}"
dir="$base/k8s-$version"
bins=(kube-apiserver kube-proxy kube-controller-manager kubectl)

# says prints what a binary says its version is: "Kubernetes vX.Y.Z" for
# the servers and kube-proxy, and for kubectl the same from its client
# version.
says() {
  if [ "$(basename "$1")" = kubectl ]; then
    "$1" version --client 2>/dev/null | sed -n 's/^Client Version: /Kubernetes /p'
  else
    "$1" --version 2>/dev/null
  fi
}

# missing lists the binaries that are not there or not $version.
missing() {
  local b
  for b in "${bins[@]}"; do
    if [ ! -x "$dir/$b" ] || [ "$(says "$dir/$b")" != "Kubernetes $version" ]; then
      echo "$b"
    fi
  done
}

# works reports whether every binary exists and says it is $version.
works() { [ -z "$(missing)" ]; }

report() {
  local b
  for b in "${bins[@]}"; do echo "$dir/$b"; done
}

if works; then
  report
  exit 0
fi

if ! mkdir -p "$dir" 2>/dev/null || [ ! -w "$dir" ]; then
  log "cannot write to $dir; set MINIPROXY_K8S_CACHE to a writable directory"
  exit 1
fi
exec 9>"$dir/.lock"
flock 9
if works; then # another run built them while we waited
  report
  exit 0
fi

command -v go >/dev/null || { log "go not found (install Go 1.26)"; exit 1; }

# The version variables that Kubernetes' own build (hack/lib/version.sh)
# sets, so that --version, /version and kubectl's skew check see the release
# instead of v0.0.0-master.
minor="${version#v1.}"
minor="${minor%%.*}"
build_date="$(cd "$tools" && go list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=${build_date:-1970-01-01T00:00:00Z}"
done

# Only what is missing is built (a cache from before kubectl was added
# gets just kubectl).
mapfile -t need < <(missing)
pkgs=()
for b in "${need[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
tmp="$(mktemp -d "$base/.build-k8s-$version.XXXXXX")"
log "building ${need[*]} $version into $dir (several minutes on 2 cores)"
start=$SECONDS
( while sleep 10; do log "still building, $((SECONDS - start))s so far"; done ) &
ticker=$!
trap 'kill "$ticker" 2>/dev/null; rm -rf "$tmp"' EXIT
(
  cd "$tools"
  go build -trimpath -ldflags="$ldflags" -o "$tmp/" "${pkgs[@]}"
)
kill "$ticker" 2>/dev/null || true
for b in "${need[@]}"; do
  out="$(says "$tmp/$b")"
  if [ "$out" != "Kubernetes $version" ]; then
    log "$b says its version is '$out', want 'Kubernetes $version'"
    exit 1
  fi
  mv -f "$tmp/$b" "$dir/$b"
done
log "built in $((SECONDS - start))s"
report
