# orderflow: the commands users type. See README.md (start here) and docs/.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Builds are kept outside the checkout so every clone and CI run reuses them.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/orderflow/target
CARGO ?= cargo

.PHONY: help run build man test fuzz validate-infra lint fmt bench bench-system chaos chaos-cluster cluster cluster-stop infra-up infra-down tools services clean-test-data

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

build: ## Build the binaries (debug)
	$(CARGO) build --bins

man: ## Man pages of outbox-relay (one per command) into $(CARGO_TARGET_DIR)/man
	$(CARGO) run --quiet -p outbox-relay -- man --out-dir $(CARGO_TARGET_DIR)/man
	@echo "man pages: $(CARGO_TARGET_DIR)/man (man -l $(CARGO_TARGET_DIR)/man/outbox-relay.1)"

run: build ## Start both services and a relay per database on local PostgreSQL and RabbitMQ
	BIN=$(CARGO_TARGET_DIR)/debug infra/local/run.sh

services: ## Install (apt) and start PostgreSQL and RabbitMQ if missing or down
	infra/local/services.sh ensure

tools: ## Install the test runner (cargo-nextest) and, for the relay console's browser test, chromium and chromedriver if missing
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked
	@infra/local/services.sh browser

test: services tools ## Run every test against real PostgreSQL and RabbitMQ, fuzz the HTTP contracts, validate infra files
	$(CARGO) build --workspace --bins
	$(CARGO) nextest run --workspace --profile ci
	$(CARGO) test --doc --workspace --quiet
	BIN=$(CARGO_TARGET_DIR)/debug infra/local/fuzz.sh
	infra/local/validate.sh

validate-infra: ## Validate the compose file, the Kubernetes manifests, Prometheus rules and the Grafana dashboard
	infra/local/validate.sh

# `make fuzz FUZZ_EXAMPLES=200 FUZZ_SEED=7` for a longer or different run.
fuzz: services build ## Fuzz both services' OpenAPI contracts with schemathesis (no 5xx, nothing outside the documented schema)
	BIN=$(CARGO_TARGET_DIR)/debug infra/local/fuzz.sh

lint: ## Formatting, clippy and cargo doc (warnings are errors), module cycles, no test hooks in shipped builds, unused dependencies (cargo machete), supply chain (cargo deny)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --quiet
	infra/local/cycles.py
	infra/local/shipped.sh
	infra/local/machete.sh
	infra/local/deny.sh

fmt: ## Format the code
	$(CARGO) fmt --all

bench: services ## Benchmarks: the relay against the broker's ceiling, then the whole system under open-loop load against pgbench and raw publishing (release build, ~20 minutes)
	$(CARGO) bench -p outbox-relay --bench relay
	$(MAKE) --no-print-directory bench-system

# `make bench-system BENCH_QUICK=1` for a smoke run of a few minutes; sizes in tests/benches/system.rs.
bench-system: services ## The whole-system benchmark alone (pipeline throughput, latency sweep, intake vs pgbench, hot products, memory)
	infra/local/services.sh pgbench
	$(CARGO) bench -p orderflow-e2e --bench system

# `make chaos ORDERS=1000 DURATION=10m CLIENTS=8 SEED=42`
ORDERS ?= 300
DURATION ?= 2m
CLIENTS ?= 6
RELAYS ?= 2
SEED ?=
chaos: services ## Long fault run: orders while processes are killed and connections cut, then the cluster run (chaos-cluster); prints faults and invariants
	$(CARGO) build -p orderflow-e2e --bins
	@echo "process logs: $(CARGO_TARGET_DIR)/chaos-processes.log"
	TEST_CHILD_STDERR=$(CARGO_TARGET_DIR)/chaos-processes.log \
	  $(CARGO_TARGET_DIR)/debug/chaos --orders $(ORDERS) --duration $(DURATION) --clients $(CLIENTS) \
	  --relays-per-db $(RELAYS) $(if $(SEED),--seed $(SEED),)
	$(MAKE) --no-print-directory chaos-cluster

chaos-cluster: services ## Orders through 2+2 service replicas and 3 relays per database while nodes of a local 3-node RabbitMQ cluster are killed, stopped and cut off (~5 min; docs/cluster.md)
	$(CARGO) nextest run -p orderflow-e2e --test cluster --ignore-default-filter --no-capture

cluster: ## Start a local 3-node RabbitMQ cluster on ports 5681-5683 beside the shared broker; prints its AMQP_URL (stop: make cluster-stop)
	infra/local/cluster.sh start

cluster-stop: ## Stop the local cluster and delete its data
	infra/local/cluster.sh stop

infra-up: ## Start PostgreSQL and RabbitMQ with Docker Compose (needs a Docker engine)
	docker compose -f infra/docker-compose.yml up -d postgres rabbitmq

infra-down: ## Stop the Docker Compose services
	docker compose -f infra/docker-compose.yml down

clean-test-data: ## Drop leftover test databases and test queues (t<random>.*, fuzz<random>.*) from killed or failed runs
	psql -h 127.0.0.1 -U postgres -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'of\_t\_%'" | \
	  xargs -r -I{} psql -h 127.0.0.1 -U postgres -qc 'DROP DATABASE IF EXISTS "{}" WITH (FORCE)'
	rabbitmqctl list_queues name -q | { grep -E '^(t[0-9a-f]{10}|fuzz[0-9a-f]{8})\.' || true; } | $(CARGO) run --quiet -p orderflow-testkit --bin delete-queues
