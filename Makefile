# Every target bootstraps its own virtualenv: a fresh machine needs only Python >= 3.11,
# git and make.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: install run test lint format clean bench bench-quick

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Parley needs Python >= 3.11 on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/parley serve

test: $(STAMP)
	$(BIN)/python -m pytest

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

# Benchmarks need PostgreSQL and Redis (PARLEY_BENCH_DATABASE_URL, PARLEY_BENCH_REDIS_URL;
# defaults: the local servers) and pgbench on PATH.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --full

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --quick

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
