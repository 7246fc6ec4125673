#!/bin/sh
# Builds the miniproxy image on the host and saves it where the Vagrant
# machines load it from (bin/miniproxy-image.tar, rsynced to /vagrant).
# Uses docker, or podman when docker is missing.
set -eu
cd "$(dirname "$0")/../.."
engine=docker
command -v docker >/dev/null 2>&1 || engine=podman
mkdir -p bin
"$engine" build -t miniproxy:dev .
# podman names local images localhost/miniproxy:dev; save under the name the
# DaemonSet uses (docker.io/library/miniproxy:dev once imported).
if [ "$engine" = podman ]; then
	podman tag miniproxy:dev docker.io/library/miniproxy:dev
	podman save --format docker-archive -o bin/miniproxy-image.tar docker.io/library/miniproxy:dev
else
	docker save -o bin/miniproxy-image.tar miniproxy:dev
fi
echo "saved bin/miniproxy-image.tar; next: vagrant up (or deploy/vagrant/reload-image.sh on a running cluster)"
