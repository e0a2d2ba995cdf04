# One target per habit: make proto | lint | test | test-replicas | run | cluster | bench | bench-quick | chaos | chaos-quick | browser | screenshots
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PROTO_FILES := $(wildcard proto/orchestrator/v1/*.proto)
GEN_DIR := orchestrator/v1
PY_DIRS := $(wildcard orchestrator_server orchestrator_client tests bench examples chaos local_cluster)
# promtool, unpacked from Debian's prometheus package (no daemon is installed or started): the tests
# of deploy/prometheus and deploy/grafana run it.
PROMTOOL := $(VENV)/tools/promtool

.PHONY: setup browser screenshots proto proto-check lint test test-replicas run cluster bench bench-quick chaos chaos-quick clean

# The virtualenv is (re)built whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,dev,bench]'
	touch $@

setup: $(VENV)/.installed $(PROMTOOL)

# Needs apt (Debian); `apt-get update` first only as root and only if the download fails. Where it
# cannot be installed the promtool tests skip saying so, except in CI (CI=true), where they fail.
$(PROMTOOL):
	@scratch=$$(mktemp -d); \
	( cd $$scratch && { apt-get download -q prometheus >/dev/null 2>&1 || \
	    { [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && apt-get download -q prometheus >/dev/null 2>&1; }; } && \
	  dpkg -x prometheus_*.deb unpacked ) && mkdir -p $(@D) && cp $$scratch/unpacked/usr/bin/promtool $@; \
	status=$$?; rm -rf $$scratch; \
	if [ $$status = 0 ]; then echo "== promtool installed: $@"; \
	else echo "== promtool could not be installed (needs Debian's apt-get): the tests that need it skip outside CI and fail in CI"; [ -z "$${CI:-}" ]; fi

# Headless Chromium and its driver for the console's browser tests (tests/console; Debian packages,
# needs root). Without them those tests skip, unless CONSOLE_BROWSER_REQUIRED=1 (CI) fails them.
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

# Generated code mirrors the proto root (orchestrator/v1/x.proto -> orchestrator/v1/x_pb2.py), so its
# imports (`from orchestrator.v1 import x_pb2`) work from an installed wheel without any rewriting.
define generate
	rm -rf $(1)/orchestrator && mkdir -p $(1)
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -Iproto -Iproto/third_party \
	  --python_out=$(1) --grpc_python_out=$(1) --mypy_out=quiet:$(1) --mypy_grpc_out=quiet:$(1) $(PROTO_FILES)
	printf '"""Generated from proto/orchestrator/v1 by `make proto`; do not edit."""\n' > $(1)/orchestrator/__init__.py
	cp $(1)/orchestrator/__init__.py $(1)/orchestrator/v1/__init__.py
	touch $(1)/orchestrator/py.typed
endef

proto: setup
	$(BIN)/buf lint
	$(call generate,.)
	$(PY) -m orchestrator_server.apidoc

# Fails when the committed generated code differs from what the protos produce.
proto-check: setup
	$(eval TMP := $(shell mktemp -d))
	$(call generate,$(TMP))
	diff -r -x __pycache__ $(TMP)/orchestrator orchestrator || (echo "generated code is stale: run 'make proto'" && exit 1)
	rm -rf $(TMP)
	$(PY) -m orchestrator_server.apidoc --check

lint: setup proto-check
	$(BIN)/buf lint
	$(BIN)/buf build -o /dev/null
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/mypy

# Everything but the tests marked `replicas` (pyproject.toml), which take minutes: under 10 minutes.
test: setup
	$(PY) -m pytest -m "not replicas" --cov --cov-report=term --cov-fail-under=85 -p no:cacheprovider $(PYTEST_ARGS)

# Only the `replicas` tests: several orchestrator processes at once (tests/cluster, the SDK against
# replicas, `make cluster`) and the quick chaos run. Their coverage is added to the last `make test`'s.
test-replicas: setup
	$(PY) -m pytest -m replicas --cov --cov-append --cov-report=term -p no:cacheprovider $(PYTEST_ARGS)

run: setup
	$(PY) -m orchestrator_server serve

# A throwaway PostgreSQL and 3 replicas on loopback (gRPC 50051-50053, REST 8080-8082) until Ctrl-C,
# which stops them and removes the data (docs/DEPLOYMENT.md). CLUSTER_ARGS: e.g. --replicas 2.
cluster: setup
	$(PY) -m local_cluster $(CLUSTER_ARGS)

bench: setup
	$(PY) -m bench

# Every figure at small sizes; fails only when a figure was not produced, never on a speed.
bench-quick: setup
	$(PY) -m bench --quick --check

# SIGKILLs the orchestrator CHAOS_KILLS times (default 20) under SDK agents and a steady submitter;
# fails on a lost, unfinished or twice-completed task (docs/RELIABILITY.md). Not part of `make test`.
chaos: setup
	$(PY) -m chaos

# Three kills, about a minute; tests/test_chaos.py runs the same in `make test-replicas`.
chaos-quick: setup
	$(PY) -m chaos --kills 3 --settle 45

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage*

# Refreshes the console screenshots in docs/console (taken by the browser tests).
screenshots: setup browser
	CONSOLE_SCREENSHOTS=docs/console $(PY) -m pytest tests/console -q -p no:cacheprovider
