# The two commands a new user needs are `make run` and `make test`; everything else is detail.
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 11211

.PHONY: deps run test unit lint fmt crds clean bench

deps:
	@scripts/bootstrap.sh

run: deps
	$(BIN)/cacheserver -l 127.0.0.1 -p $(PORT) --metrics-port 9150 -v

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: deps
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

unit: deps
	$(BIN)/pytest

test: lint unit

crds: deps
	$(BIN)/python -m cacheoperator.crdgen crds/

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# Side-by-side benchmark against memcached (not a test: numbers go to docs/benchmarks.md).
bench: deps
	$(BIN)/python bench/compare.py
