# The two commands of the README: `make demo` and `make test`. Both install
# what they need first. Run as root: the tests build network namespaces.
export PATH := $(PATH):/usr/local/go/bin
GO ?= go

.PHONY: deps build test unit vet

deps:
	./scripts/install-deps.sh

build: deps
	$(GO) build -o bin/ ./cmd/...

vet:
	$(GO) vet ./...

# Every test, the namespace tests included (they need root).
test: deps vet
	$(GO) test -count=1 -timeout 25m ./...

# Tests that need neither root nor the kernel.
unit:
	$(GO) test -count=1 ./pkg/...
