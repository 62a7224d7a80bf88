# Two entry points for a fresh machine: `make demo` and `make test`.
# Each builds .venv from a Python >= 3.12 that scripts/find-python.sh finds (PATH, then pyenv).
VENV := .venv
PY := $(VENV)/bin/python
# The library, the CLI and the widgets (`make demo`); the test tools and abTEM (GPL, one
# cross-check) only for the test targets.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# pytest processes for `make test` (pytest-xdist): its tests are mostly compilation, one thread
# each, and 2 took the suite to 420 s on 2 cores (578–604 s in one process earlier the same day).
# `--dist worksteal`: each process starts on one contiguous half of the tests (so a module's
# fixtures are mostly built once) and takes tests from the other's end when it runs dry; whole
# files per process (`loadfile`) left one process alone with the longest files at the end:
# make test 536 s against 554 s, test-slow 1569 s for 2983 s of work (2026-12-06, one run each).
# test-slow runs in TEST_WORKERS processes too, each pinned to its own core(s) (EDKIT_TEST_PIN=1,
# conftest.py): its long tests compute, and unpinned processes' threads fought over the cores
# (32 min against 26 min in one process); pinned: 47 passed in 18 min 19 s (2026-12-05).
# test-notebooks too (8 notebooks: 311 s in two pinned processes, 340 s unpinned, 433 s in one).
# The default suite is not pinned: it gained nothing (483 s against 441 s).
TEST_WORKERS ?= 2
# JAX's persistent compilation cache for the test targets: a program that takes 0.5 s or more to
# compile is written to build/jax-cache and loaded by every later process (the other pytest
# process, the fresh-process tests, test-slow after test, the notebooks' kernels) instead of
# compiled again. The suite compiles far more than it computes: `make test`'s pytest took 472 s
# with an empty cache against 501 s without one, and 303 s with the cache it left (2026-12-06,
# one run each). A JAX_COMPILATION_CACHE_DIR of your own wins; `make clean` empties ours.
JAX_CACHE := $(CURDIR)/build/jax-cache
test test-slow test-benchmarks test-notebooks test-browser: export JAX_COMPILATION_CACHE_DIR ?= $(JAX_CACHE)
test test-slow test-benchmarks test-notebooks test-browser: export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0.5

.PHONY: demo test test-slow test-benchmarks test-notebooks test-binder test-browser docs binder-badge lint bench clean

# Seconds one notebook cell may run in test-notebooks / test-binder.
NB_CELL_TIMEOUT ?= 600

$(STAMP): pyproject.toml scripts/find-python.sh
	@PYTHON=$$(scripts/find-python.sh) || exit 1; \
	  echo "using $$PYTHON"; \
	  test -x $(PY) || $$PYTHON -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[jupyter]'
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[jupyter,test,abtem]'
	@touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/edkit demo

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check edkit tests benchmarks
	$(VENV)/bin/ruff format --check edkit tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy edkit
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist worksteal

test-slow: $(TEST_STAMP)
	EDKIT_TEST_PIN=1 $(PY) -m pytest -q -m slow --durations=10 -n $(TEST_WORKERS) --dist worksteal

# Long reproductions kept out of CI's time budget (the paper benchmark through the compat
# transform: about 8 minutes on 2 cores).
test-benchmarks: $(TEST_STAMP)
	$(PY) -m pytest -q -s -m benchmark

# Execute every notebook in notebooks/ (fails on the first cell that raises). NB_FLAGS=--overwrite
# keeps the outputs in the notebooks (CI does, before make docs; locally it changes tracked files).
test-notebooks: $(TEST_STAMP)
	EDKIT_TEST_PIN=1 $(PY) -m pytest -q --nbmake --nbmake-timeout=$(NB_CELL_TIMEOUT) -n $(TEST_WORKERS) --dist loadfile $(NB_FLAGS) notebooks

# The documentation site into build/site, warnings as errors, then a check that the API
# reference lists every public name (scripts/check_docs.py).
docs: $(STAMP)
	$(PY) -m pip install -q -e '.[jupyter,docs]'
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	$(PY) scripts/check_docs.py

# A fresh venv from binder/requirements.txt + binder/postBuild, then notebooks 01 and 02 in it
# (BINDER_NOTEBOOKS=all: every one; test-notebooks runs them all in .venv).
test-binder:
	NB_CELL_TIMEOUT=$(NB_CELL_TIMEOUT) scripts/test-binder.sh

# The RefinementPanel in Debian's Chromium through Voila (installs Chromium when missing: CI
# runs as root on Debian). EDKIT_SCREENSHOT=1 also refreshes docs/panel.png.
test-browser: $(TEST_STAMP)
	$(PY) -m pip install -q -e '.[browser]'
	@test -x /usr/bin/chromium || { apt-get update -q && apt-get install -y -q chromium; }
	$(PY) -m pytest -q -m browser

# The README's Binder badge from `git remote get-url origin` (scripts/binder_badge.py).
binder-badge:
	python3 scripts/binder_badge.py

bench: $(TEST_STAMP)
	$(PY) benchmarks/kernel.py

clean:
	rm -rf $(VENV) .pytest_cache build/binder-venv build/binder-notebooks build/site build/jax-cache notebooks/output
