# Two commands set up a fresh machine: `make serve` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/local.yaml
STAMP := $(VENV)/.installed

.PHONY: serve test lint install lock clean

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
	$(BIN)/ruff check serve_app tests loadtests cluster

test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^photoenhance' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
