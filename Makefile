# requiretls — build, test and demo targets.  Everything runs as root on a fresh
# Debian 12 machine without a terminal; each target installs what it needs.
PYTHON ?= /usr/bin/python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all deps venv lint typecheck unit test demo clean

all: test

deps:
	sh scripts/install-apt.sh

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml | deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check requiretls tests
	$(VENV)/bin/mypy requiretls
	$(VENV)/bin/mypy --strict requiretls/policy

test: venv lint
	$(PY) -m pytest -q

demo: venv
	$(PY) scripts/demo_explain.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
