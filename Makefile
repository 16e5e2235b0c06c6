# Two commands, each works on a fresh machine from a clean clone (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# make test THREADS=1 (or 2): the suite's torch intra-op threads; empty = torch's default
THREADS ?=

.PHONY: setup quickstart test docs notebook bench gpu-wheels gpu-check clean

# --- The GPU check (docs/benchmarks.md, "GPU check"). The device machine has torch and most dependencies but no
# network: make gpu-wheels (here, with pip access) puts the missing pure-Python wheels in $(GPU_WHEELS) (git-ignored;
# carry it), and make gpu-check (there) installs them into $(GPU_SITE) when they are not importable, then runs
# benchmarks/gpu_check.py: the CUDA tests and the GPU throughput benchmark in at most $(GPU_BUDGET) s (8 minutes with the install).
PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_WHEELS ?= .gpu-wheels
GPU_SITE ?= /tmp/clipexp-gpu-site
GPU_BUDGET ?= 450
# what the device image lacks (its package list: hydra-core, omegaconf, open_clip and the textile images are not in
# it); the versions this project is tested with
GPU_PACKAGES = hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 open-clip-torch==3.3.0 ftfy==6.3.1 \
	wcwidth==0.9.5 conformal-clip-data==0.1.4

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

gpu-wheels:
	$(PYTHON) -m pip wheel --quiet --no-deps --wheel-dir $(GPU_WHEELS) $(GPU_PACKAGES)
	@# pure Python, or CPython's stable ABI on x86-64 Linux (the device machine: Python 3.12, x86-64)
	@! ls $(GPU_WHEELS)/*.whl | grep -v -E -- '-none-any\.whl$$|-cp3(8|9|10|11|12)-abi3-manylinux[^/]*x86_64\.whl$$' || { \
	  echo "gpu-wheels: the wheels above do not install on the device machine's Python 3.12 / x86-64"; exit 1; }
	$(PYTHON) benchmarks/gpu_check.py --carry-size $(GPU_WHEELS)

gpu-check:
	@PYTHONPATH=$(GPU_SITE):$$PYTHONPATH $(PYTHON) -c "import hydra, omegaconf, open_clip, open_clip_train, conformal_clip_data" 2>/dev/null || { \
	  test -d $(GPU_WHEELS) || { echo "gpu-check: packages are missing and there is no $(GPU_WHEELS)/: run make gpu-wheels where pip works, carry $(GPU_WHEELS)"; exit 2; }; \
	  echo "installing $(GPU_WHEELS)/*.whl into $(GPU_SITE) (offline)"; \
	  $(PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target $(GPU_SITE) $(GPU_WHEELS)/*.whl || exit 1; }
	PYTHONPATH=$(GPU_SITE):$$PYTHONPATH PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/gpu_check.py --budget $(GPU_BUDGET)

clean:
	rm -rf outputs multirun mlflow.db mlflow.db.lock mlartifacts .pytest_cache site $(GPU_WHEELS)
