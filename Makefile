# Two commands set up everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SYSSTAMP := $(VENV)/.sysdeps-stamp

.PHONY: demo test lint bench docs clean sysdeps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this machine's CPU wheel; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian packages the tests use (shellcheck for rendered scripts).
$(SYSSTAMP): $(STAMP)
	@if ! command -v shellcheck >/dev/null; then \
	  echo "installing shellcheck from Debian"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck) >/dev/null; \
	fi
	touch $(SYSSTAMP)

sysdeps: $(SYSSTAMP)

demo: $(STAMP)
	$(VENV)/bin/rlspec validate examples/tiny/spec.yaml
	$(VENV)/bin/rlspec validate examples/single-node.yaml
	$(VENV)/bin/rlspec validate examples/compassmax-245b.yaml
	$(VENV)/bin/rlspec inspect examples/compassmax-245b.yaml
	$(VENV)/bin/rlspec compile examples/tiny/spec.yaml -o out/tiny-bundle --force
	$(VENV)/bin/rlspec inspect out/tiny-bundle --graph tree

test: $(SYSSTAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check .

docs: $(STAMP)
	$(PY) -m spec.docs > docs/spec.md

bench: $(STAMP)
	$(PY) bench/compile.py
	$(PY) bench/losses.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
