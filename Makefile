# requiretls — build, test and demo targets.  Everything runs as root on a fresh
# Debian 12 machine without a terminal; each target installs what it needs.
PYTHON ?= /usr/bin/python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SOAK_MESSAGES ?= 1000
STAMP  := $(VENV)/.installed

.PHONY: all deps venv chroots lint test demo clean

all: test

deps:
	sh scripts/install-apt.sh

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml | deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Postfix 3.10 (trixie) and 3.11 (sid) for the e2e tests; cached under /var/cache/requiretls-testbed.
chroots: deps
	sh scripts/build-chroots.sh

lint: venv
	$(VENV)/bin/ruff check requiretls tests
	$(VENV)/bin/mypy requiretls
	$(VENV)/bin/mypy --strict requiretls/policy requiretls/dest requiretls/facts.py requiretls/addresses.py

# The fault-injection run (see soak below) is part of it, at SOAK_MESSAGES (1,000) messages, counts printed (~80 s).
test: venv lint chroots
	$(PY) -m pytest -q
	RTLS_SOAK=1 RTLS_SOAK_MESSAGES=$(SOAK_MESSAGES) $(PY) -m pytest -q -s -p no:cacheprovider tests/soak

demo: venv
	$(PY) scripts/demo_explain.py
	@echo
	$(PY) scripts/demo.py --postfix 3.7

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info

# The Debian package (packaging/debian): build/deb/requiretls_VERSION_all.deb, checked with lintian.
# deb-test installs it into a clean Debian 12 chroot and runs it from the installed files.
.PHONY: deb deb-test
deb:
	sh scripts/build-deb.sh --lint

deb-test: venv
	$(PY) -m pytest -q tests/packaging

# Fuzzing (issue 9): every parser that reads outside input, >= 100,000 hypothesis cases per test
# (RTLS_FUZZ_EXAMPLES; one pytest per file, in parallel), then the atheris harnesses (installed here, not in
# requirements-dev.txt) with as many runs.
# `make test` runs the same hypothesis tests briefly.  Crash inputs go to var/fuzz/.
FUZZ_EXAMPLES ?= 100000
.PHONY: fuzz
fuzz: venv
	$(PY) -m pip install -q --disable-pip-version-check atheris
	sh scripts/fuzz.sh $(PY) $(FUZZ_EXAMPLES)

# Fault injection (issue 9) through Postfix 3.7 on the testbed: kill -9 of milter / policyd / agent, SERVFAIL,
# the MX cutting DATA mid-message for Postfix's smtp and the agent; prints the counts.  `make test` runs it too;
# `make soak SOAK_MESSAGES=5000 RTLS_SOAK_SECONDS=300` for a bigger run.  Bounded by RTLS_SOAK_DEADLINE (900 s).
.PHONY: soak
soak: venv chroots
	RTLS_SOAK=1 RTLS_SOAK_MESSAGES=$(SOAK_MESSAGES) $(PY) -m pytest -q -s -p no:cacheprovider tests/soak
