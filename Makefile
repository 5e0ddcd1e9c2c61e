# Two commands do all the set-up (see README): `make demo` and `make test`.
# Both create the virtual environment on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

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

test: $(STAMP)
	$(PY) -m pytest

# The habits that keep the tree tidy: lint, format and types (settings in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs
