#!/usr/bin/env bash
# Installs what building and testing miniproxy needs on a fresh Debian 12
# machine (run as root). Safe to run again: it only installs what is missing.
set -euo pipefail

packages=(iptables nftables conntrack curl iproute2 etcd-server kmod)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
progress="$(dirname "$0")/progress.sh"
if ((${#missing[@]})); then
  echo "installing with apt-get: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "$progress" "apt-get update" apt-get update -qq
  "$progress" "apt-get install" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1; then
  if [ -x /usr/local/go/bin/go ]; then
    echo "Go is at /usr/local/go/bin; add it to PATH" >&2
  else
    echo "Go is missing: install Go 1.26 (https://go.dev/dl) first" >&2
  fi
  exit 1
fi
# go.mod says which Go the module needs; an older one would fail later with
# a less clear message, or try to download a toolchain this machine cannot
# reach.
want="$(awk '$1 == "go" { print $2; exit }' go.mod)"
have="$(go env GOVERSION | sed 's/^go//')"
if [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -1)" != "$want" ]; then
  echo "Go $have is too old: miniproxy needs Go $want or newer (go.mod); install it from https://go.dev/dl" >&2
  exit 1
fi
echo "Go $have (go.mod needs $want or newer)"
# Only when the module cache lacks some of go.mod's modules (an empty one
# takes about 240 MB; 12 s here).
if ! GOPROXY=off go mod download 2>/dev/null; then
  echo "downloading the Go modules go.mod needs into $(go env GOMODCACHE)"
  "$progress" "go mod download" go mod download
fi
