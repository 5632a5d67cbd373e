# Set-up and everyday targets. `make demo` and `make test` work on a fresh clone with only
# Python 3.11 and make: they create .venv and install the project first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The exact torch build is pinned here, in the set-up step, not in the package metadata: installing
# it first keeps pip from pulling a CUDA build when it resolves the other dependencies.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-studies test-deploy test-fast bench clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/twinfed demo --out runs/demo

# The whole suite but the multi-study files and the real-process consortium (under 10 minutes on
# 2 cores); CI runs all three targets.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not deploy and not studies"

# Files that run several whole studies or trials on the real Flower engine (SecAgg+, DP budgets,
# refusals, flwr run, federated trials): ~7 minutes.
test-studies: $(STAMP)
	$(BIN)/python -m pytest -m "studies and not deploy"

# Real SuperLink and SuperNode processes on loopback (TLS, node auth, kills, restarts): ~8 minutes.
test-deploy: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m deploy

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not deploy"

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf runs .pytest_cache
