#!/bin/sh
# After changing miniproxy, on a running Vagrant cluster: rebuild the image,
# load it on every machine and restart the DaemonSet's pods, one node at a
# time (its rolling update).
set -eu
cd "$(dirname "$0")/../.."
deploy/vagrant/build-image.sh
vagrant rsync
for m in cp w1 w2; do
	vagrant provision "$m" --provision-with image
done
vagrant ssh cp -c 'kubectl -n kube-system rollout restart daemonset/miniproxy && kubectl -n kube-system rollout status daemonset/miniproxy'
