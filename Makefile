# The two commands of the README: `make demo` and `make test`. Both install
# what they need first. Run as root: the tests build network namespaces.
export PATH := $(PATH):/usr/local/go/bin
GO ?= go

.PHONY: deps build demo test unit vet k8s-binaries

deps:
	./scripts/install-deps.sh

build: deps
	$(GO) build -o bin/ ./cmd/...

vet:
	$(GO) vet ./...

# kube-apiserver and kube-proxy for the lab, cached once per machine.
k8s-binaries: deps
	./scripts/build-k8s.sh

# The tutorial, walked in the namespace lab with a real API server.
demo: deps k8s-binaries
	$(GO) run ./test/demo

# Every test, the namespace tests included (they need root).
test: deps vet k8s-binaries
	$(GO) test -count=1 -timeout 25m ./...

# Tests that need neither root nor the kernel.
unit:
	$(GO) test -count=1 ./pkg/...
