# Two-command quick start: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo demo-quick bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet "pip>=23"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: venv
	$(PY) -m pytest -n 2 -q tests

test-fast: venv
	$(PY) -m pytest -n 2 -q -m "not slow" tests

demo: venv
	$(VENV)/bin/edit-r1-jax demo --out runs/demo

demo-quick: venv
	$(VENV)/bin/edit-r1-jax demo --quick --out runs/demo-quick

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
