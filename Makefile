# mailgate: `make run` starts a node on ./var, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/mailgate init --demo
	$(BIN)/mailgate serve

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/pickup_to_drop.py
	$(BIN)/python bench/queue_commands.py
	$(BIN)/python bench/agent_throughput.py
	$(BIN)/python bench/smtp_to_drop.py

clean:
	rm -rf $(VENV) var .pytest_cache
