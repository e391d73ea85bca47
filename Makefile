# The README's two commands: `make run` (set up, then the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint setup capsules bench clean

run: $(STAMP)
	$(BIN)/orch up --dash config.yaml

test: $(STAMP) capsules/node_modules/.package-lock.json
	$(BIN)/ruff check orchestrator tui tests bench
	$(BIN)/ruff format --check orchestrator tui tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Node is needed only to rebuild the example capsules (the .wasm files are committed).
capsules/node_modules/.package-lock.json: capsules/package-lock.json
	cd capsules && npm ci --no-audit --no-fund --loglevel=error

capsules: capsules/node_modules/.package-lock.json
	cd capsules && npm run build

bench: $(STAMP)
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) .orch capsules/node_modules
