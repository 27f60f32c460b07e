# Two commands set up a fresh machine: `make serve` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/local.yaml
STAMP := $(VENV)/.installed

.PHONY: serve test lint install lock clean chromium redis

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/photoenhance serve --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check serve_app tests loadtests cluster scripts examples

# The web page's tests drive Debian's Chromium; installed here when missing and root may
# (CI runs as root), otherwise those tests skip and say why.
chromium:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || \
	  { test "$$(id -u)" = 0 && (apt-get update -qq && apt-get install -y -qq chromium) || \
	    echo "Chromium is missing and cannot be installed here: tests/test_web.py will skip"; }

# tests/test_head_restart.py keeps the GCS's tables in Debian's redis-server (GCS fault
# tolerance), started by the test on loopback; installed like Chromium, else the test skips.
redis:
	@command -v redis-server >/dev/null 2>&1 || test -x /usr/bin/redis-server || \
	  { test "$$(id -u)" = 0 && (apt-get update -qq && apt-get install -y -qq redis-server) || \
	    echo "redis-server is missing and cannot be installed here: tests/test_head_restart.py will skip"; }

test: $(STAMP) lint chromium redis
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^photoenhance' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
