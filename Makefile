# Two commands, each works on a fresh machine from a clean clone (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# make test THREADS=1 (or 2): the suite's torch intra-op threads; empty = torch's default
THREADS ?=

.PHONY: setup quickstart test docs notebook bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/python
	# torch 2.14.1 / torchvision 0.29.1 come from local disk here (see README "Install")
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install --quiet torch torchvision
	$(BIN)/pip install --quiet -e ".[dev]"

quickstart: setup
	$(BIN)/python -m clipexp experiment=quickstart

test: setup
	CLIPEXP_TEST_THREADS=$(THREADS) $(BIN)/python -m pytest -q --durations=15   # the 15 slowest, for the next trim

docs: setup
	$(BIN)/python -m clipexp.config.reference > docs/reference/configuration.md   # regenerate the reference
	$(BIN)/python -m clipexp.config.reference --trainer-yaml > conf/trainer/default.yaml
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

notebook: setup  # notebooks/compare_runs.ipynb on this folder's store (or MLFLOW_TRACKING_URI), executed, as HTML
	$(BIN)/python -m nbconvert --to html --execute notebooks/compare_runs.ipynb --output-dir outputs/notebooks
	@echo "open outputs/notebooks/compare_runs.html"

bench: setup
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf outputs multirun mlflow.db mlflow.db.lock mlartifacts .pytest_cache site
