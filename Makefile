# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NEW_ENOUGH := import sys; sys.exit(sys.version_info < (3, 10))

.PHONY: demo test lint bench clean-demo

$(STAMP): setup.cfg pyproject.toml
	# PYTHON makes the venv only when there is none of 3.10 or newer: then it must be one
	@$(PY) -c '$(NEW_ENOUGH)' 2>/dev/null || $(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 10) else f"error: $(PYTHON) is Python {v[0]}.{v[1]}; FitCLIP needs 3.10 or newer: make PYTHON=python3.11 (or another) $(MAKECMDGOALS)")'
	# a venv of a Python older than 3.10 (an earlier make with another PYTHON) cannot install FitCLIP: made afresh
	$(PY) -c '$(NEW_ENOUGH)' 2>/dev/null || ! [ -e $(PY) ] || $(PYTHON) -m venv --clear $(VENV)
	# a venv whose creation was cut short has a python but no pip: venv again over it (it keeps what is there)
	$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,spark]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m demo --out demo_output

# the suite on one pytest-xdist worker per CPU (at most 4): on 2 cores, 6-7 minutes instead of 11-12 serially
test: $(STAMP)
	$(PY) -m pytest -q -n logical --maxprocesses 4

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.shard_bench

clean-demo:
	rm -rf demo_output
