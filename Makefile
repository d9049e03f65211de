# Two commands on a fresh machine: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

# Reinstall when the dependency list changes. torch/torchvision ranges stay open in
# pyproject.toml; a machine-wide pip constraint (if any) picks the local builds.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(VENV)/bin/conceptmon demo --out demo_out

bench: install
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) demo_out conceptmon_out .pytest_cache
