# Two commands do all the set-up (see README): `make demo` and `make test`.
# Both create the virtual environment on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean ui browser help

install: $(STAMP)

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip wheel setuptools 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import obliviate, torch, torchvision, ray, prefect, s3fs, numba, mypy" || (echo "install failed: see pip output above" >&2; exit 1)
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/obliviate demo $(DEMO_ARGS)

test: $(STAMP) browser
	$(PY) -m pytest

# The dashboard test (tests/test_dashboard.py) drives Debian's chromium in headless mode; installed
# here once when missing (CI runs as root; elsewhere through sudo). If that fails the test says so.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium for the browser test (apt-get, about a minute)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "warning: could not install chromium; tests/test_dashboard.py will fail until it is installed" >&2

# The Prefect dashboard of every run the commands recorded (~/.obliviate/prefect), until Ctrl-C.
ui: $(STAMP)
	$(VENV)/bin/obliviate ui $(UI_ARGS)

# The habits that keep the tree tidy: lint, format and types (settings in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs

help:
	@echo "make demo [DEMO_ARGS=--quick]   the main job on the embedded default (creates .venv on first use)"
	@echo "make test                       every test (installs chromium for the dashboard test when missing)"
	@echo "make ui [UI_ARGS='--port N']    the Prefect dashboard of the recorded runs, until Ctrl-C"
	@echo "make lint                       ruff check, ruff format --check, mypy"
	@echo "make install                    only create or update .venv"
	@echo "make clean                      remove .venv and ./runs"
