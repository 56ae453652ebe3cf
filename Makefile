# Tandem build. `make test` is what CI runs (.ci/run); keep it under 10
# minutes on a 2-core machine. Longer suites have their own targets.

GO        ?= go
BIN       := bin/tandem
GUEST_IMG := guest/kvm/microguest/microguest.bin
PKGS      := ./...

.PHONY: build test bench demo drill soak vet guest-image fuzz clean fleet

build: guest-image
	$(GO) build -o $(BIN) ./cmd/tandem

guest-image:
	@if [ -f guest/kvm/microguest/Makefile ]; then $(MAKE) -s -C guest/kvm/microguest; fi

vet:
	$(GO) vet $(PKGS)

# The race detector runs on every package; test/ starts real processes from
# the binary built here. The last lines list every skipped test with its reason.
test: build vet
	@mkdir -p .out
	TANDEM_BIN=$(CURDIR)/$(BIN) $(GO) test -race -timeout 540s -count=1 -v $(PKGS) > .out/test.log 2>&1; rc=$$?; \
	grep -E '^(ok|FAIL|---|panic|\?)' .out/test.log | grep -v -- '--- PASS' ; \
	echo "skipped tests:"; grep -A1 -- '--- SKIP' .out/test.log | grep -v -- '^--$$' | paste - - | sed 's/^/  /' ; \
	if [ $$rc -ne 0 ]; then tail -80 .out/test.log; fi; exit $$rc

bench: build
	$(GO) test -run '^$$' -bench . -benchtime 1s -count 3 ./precopy/ ./checkpoint/ ./guest/... ./internal/timing/ ./test/...
	$(GO) test -run '^$$' -bench . -benchtime 1x -count 3 -v ./failover/

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzReader -fuzztime 10m ./checkpoint/
	$(GO) test -run '^$$' -fuzz FuzzDifferential -fuzztime 2m ./guest/kvm/netfuzz/

demo: build
	./$(BIN) demo

# 100 kill -9 failovers of a local trio under kv load; fails on any lost
# or contradicted write, or a kv history porcupine shows not linearizable.
drill: build
	./$(BIN) drill --runs 100

# 20 protected guests on one etcd (--coordinator etcd), every primary
# killed at once: all promote, nothing acknowledged is lost. 40 processes.
fleet: build
	TANDEM_BIN=$(CURDIR)/$(BIN) TANDEM_FLEET=1 $(GO) test -timeout 600s -run TestEtcdFleetMassFailover -v -count=1 ./test/

# Replica-verification soak, about an hour: SOAK_RUNS verified pair starts per guest and workload, then SOAK_RUNS trio drills.
SOAK_RUNS ?= 100
soak: build
	TANDEM_BIN=$(CURDIR)/$(BIN) TANDEM_SOAK=$(SOAK_RUNS) $(GO) test -timeout 3h -run TestSoakPairVerify -v -count=1 ./test/
	./$(BIN) drill --runs $(SOAK_RUNS)

clean:
	rm -rf bin .out
