# Two entry points for a fresh machine: `make demo` and `make test`.
# Each builds .venv from a Python >= 3.12 that scripts/find-python.sh finds (PATH, then pyenv).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml scripts/find-python.sh
	@PYTHON=$$(scripts/find-python.sh) || exit 1; \
	  echo "using $$PYTHON"; \
	  test -x $(PY) || $$PYTHON -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,abtem]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edkit demo

test: $(STAMP)
	$(VENV)/bin/ruff check edkit tests benchmarks
	$(VENV)/bin/ruff format --check edkit tests benchmarks
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/kernel.py

clean:
	rm -rf $(VENV) .pytest_cache
