# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-e2e browser postgres lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	VENV=$(VENV) bash scripts/demo.sh

# unit and integration tests (minutes); the end-to-end tier runs with `make test-e2e` (CI: both)
test: $(STAMP)
	$(PY) -m ruff check platform tests studies benchmarks dashboards
	$(PY) -m pytest -q -m "not e2e" tests

test-e2e: $(STAMP) browser postgres
	$(PY) -m pytest -q -m e2e tests

browser:
	bash scripts/setup_browser.sh

postgres:
	bash scripts/setup_postgres.sh

bench: $(STAMP)
	$(PY) benchmarks/floor_bench.py

clean:
	rm -rf $(VENV) build *.egg-info platform/*.egg-info
