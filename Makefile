# wsplice — make help lists the targets.
SHELL := /bin/bash
GO    ?= go
BIN   := bin/wsplice
PKGS  := ./...
# Tests that need root run as root in CI (CI=true fails them instead of skipping).
TESTFLAGS ?= -race -count=1 -timeout 30m

IMAGE ?= wsplice:dev

.PHONY: help build demo image test test-short lint generate generate-check bench bench-quick soak fuzz deps clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

build: ## build bin/wsplice
	$(GO) build -trimpath -o $(BIN) ./cmd/wsplice

demo: build ## run the demo: echo backends, wsplice on sockmap, real WebSocket clients
	./$(BIN) demo

test: ## run every test (privileged ones need root; CI=true makes them fail instead of skip)
	$(GO) vet $(PKGS)
	$(GO) test $(TESTFLAGS) $(PKGS)
	cd deploy && $(GO) vet ./... && $(GO) test -count=1 -timeout 20m ./...

test-short: ## unit tests only, no root needed
	$(GO) test -short -count=1 $(PKGS)

FUZZ_PKGS := ./pkg/handshake ./pkg/config

fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	@for p in $(FUZZ_PKGS); do for t in $$($(GO) test -list '^Fuzz' $$p | grep ^Fuzz); do \
		echo "fuzz $$p $$t"; $(GO) test -run='^$$' -fuzz="^$$t$$" -fuzztime=$${FUZZTIME:-30s} $$p || exit 1; done; done

lint: ## go vet and gofmt
	$(GO) vet $(PKGS)
	@out=$$(gofmt -l cmd pkg test); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

deps: ## install the Debian packages the build and tests use (quick when present)
	@need=""; for p in clang:clang llvm-strip:llvm ip:iproute2 nft:nftables nginx:nginx haproxy:haproxy systemd-analyze:systemd; do \
		command -v $${p%%:*} >/dev/null || need="$$need $${p##*:}"; done; \
	[ -e /usr/include/bpf/bpf_helpers.h ] || need="$$need libbpf-dev"; \
	if [ -n "$$need" ]; then echo "installing:$$need"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; fi

generate: deps ## rebuild the BPF objects with clang (committed, so build and test need no clang)
	$(GO) generate ./pkg/dataplane/...

generate-check: generate ## fail when the committed BPF objects differ from their source
	@git diff --exit-code --stat -- 'pkg/dataplane/*_bpfel.go' 'pkg/dataplane/*_bpfel.o' && \
	  test -z "$$(git status --porcelain -- 'pkg/dataplane/*_bpfel.*')" || \
	  { echo "committed BPF objects are stale: run make generate and commit"; exit 1; }

bench: build ## benchmarks: data planes and algorithms side by side (about 15 minutes)
	$(GO) test -run='^$$' -bench=. -benchmem -benchtime=2x ./pkg/balance ./pkg/handshake
	$(GO) run ./test/bench -out bench-results.jsonl

bench-quick: build ## a shorter benchmark run (under 3 minutes)
	$(GO) run ./test/bench -quick -out bench-results.jsonl

soak: ## the long mixed soak of the sockmap plane
	WSPLICE_SOAK=1 $(GO) test -count=1 -timeout 60m -run Soak ./pkg/dataplane/

image: ## build the container image IMAGE (default wsplice:dev) with docker, podman or buildah
	deploy/image.sh $(IMAGE)

clean: ## remove build output
	rm -rf bin bench-results.jsonl
