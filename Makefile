# ConformalSAM toolkit. `make annotate calibrate train` runs the pipeline on CONFIG
# (the embedded demo by default); `make test` runs the test suite.
# The first target creates .venv and installs the project into it.

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/demo.toml
# Installed before the project so that pip never picks a CUDA build on its own.
# GPU users: make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" (or install torch
# into .venv yourself first and set TORCH_SPEC=).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= demo,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all setup data annotate calibrate train ablation ablation-variants ablation-sweep test \
	test-all lint format bench clean

all: annotate calibrate train

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install --quiet $(TORCH_SPEC); fi
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

data: $(STAMP)
	$(PY) -m data_manifest prepare --config $(CONFIG)

annotate: $(STAMP)
	$(PY) -m annotate run --config $(CONFIG)

calibrate: $(STAMP)
	$(PY) -m calibrate run --config $(CONFIG)

train: $(STAMP)
	$(PY) -m train fit --config $(CONFIG)

# docs/ablation.md: the paper's ablation on the demo (make ablation), on its two variants
# (make ablation-variants) and over the demo's domain gap (make ablation-sweep), all on the demo
# config's own schedule (batch 8 + 8, 120 + 40 iterations), evaluated every 10 iterations, a
# run's figure the mean of its last 3 evaluations. Measured times: docs/ablation.md.
# GPU box: the same targets train on CUDA unchanged (add ABLATION_JOBS=1 on one GPU).
ABLATION_JOBS ?= 2
ABLATION_ARGS ?= --seeds 0,1,2,3,4 --jobs $(ABLATION_JOBS) --eval-last 3 --train-set eval_every=10
ABLATION_DATA ?=
ablation: $(STAMP)
	$(PY) bench/ablation.py --config $(CONFIG) $(ABLATION_ARGS) $(ABLATION_DATA)

# variant A (stronger gap, weaker annotator) and variant B (weaker gap, better annotator)
VARIANT_ROWS ?= labeled_only,raw,cp,cp_stage2,recall,recall_stage2
ablation-variants: $(STAMP)
	$(PY) bench/ablation.py --config $(CONFIG) $(ABLATION_ARGS) --rows $(VARIANT_ROWS) \
		--data-set demo_seed=1 --data-set demo_gap=0.7
	$(PY) bench/ablation.py --config $(CONFIG) $(ABLATION_ARGS) --rows $(VARIANT_ROWS) \
		--data-set demo_seed=2 --data-set demo_gap=0.3

# the same rows over the domain gap, each gap with its own dataset and demo annotator; the
# demo's own gap (0.5) reads make ablation's runs
SWEEP ?= demo_gap=0,0.25,0.5,0.75,1
SWEEP_ARGS ?= --seeds 0,1,2 --jobs $(ABLATION_JOBS) --eval-last 3 --train-set eval_every=10 \
	--rows labeled_only,raw,cp,cp_stage2,recall,recall_stage2
ablation-sweep: $(STAMP)
	$(PY) bench/ablation.py --config $(CONFIG) --sweep $(SWEEP) $(SWEEP_ARGS)

# Fast suite: everything but tests marked slow or gpu.
test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
