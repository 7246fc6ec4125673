#!/bin/sh
# Applies deploy/ to the cluster of the current kubeconfig, with the two
# cluster-specific values of the ConfigMap filled in (the files in deploy/
# are left as they are). Usable on any cluster, not only the Vagrant one:
#
#   deploy/vagrant/apply-deploy.sh https://192.168.56.10:6443 10.244.0.0/16
#
# Arguments: the API server as the nodes reach it (never a Service IP), the
# pods' range (default 10.244.0.0/16).
set -eu
server=$1
pods=${2:-10.244.0.0/16}
src=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp "$src"/*.yaml "$dir"/
sed -i \
	-e "s#https://CONTROL_PLANE_ENDPOINT:6443#$server#" \
	-e "s#clusterCIDR: 10.244.0.0/16#clusterCIDR: $pods#" \
	"$dir/02-configmap.yaml"
kubectl apply -f "$dir"
