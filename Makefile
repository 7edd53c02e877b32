# One command per task. Every target installs what it needs itself.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# Python 3.13 for the test-py313 phases: PY313=/path/to/python3.13, else python3.13 on
# PATH, else pyenv's newest 3.13 ($(PYENV_ROOT)/versions/3.13*); the first candidate that
# really is a 3.13 wins. None found: those phases are skipped with a notice, unless
# REQUIRE_PY313=1 (set by .ci/run), which makes that an error.
PY313 ?=
REQUIRE_PY313 ?=
PYENV_ROOT ?= $(HOME)/.pyenv
PY313_CANDIDATES = $(or $(PY313),$(shell command -v python3.13) $(lastword $(sort $(wildcard $(PYENV_ROOT)/versions/3.13*/bin/python3.13))))
# evaluated once, and only by the targets that need it
PY313_FOUND = $(eval PY313_FOUND := $(shell for p in $(PY313_CANDIDATES); do \
	timeout 20 "$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' >/dev/null 2>&1 \
	&& { echo "$$p"; break; }; done))$(PY313_FOUND)
comma := ,
VENV := .venv
VENV313 := .venv313
VENV313_PAHO1 := .venv313-paho1
PAHO1 := paho-mqtt==1.6.1
PAHO2 := paho-mqtt>=2,<3
PYTEST_ARGS ?=
# what the two Python 3.13 phases run (the 3.11 phase runs everything):
# - 3.13 + paho-mqtt 2.x (PyPI, OpenWrt master): the integration tests, every path
#   through paho 2's callbacks and reason codes against a real broker;
# - 3.13 + paho-mqtt 1.6.1 (OpenWrt 25.12's feeds): the unit tests (the standard library
#   of 3.13 under every module), plus the tests whose subject is the paho boundary or the
#   daemon as a router runs it: the link, the daemon, the packaged daemon, ctl's client.
PY313_TESTS ?= tests/integration
PY313_PAHO1_TESTS ?= tests/unit tests/integration/test_link.py tests/integration/test_daemon.py \
	tests/integration/test_packaged_daemon.py tests/integration/test_ctl.py

.PHONY: all venv test test-py311 test-py313 test-py313-paho2 test-py313-paho1 lint dry-run \
	bench soak ipk mosquitto busybox clean

all: test

# $(call new_venv,python,directory,extras,paho-mqtt requirement)
define new_venv
	$(1) -m venv $(2)
	$(2)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(2)/bin/pip install -q --disable-pip-version-check -e '.[$(3)]' '$(4)'
	touch $(2)/.installed
endef

$(VENV)/.installed: setup.cfg pyproject.toml
	$(call new_venv,$(PYTHON),$(VENV),test$(comma)lint,$(PAHO1))

$(VENV313)/.installed: setup.cfg pyproject.toml
	@test -n "$(PY313_FOUND)" || { echo "$(PY313_MISSING)"; exit 1; }
	$(call new_venv,$(PY313_FOUND),$(VENV313),test,$(PAHO2))

$(VENV313_PAHO1)/.installed: setup.cfg pyproject.toml
	@test -n "$(PY313_FOUND)" || { echo "$(PY313_MISSING)"; exit 1; }
	$(call new_venv,$(PY313_FOUND),$(VENV313_PAHO1),test,$(PAHO1))

venv: $(VENV)/.installed

mosquitto:
	@if ! command -v mosquitto >/dev/null && ! test -x /usr/sbin/mosquitto; then \
		echo "installing mosquitto with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto openssl >/dev/null; \
	fi
	@command -v openssl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }

# OpenWrt's shell (busybox ash), for the terminal tests
busybox:
	@if ! command -v busybox >/dev/null; then \
		echo "installing busybox with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox >/dev/null; \
	fi

## make test: the whole suite on Python 3.11 + paho-mqtt 1.6.1, then, when a Python 3.13
## is found, PY313_TESTS on 3.13 + paho-mqtt 2.x and PY313_PAHO1_TESTS on 3.13 +
## paho-mqtt 1.6.1; without one those two phases are skipped with a notice and the 3.11
## result decides (REQUIRE_PY313=1 makes a missing 3.13 an error)
test: test-py311 test-py313

test-py311: $(VENV)/.installed mosquitto busybox
	PATH="/usr/sbin:$$PATH" $(VENV)/bin/python -m pytest -n 2 -q $(PYTEST_ARGS) tests

PY313_MISSING = Python 3.13 not found ($(if $(PY313),PY313=$(PY313) is not a Python 3.13,no python3.13 on PATH$(comma) none in $(PYENV_ROOT)/versions)): set PY313=/path/to/python3.13
test-py313:
	@found='$(PY313_FOUND)'; \
	if [ -n "$$found" ]; then \
		$(MAKE) --no-print-directory test-py313-paho2 test-py313-paho1 PY313="$$found"; \
	elif [ -n "$(filter-out 0,$(REQUIRE_PY313))" ]; then \
		echo "error: $(PY313_MISSING); REQUIRE_PY313 is set, so the 3.13 phases may not be skipped" >&2; \
		exit 1; \
	else \
		echo; \
		echo "NOTICE: $(PY313_MISSING)."; \
		echo "NOTICE: skipped the Python 3.13 phases: $(PY313_TESTS) on 3.13 + paho-mqtt 2.x,"; \
		echo "NOTICE: $(PY313_PAHO1_TESTS) on 3.13 + paho-mqtt 1.6.1."; \
		echo "NOTICE: the 3.11 result above decides. To run them too: install Python 3.13"; \
		echo "NOTICE: (e.g. pyenv install 3.13) or make test PY313=/path/to/python3.13."; \
	fi

test-py313-paho2: $(VENV313)/.installed mosquitto busybox
	PATH="/usr/sbin:$$PATH" $(VENV313)/bin/python -m pytest -n 2 -q $(PYTEST_ARGS) $(PY313_TESTS)

test-py313-paho1: $(VENV313_PAHO1)/.installed mosquitto busybox
	PATH="/usr/sbin:$$PATH" $(VENV313_PAHO1)/bin/python -m pytest -n 2 -q $(PYTEST_ARGS) $(PY313_PAHO1_TESTS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check spotfi_bridge tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(VENV313) $(VENV313_PAHO1) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

## make ipk: dist/spotfi-bridge_<version>-1_all.ipk for opkg (OpenWrt 23.05, 24.10),
## built reproducibly with the standard library, no OpenWrt SDK (docs/OPENWRT.md)
.PHONY: ipk
ipk: $(VENV)/.installed
	$(VENV)/bin/python packaging/build_ipk.py --out dist

## make apk: dist/spotfi-bridge-<version>-r1.apk for apk (OpenWrt 25.12), the same payload,
## built reproducibly with the standard library, no SDK, no apk-tools (docs/OPENWRT.md)
.PHONY: apk
apk: $(VENV)/.installed
	$(VENV)/bin/python packaging/build_apk.py --out dist

## make bench: every figure beside a floor measured in the same run (docs/BENCHMARKS.md);
## BENCH_QUICK=1 for a ~1 minute smoke run, COMPARE=path.json for the change against an earlier run
bench: $(VENV)/.installed mosquitto
	$(if $(filter-out 0,$(BENCH_PROFILE)),test -x $(VENV)/bin/py-spy || $(VENV)/bin/pip install -q --disable-pip-version-check py-spy)
	PATH="/usr/sbin:$$PATH" $(VENV)/bin/python -m bench.run $(if $(COMPARE),--compare '$(COMPARE)')

## make dry-run: the bridge on this machine against a throw-away Mosquitto, as router
## dev-router with the local RPC backend; prints the spotfi-bridge-ctl commands to try.
## BROKER=mqtt://host:port uses an existing broker instead. Ctrl-C stops it all.
dry-run: $(VENV)/.installed $(if $(BROKER),,mosquitto)
	@PATH="/usr/sbin:$$PATH" $(VENV)/bin/python -m spotfi_bridge.devtools.dry_run $(if $(BROKER),--broker '$(BROKER)') $(if $(ROUTER),--router-id '$(ROUTER)')

## make soak: SOAK_MINUTES (default 60) of random terminal sessions and RPCs against the
## real daemon under broker restarts and proxy faults; prints a summary table, writes
## tests/soak/results/latest.json, exits non-zero on any error, zombie, leak or idle-CPU growth
SOAK_MINUTES ?= 60
soak: $(VENV)/.installed mosquitto
	PATH="/usr/sbin:$$PATH" SOAK_MINUTES=$(SOAK_MINUTES) $(VENV)/bin/python -m tests.soak.run_soak
