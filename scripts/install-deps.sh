#!/usr/bin/env bash
# Installs what building and testing miniproxy needs on a fresh Debian 12
# machine (run as root). Safe to run again: it only installs what is missing.
set -euo pipefail

packages=(iptables nftables conntrack curl iproute2 etcd-server kmod)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1; then
  if [ -x /usr/local/go/bin/go ]; then
    echo "Go is at /usr/local/go/bin; add it to PATH" >&2
  else
    echo "Go is missing: install Go 1.26 (https://go.dev/dl) first" >&2
  fi
  exit 1
fi
go mod download
