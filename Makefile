# `make` prints this help; `make run` starts the service, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PG_URL ?= postgres://postgres@127.0.0.1:5432/sitemessage
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672//

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast test-faults lint bench migrate clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## Create .venv and install requirements.txt and requirements-dev.txt

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

run: install ## Start Redis if needed, migrate, then workers, beat, Flower, admin, SMTP sink
	scripts/run.sh

lint: install ## ruff, mypy, and the import layering (import-linter; contracts in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports --no-cache

# The whole suite on SQLite + Redis, then the end-to-end tests again on PostgreSQL, and the
# end-to-end and fault tests on RabbitMQ. Services this target started are stopped at the end.
test: install ## Lint, then all tests (SQLite+Redis; e2e+faults again on PostgreSQL and on RabbitMQ)
	scripts/services.sh start redis postgres rabbitmq prosody chromium
	status=0; \
	$(MAKE) --no-print-directory lint || status=$$?; \
	[ $$status -eq 0 ] && { $(BIN)/pytest || status=$$?; }; \
	[ $$status -eq 0 ] && { DATABASE_URL=$(PG_URL) $(BIN)/pytest -m "e2e or pg or faults" || status=$$?; }; \
	[ $$status -eq 0 ] && { CELERY_BROKER_URL=$(AMQP_URL) SITEMESSAGE_VAR_DIR=var/amqp \
		$(BIN)/pytest -m "e2e or faults" || status=$$?; }; \
	scripts/services.sh stop; exit $$status

test-fast: install ## Only the tests that need no worker process
	$(BIN)/pytest -m "not e2e and not faults"

test-faults: install ## Only the fault tests (killed workers, lost broker, servers down); also in `make test`
	scripts/services.sh start redis postgres
	status=0; $(BIN)/pytest -m faults -s || status=$$?; scripts/services.sh stop; exit $$status

bench: install ## The benchmark suite (bench/suite.py): one table, PASS or SHORT per target; BENCH_ARGS=--quick
	scripts/services.sh start redis postgres rabbitmq prosody
	status=0; $(BIN)/python bench/suite.py $(BENCH_ARGS) || status=$$?; scripts/services.sh stop; exit $$status

migrate: install ## Create or update the default SQLite database (var/db.sqlite3)
	DJANGO_DEBUG=1 $(BIN)/python manage.py migrate

clean: ## Remove .venv and var/
	rm -rf $(VENV) var
