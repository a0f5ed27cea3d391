# fedtail — the two quick-start commands. Each installs into .venv/ on first use (or when
# pyproject.toml changes): `make run` what the pipeline needs, `make test` that plus the dev tools.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin

.PHONY: run test bench ui-check flwr clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

## run: the main job on the embedded default (digits) through the Prefect flow
run: $(VENV)/.installed
	$(BIN)/fedtail run

## test: ruff, then the test suite (what .ci/run calls)
test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2

## bench: in-process vs Ray engine and the main job's wall time, then the in-process engine vs a
## hand-written loop at 20..10,000 clients (tens of minutes), then a sweep vs 9 x `fedtail run` -> benchmarks/results/
bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/engines.py
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/sweep_overhead.py

## flwr: the pipeline under Flower's runtime (`flwr run .`, logs streamed): a local SuperLink (started on
## first use, left running) with one SuperNode per client of params.yaml; the app runs in this venv, so
## Flower installs nothing per run. Stop the SuperLink with `pkill -f flower-superlink`.
FLWR_ENV := PATH="$(CURDIR)/$(BIN):$$PATH" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
flwr: $(VENV)/.installed
	$(FLWR_ENV) $(BIN)/flwr federation simulation-config --client-resources-num-cpus 1 --num-supernodes \
	  $$($(BIN)/python -c "from fedtail.config import load_config; print(load_config().federation.num_clients)")
	$(FLWR_ENV) $(BIN)/flwr run . --run-config "root='$(CURDIR)'" --stream

## ui-check: run the smoke preset against a private Prefect server and look at the run page, the
## Artifacts page and the report in headless Chromium (Debian: apt-get install chromium) -> ui-check/
ui-check: $(VENV)/.installed-dev
	$(BIN)/python scripts/ui_check.py --out ui-check

## clean: the rebuildable caches only (staged arrays, partitions); run folders hold results and stay
clean:
	rm -rf artifacts .pytest_cache
