# The two commands a new user needs are `make up` and `make test`; everything else is detail.
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 11211

.PHONY: deps run test unit lint fmt crds clean bench e2e-bins e2e up down dashboard-picture image

deps:
	@scripts/bootstrap.sh

run: deps
	$(BIN)/cacheserver -l 127.0.0.1 -p $(PORT) --metrics-port 9150 -v

# ruff for the Python; the server's C files (the store core, the compiled fast path and the
# snapshot's block loops) must compile without a warning.
lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cc -fsyntax-only -Wall -Wextra -Wno-unused-parameter -Werror \
		-I"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
		-Iserver/cacheserver/storage \
		server/cacheserver/fastpath/*.c server/cacheserver/storage/*.c

fmt: deps
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

unit: deps
	$(BIN)/pytest

test: lint unit e2e

# The chart ships the same generated CRDs (a test checks the two copies are equal).
crds: deps
	$(BIN)/python -m cacheoperator.crdgen crds/
	$(BIN)/python -m cacheoperator.crdgen charts/cache-operator/crds/

# The project's image (cache-appliance:<version>, the chart's default) and the pod sandbox
# image, exported as archives for containerd into the e2e cache; cached by content, with a
# private Docker daemon and a locally made base image where none is at hand (docs/e2e.md).
image:
	@scripts/image.sh

# End-to-end: a real control plane built from Go modules (cached outside the repo) and the
# node agent playing the kubelet; see docs/e2e.md. E2E_KUBECONFIG=... runs e2e against
# an existing cluster instead.
e2e-bins:
	@e2e/build-control-plane.sh

e2e: deps $(if $(E2E_KUBECONFIG),,e2e-bins)
	$(BIN)/pytest e2e/tests

# The overview dashboard drawn from the data of a real e2e run (Prometheus scraping cache
# appliances under load), for docs/observability.md and the README.
dashboard-picture: deps e2e-bins
	E2E_DASHBOARD_PNG=$(CURDIR)/docs/images/cache-cluster-overview.png \
		$(BIN)/pytest e2e/tests/test_observability.py

# A local cluster (3 nodes in 2 zones) with the chart, the operator (as the chart's
# ServiceAccount) and examples/cachecluster.yaml, Ready, kept running in the background;
# state, logs and pids in .e2e/. `make down` stops all of it.
up: deps e2e-bins
	@$(BIN)/python -m e2e.cluster up --nodes 3 --zones 2

down: deps
	@$(BIN)/python -m e2e.cluster down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# Side-by-side benchmark against memcached (not a test: numbers go to docs/benchmarks.md).
bench: deps
	$(BIN)/python bench/compare.py

# The operator at scale (not a test: numbers go to docs/benchmarks.md): 300 CacheClusters x 3
# pods on simulated nodes (kwok) against a real control plane, all stopped at the end.
# BENCH_OPERATOR_ARGS passes flags, e.g. "--clusters 30 --replicas 1 --nodes 3".
.PHONY: bench-operator
bench-operator: deps e2e-bins
	$(BIN)/python bench/operator_scale.py $(BENCH_OPERATOR_ARGS)
