# Two entry points for a fresh Debian 12 machine: `make demo` and `make test`.
# Each installs what is missing (Debian packages, a virtual environment) and then runs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Mosquitto for everything. The tests also need: prometheus (its server evaluates the alert
# rules against real failures, tests/deploy/test_alerts.py), chromium for the dashboard's browser test
# (driven by Playwright, which must not download a browser of its own), shellcheck and
# systemd-analyze for deploy/, openssl for certificates, a compiler with the OpenSSL and
# bzip2 headers for the zeroc-ice build, and PostgreSQL for the shared ledger's tests (they
# start their own throw-away server: devtools/postgres.py; the packaged one is not used).
APT_PACKAGES := mosquitto mosquitto-clients
APT_TEST_PACKAGES := chromium shellcheck systemd openssl g++ libssl-dev libbz2-dev postgresql \
	prometheus

.PHONY: demo test lint typecheck pytest bench bench-fleet chaos system test-system venv omero clean

demo: system venv
	$(PY) -m devtools.demo

test: system test-system venv omero lint typecheck pytest

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: venv
	$(PY) -m mypy

pytest: venv
	TILEBRIDGE_STRICT_SKIPS=1 $(PY) -m pytest

bench: system venv
	$(PY) benchmarks/throughput.py

bench-fleet: system test-system venv
	$(PY) benchmarks/fleet.py

# The real programs under seeded faults, then a pixel-for-pixel verdict (docs/chaos.md).
# Needs root (it mounts small tmpfs disks). Not part of `make test`; tests/chaos/ runs a
# short seeded run of it there. KINDS= limits the fault kinds (comma-separated).
SEED ?= 1
FAULTS ?= 40
SCANS ?= 20
MINUTES ?= 15
chaos: system venv omero
	$(PY) -m devtools.chaos --seed $(SEED) --faults $(FAULTS) --scans $(SCANS) \
	  --minutes $(MINUTES) $(if $(KINDS),--kinds $(KINDS)) $(if $(DRAIN_S),--drain-s $(DRAIN_S))

# Debian packages, installed only when missing (Mosquitto comes from Debian; the project
# ships only its configuration, mosquitto/).
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
endef

test-system:
	$(call apt_install,$(APT_TEST_PACKAGES))
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "PostgreSQL's initdb not found" >&2; exit 1; }

system:
	$(call apt_install,$(APT_PACKAGES))
	@# The packaged broker starts as a system service; tilebridge runs its own on a free port.
	@command -v mosquitto >/dev/null || { echo "mosquitto not found" >&2; exit 1; }

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# omero-py needs zeroc-ice 3.6.5, built once from source and cached outside the repository.
omero: venv
	@$(PY) -c "import omero, Ice" 2>/dev/null || { \
	  wheel="$$(bash scripts/build_zeroc_ice.sh $(PY) | tail -n 1)" && \
	  $(PY) -m pip install -q "$$wheel" -e '.[omero]'; }

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
