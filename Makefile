# The two commands of the README: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint migrate clean chromium serve bench dist

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime-installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.runtime-installed
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.runtime-installed
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-bench.txt
	touch $@

# The short benchmark (about 2.5 minutes, with the storm rows at 500 clients; docs/performance.md): PostgreSQL and Redis on loopback
# (BENCH_DATABASE_URL, REDIS_URL); writes bench/results/bench-<date>.json and .png.
# The full run: .venv/bin/python bench/run.py --full
bench: $(VENV)/.bench-installed
	$(BIN)/python bench/run.py $(BENCH_ARGS)

migrate: $(VENV)/.runtime-installed
	$(BIN)/python manage.py migrate --noinput

run: migrate
	$(BIN)/python manage.py demo_setup
	SITE_URL=$${SITE_URL:-http://$(HOST):$(PORT)} $(BIN)/python manage.py runserver $(HOST):$(PORT)

# Production serving (docs/deployment.md): uvicorn workers on one port, no migrate, no demo
# users. Several workers need REDIS_URL; WORKERS defaults to the number of cores.
serve: $(VENV)/.runtime-installed
	bin/serve --host $(HOST) --port $(PORT) $(if $(WORKERS),--workers $(WORKERS))

# The app's own distribution (docs/install.md): the sdist and wheel of notifications/ alone, in
# dist/ (tests/test_distribution.py checks what the wheel holds).
dist: $(VENV)/.dev-installed
	$(BIN)/python -m build

test: $(VENV)/.dev-installed chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian's Chromium for the browser tests (tests/browser); Playwright never downloads a browser.
# CI runs as root on a fresh machine; where the install fails (not root), the browser tests
# skip, and fail when CI=true.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "Installing Debian's chromium for the browser tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "warning: could not install chromium: the browser tests will skip (and fail when CI=true)"; }

# ruff (with the security rules S), mypy with django-stubs, and pip-audit on the pinned
# requirements. pip-audit needs PyPI's vulnerability data (its JSON API per release): where that
# cannot be reached it prints "NOT AUDITED" and does not fail (AUDIT_REQUIRED=1 makes it fail);
# a known vulnerability always fails. `make test` never runs it.
lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python bin/audit-dependencies

clean:
	rm -rf $(VENV) db.sqlite3 .test-db-*.sqlite3
