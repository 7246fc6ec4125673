#!/bin/sh
# The control plane: kubeadm without its kube-proxy addon, miniproxy from
# deploy/, then flannel. Arguments: the control plane's address, the pods'
# range, the join token the workers use.
set -eux
ip=$1
pods=$2
token=$3
export KUBECONFIG=/etc/kubernetes/admin.conf

if [ ! -f "$KUBECONFIG" ]; then
	kubeadm init \
		--apiserver-advertise-address="$ip" \
		--pod-network-cidr="$pods" \
		--token="$token" --token-ttl=0 \
		--skip-phases=addon/kube-proxy
fi
install -d -o vagrant -g vagrant /home/vagrant/.kube
install -o vagrant -g vagrant -m 0600 "$KUBECONFIG" /home/vagrant/.kube/config

# miniproxy before the CNI plugin: flannel and CoreDNS reach the API server
# through the kubernetes Service (10.96.0.1), which only works once a proxy
# runs. miniproxy itself uses the host network and the API server's own
# address, so it needs neither.
/vagrant/deploy/vagrant/apply-deploy.sh "https://$ip:6443" "$pods"
kubectl -n kube-system rollout status daemonset/miniproxy --timeout=5m

# flannel on the host-only network (eth1), not on Vagrant's NAT interface.
kubectl apply -f https://github.com/flannel-io/flannel/releases/latest/download/kube-flannel.yml
kubectl -n kube-flannel patch daemonset kube-flannel-ds --type=json \
	-p '[{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--iface=eth1"}]'
