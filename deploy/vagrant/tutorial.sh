#!/bin/sh
# The Source IP tutorial (kubernetes.io/docs/tutorials/services/source-ip/)
# on the Vagrant cluster, with miniproxy doing kube-proxy's job. Run it on
# the control plane:
#
#   vagrant ssh cp -c /vagrant/deploy/vagrant/tutorial.sh
#
# "Outside" is the control-plane machine (192.168.56.10) calling the
# workers' NodePorts; the host (192.168.56.1) can run the same curl
# commands. There is no load balancer in this lab, so the tutorial's
# LoadBalancer part is left out. Safe to run again.
set -eu
nodes="192.168.56.11 192.168.56.12"
step() { printf '\n== %s\n' "$*"; }
run() {
	printf '$ %s\n' "$*"
	"$@"
}

step "miniproxy answers kube-proxy's endpoints: proxy mode, and health on every worker"
run curl -sS localhost:10249/proxyMode
echo
for ip in $nodes; do
	run curl -sS "http://$ip:10256/healthz"
	echo
done

step "the echo server"
kubectl create deployment source-ip-app --image=registry.k8s.io/echoserver:1.10 --dry-run=client -o yaml | kubectl apply -f -
run kubectl rollout status deployment/source-ip-app --timeout=3m
run kubectl get pods -l app=source-ip-app -o wide

step "ClusterIP: the endpoint sees the client pod's own address (no SNAT)"
kubectl expose deployment source-ip-app --name=clusterip --port=80 --target-port=8080 --dry-run=client -o yaml | kubectl apply -f -
cip=$(kubectl get service clusterip -o jsonpath='{.spec.clusterIP}')
run kubectl run busybox -i --rm --restart=Never --image=busybox:1.28 -- \
	sh -c "ip -4 addr show eth0 | grep inet; wget -qO - $cip | grep client_address"

step "NodePort, externalTrafficPolicy Cluster: every node answers, the endpoint sees a node's address"
kubectl expose deployment source-ip-app --name=nodeport --port=80 --target-port=8080 --type=NodePort --dry-run=client -o yaml | kubectl apply -f -
kubectl patch service nodeport -p '{"spec":{"externalTrafficPolicy":"Cluster"}}' >/dev/null
port=$(kubectl get service nodeport -o jsonpath='{.spec.ports[0].nodePort}')
sleep 2
for ip in $nodes; do
	run sh -c "curl -sS --max-time 3 http://$ip:$port/ | grep client_address"
done

step "NodePort, externalTrafficPolicy Local: only the node with the pod answers, and the endpoint sees the client (192.168.56.10)"
run kubectl patch service nodeport -p '{"spec":{"externalTrafficPolicy":"Local"}}'
sleep 2
for ip in $nodes; do
	run sh -c "curl -sS --max-time 3 http://$ip:$port/ | grep client_address || echo '(no answer: this node has no endpoint and drops the traffic)'"
done

step "a Service without endpoints is refused at once"
kubectl create service clusterip nobody --tcp=80:8080 --dry-run=client -o yaml | kubectl apply -f -
nip=$(kubectl get service nobody -o jsonpath='{.spec.clusterIP}')
sleep 2
run sh -c "curl -sS --max-time 3 http://$nip/ || true"

step "what miniproxy programmed on this node (all of it is in MP- chains)"
run sh -c "sudo iptables-save | grep -c -- '-A MP-' ; sudo iptables-save -t nat | grep -- 'default/nodeport' | head -5"

printf '\nTo clean up: kubectl delete deployment/source-ip-app service/clusterip service/nodeport service/nobody\n'
