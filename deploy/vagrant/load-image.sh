#!/bin/sh
# Every machine: load the miniproxy image that deploy/vagrant/build-image.sh
# saved on the host into containerd's k8s.io namespace, where the kubelet
# finds it (the DaemonSet's imagePullPolicy is IfNotPresent: nothing is
# pulled).
set -eu
tar=/vagrant/bin/miniproxy-image.tar
if [ ! -f "$tar" ]; then
	echo "load-image: $tar is missing. On the host: deploy/vagrant/build-image.sh, then" >&2
	echo "  vagrant rsync && vagrant provision --provision-with image" >&2
	exit 1
fi
ctr -n k8s.io images import "$tar"
ctr -n k8s.io images ls -q | grep 'miniproxy:dev'
