# The two commands a newcomer needs: `make run` and `make test`. Both install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VAR_DIR ?= $(CURDIR)/var
PORT ?= 8000
HOST ?= 127.0.0.1
# The local Redis broker (started by `make run` unless one already answers on this port).
REDIS_PORT ?= 6390
APT_PACKAGES := softhsm2 redis-server chromium postgresql wrk
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export VAR_DIR

.PHONY: run demo test lint check pytest pytest-postgres system-deps deps migrate bootstrap clean help

help:
	@echo "make run    start the service on http://$(HOST):$(PORT) with local SoftHSM keys,"
	@echo "           Redis, the Celery worker and beat (logs in $(VAR_DIR)/log)"
	@echo "make demo   CI signs for production, two approvers approve, model_signing verifies"
	@echo "make test   lint, run the whole test suite, then the database-dependent tests again"
	@echo "           on a throwaway PostgreSQL cluster (Debian's server, started and removed by the run)"

## Debian packages: the HSM (SoftHSM2), the broker (Redis), the browser for the UI tests
## (chromium), PostgreSQL (only its server binaries: the tests run their own cluster) and wrk
## (the load generator of bench/bench_api.py).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[client,server,dev]'
	@touch $@

deps: system-deps $(VENV)/.installed

migrate: deps
	@mkdir -p $(VAR_DIR)
	$(PY) manage.py migrate --noinput -v 0

bootstrap: migrate
	$(PY) manage.py bootstrap_local_keys
	@$(PY) manage.py create_demo_users > $(VAR_DIR)/demo-users.out

run: bootstrap
	@$(PY) manage.py collectstatic --noinput -v 0
	@echo
	@echo "  Model signing service: http://$(HOST):$(PORT)/api/v1/docs/"
	@echo "  Public keys:           http://$(HOST):$(PORT)/api/v1/keys/"
	@echo "  Get a CI token:        $(PY) manage.py create_api_token ml-platform-ci@company.com --authority staging"
	@echo "  Sign a model:          $(VENV)/bin/modelsign sign ./my-model --server http://$(HOST):$(PORT) --environment staging --token <token>"
	@echo "  Approver UI:           http://$(HOST):$(PORT)/  (production needs 2 approvals; demo logins:)"
	@cat $(VAR_DIR)/demo-users.out
	@echo
	exec env VENV=$(VENV) HOST=$(HOST) PORT=$(PORT) REDIS_PORT=$(REDIS_PORT) deploy/local/run.sh

demo: bootstrap
	$(PY) deploy/local/demo.py

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run
	MODELSIGN_ENV=production SECRET_KEY="$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(64))')" \
	  ALLOWED_HOSTS=signing.example.com $(PY) manage.py check --deploy --fail-level WARNING

pytest: deps
	$(PY) -m pytest

# The tests marked `postgres` (tests/conftest.py) again, on a cluster the run starts on a free
# loopback port (as the `postgres` OS user when root) and removes at the end.
pytest-postgres: deps
	$(PY) -m pytest --postgres -m postgres

test: lint pytest pytest-postgres

clean:
	rm -rf $(VENV) $(VAR_DIR)
