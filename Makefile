# The two commands of the README: `make demo` and `make test`. Both install
# what they need first. Run as root: the tests build network namespaces.
export PATH := $(PATH):/usr/local/go/bin
GO ?= go

.PHONY: deps build demo test unit vet k8s-binaries bench parity drills gotestprogress

deps:
	./scripts/install-deps.sh

build: deps
	$(GO) build -o bin/ ./cmd/...

# On a fresh machine go vet compiles every dependency first: a line every 10 s.
vet:
	./scripts/progress.sh "go vet" $(GO) vet ./...

# go test -json turned back into plain go test's text, with a progress line
# every 10 s (which packages and tests run, for how long) on stderr, and go
# test's exit status: in package list mode plain go test says nothing about
# a package before it ends, minutes for the lab's packages.
gotestprogress:
	$(GO) build -o bin/gotestprogress ./test/gotestprogress

# kube-apiserver and kube-proxy for the lab, cached once per machine.
k8s-binaries: deps
	./scripts/build-k8s.sh

# The tutorial, walked in the namespace lab with a real API server.
demo: deps k8s-binaries
	./scripts/progress.sh "building the demo" $(GO) build -o bin/demo ./test/demo
	bin/demo

# Every test, the namespace tests included (they need root).
test: deps vet k8s-binaries gotestprogress
	GO=$(GO) bin/gotestprogress -count=1 -timeout 25m ./...

# Tests that need neither root nor the kernel, also when run as root (the
# kernel tests of pkg/ skip under MINIPROXY_UNIT_ONLY; the rest of test/ needs
# both).
unit: gotestprogress
	MINIPROXY_UNIT_ONLY=1 GO=$(GO) bin/gotestprogress -count=1 ./pkg/... ./cmd/... ./deploy/... ./test/gotestprogress

# miniproxy against upstream kube-proxy (iptables and nftables modes) at
# 1k/10k/30k Services in the lab; writes docs/performance.md and
# docs/performance.svg. Took about 50 minutes with two proxies and 5 changes a
# run; now three proxies and 20 changes. Flags via BENCH_ARGS, e.g.
# make bench BENCH_ARGS="-sizes 100,1000", "-huge" (adds 100,000 Services),
# "-placement other,local" (endpoints on other nodes and on the measured node).
bench: deps k8s-binaries
	$(GO) run ./test/bench $(BENCH_ARGS)

# miniproxy against upstream kube-proxy on 500 randomized cluster states;
# writes the summary into docs/parity.md. About 15 minutes.
parity: deps k8s-binaries
	$(GO) test -count=1 -timeout 60m -v -run TestParity ./test/parity -parity.scenarios=500 -parity.report=$(CURDIR)/docs/parity.md

# The fault drills alone (they are part of `make test`), with their figures
# written into docs/reliability.md.
drills: deps k8s-binaries
	$(GO) test -count=1 -timeout 40m -v ./test/faults -faults.services=10000 -faults.report=$(CURDIR)/docs/reliability.md
