# terrafm-lightning make targets. `make test` and `make demo` work on a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint

install: $(STAMP)

# Reinstall when the dependency list or the pins change.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# The filter drops this machine's noisy "index location ignored" warnings; pipefail keeps
	# pip's exit status.
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -c "import terrafm_lightning, torch, torchvision, timm"
	touch $(STAMP)

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks data_prep
	$(BIN)/ruff format --check src tests benchmarks data_prep
