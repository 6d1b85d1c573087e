# One-command entry points. `make serve` and `make test` each set up .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(if $(PATHGUARD_DATA_DIR),$(PATHGUARD_DATA_DIR),$(if $(wildcard ../shared/data),../shared/data,$(HOME)/.cache/pathguard/data))
export PATHGUARD_DATA_DIR := $(abspath $(DATA_DIR))

.PHONY: install install-dev serve test lint typecheck clean image-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first: a torch range that 2.13.0 satisfies then installs nothing more.
	$(BIN)/pip install --quiet torch==2.13.0

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[build]'

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[build,dev,eval,cluster]'

serve: install
	$(BIN)/pathguard serve

test: install-dev
	scripts/ensure-redis
	scripts/ensure-tools
	$(BIN)/ruff check models service tests
	$(BIN)/ruff format --check models service tests
	$(MAKE) --no-print-directory typecheck
	$(BIN)/pytest -m "not slow" -q

lint: install-dev
	$(BIN)/ruff check models service tests
	$(BIN)/ruff format --check models service tests
	$(MAKE) --no-print-directory typecheck

# mypy sees the folders under their installed names through links in .typecheck/pathguard/.
typecheck:
	mkdir -p .typecheck/pathguard
	ln -sfn ../../models .typecheck/pathguard/models
	ln -sfn ../../service .typecheck/pathguard/service
	$(BIN)/mypy

# The serving image built, run and used for real (needs a Docker daemon; offline it builds through build arguments).
image-test:
	scripts/image-test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .typecheck
