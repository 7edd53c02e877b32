# One command per task. Every target installs what it needs itself.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PY313 ?= $(firstword $(wildcard /root/.pyenv/versions/3.13*/bin/python3.13) $(shell command -v python3.13))
VENV := .venv
VENV313 := .venv313
PAHO1 := paho-mqtt==1.6.1
PAHO2 := paho-mqtt>=2,<3
PYTEST_ARGS ?=
# integration tests that `make test-py313` repeats under Python 3.13 + paho-mqtt 2.x
PY313_TESTS ?= tests/integration

.PHONY: all venv test test-py311 test-py313 lint dry-run bench soak ipk mosquitto busybox clean

all: test

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,lint]' '$(PAHO1)'
	touch $@

$(VENV313)/.installed: setup.cfg pyproject.toml
	@test -n "$(PY313)" || { echo "Python 3.13 not found (set PY313=/path/to/python3.13)"; exit 1; }
	$(PY313) -m venv $(VENV313)
	$(VENV313)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(VENV313)/bin/pip install -q --disable-pip-version-check -e '.[test]' '$(PAHO2)'
	touch $@

venv: $(VENV)/.installed

mosquitto:
	@if ! command -v mosquitto >/dev/null && ! test -x /usr/sbin/mosquitto; then \
		echo "installing mosquitto with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto openssl >/dev/null; \
	fi
	@command -v openssl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
	@if systemctl is-active --quiet mosquitto 2>/dev/null; then systemctl stop mosquitto; fi; true

# OpenWrt's shell (busybox ash), for the terminal tests
busybox:
	@if ! command -v busybox >/dev/null; then \
		echo "installing busybox with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox >/dev/null; \
	fi

## make test: the whole suite on Python 3.11 + paho-mqtt 1.6.1, then the
## integration tests again on Python 3.13 + paho-mqtt 2.x
test: test-py311 test-py313

test-py311: $(VENV)/.installed mosquitto busybox
	PATH="/usr/sbin:$$PATH" $(VENV)/bin/python -m pytest -n 2 -q $(PYTEST_ARGS) tests

test-py313: $(VENV313)/.installed mosquitto busybox
	PATH="/usr/sbin:$$PATH" $(VENV313)/bin/python -m pytest -n 2 -q $(PYTEST_ARGS) $(PY313_TESTS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check spotfi_bridge tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(VENV313) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

## make ipk: dist/spotfi-bridge_<version>-1_all.ipk for opkg (OpenWrt 23.05, 24.10),
## built reproducibly with the standard library, no OpenWrt SDK (docs/OPENWRT.md)
.PHONY: ipk
ipk: $(VENV)/.installed
	$(VENV)/bin/python packaging/build_ipk.py --out dist

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
