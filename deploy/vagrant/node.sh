#!/bin/sh
# Every machine: containerd, kubelet, kubeadm, kubectl and the kernel
# settings kubeadm checks for. Arguments: the machine's address on the
# host-only network, the Kubernetes minor version (e.g. 1.37).
set -eux
ip=$1
minor=$2
export DEBIAN_FRONTEND=noninteractive

# The kubelet refuses to run with swap on.
swapoff -a
sed -i '/\sswap\s/s/^#*/#/' /etc/fstab

cat >/etc/modules-load.d/kubernetes.conf <<MODULES
overlay
br_netfilter
MODULES
modprobe overlay
modprobe br_netfilter
cat >/etc/sysctl.d/90-kubernetes.conf <<SYSCTL
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
SYSCTL
sysctl --system >/dev/null

apt-get update
apt-get install -y ca-certificates curl gpg iptables conntrack socat
install -m 0755 -d /etc/apt/keyrings
# containerd from Docker's repository: Debian 12's own containerd (1.6) is
# older than current kubelets support.
curl -fsSL https://download.docker.com/linux/debian/gpg | gpg --yes --dearmor -o /etc/apt/keyrings/docker.gpg
echo "deb [signed-by=/etc/apt/keyrings/docker.gpg] https://download.docker.com/linux/debian bookworm stable" >/etc/apt/sources.list.d/docker.list
curl -fsSL "https://pkgs.k8s.io/core:/stable:/v$minor/deb/Release.key" | gpg --yes --dearmor -o /etc/apt/keyrings/kubernetes.gpg
echo "deb [signed-by=/etc/apt/keyrings/kubernetes.gpg] https://pkgs.k8s.io/core:/stable:/v$minor/deb/ /" >/etc/apt/sources.list.d/kubernetes.list
apt-get update
apt-get install -y containerd.io kubelet kubeadm kubectl
apt-mark hold kubelet kubeadm kubectl

# The CRI plugin on (containerd.io ships with it off), systemd cgroups as
# the kubelet's default.
containerd config default >/etc/containerd/config.toml
sed -i 's/SystemdCgroup = false/SystemdCgroup = true/' /etc/containerd/config.toml
systemctl restart containerd

# The kubelet must announce the host-only address, not the address of
# Vagrant's NAT interface (the same on every machine).
echo "KUBELET_EXTRA_ARGS=--node-ip=$ip" >/etc/default/kubelet
systemctl enable kubelet
