PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test setup clean
setup: $(VENV)/.ok
$(VENV)/.ok: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
