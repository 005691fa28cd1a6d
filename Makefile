# ConformalSAM toolkit. `make annotate calibrate train` runs the pipeline on CONFIG
# (the embedded demo by default); `make test` runs the test suite.
# The first target creates .venv and installs the project into it.

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/demo.toml
# Installed before the project so that pip never picks a CUDA build on its own.
# GPU users: make TORCH_SPEC="torch==2.13.0 torchvision==0.28.0 --index-url <your CUDA wheel index>"
# (torchvision from the same index as torch: SEEM needs it, and a torchvision of another build
# does not import), or install torch into .venv yourself first and set TORCH_SPEC=.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= demo,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all setup data annotate calibrate train ablation ablation-variants ablation-sweep test \
	test-upstream test-all lint format bench clean

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
# config's own schedule (batch 8 + 8, 120 + 40 iterations), a run's figure its val mIoU at the
# end of training; 5 seeds, and more for a row until its 95 % interval is ± 5 or narrower (at
# most 10). Measured times: docs/ablation.md (about 65 minutes on 2 CPU cores). A GPU box runs the same targets on CUDA
# unchanged (ABLATION_JOBS=1: one training run at a time on one GPU).
ABLATION_JOBS ?= 2
ABLATION_ROWS ?= labeled_only,raw,cp,cp_stage2,cp_unimatch,threshold,risk,cp_class,recall
ABLATION_SEEDS ?= --seeds 0,1,2,3,4 --until-half-width 5 --max-seeds 10 --jobs $(ABLATION_JOBS)
ABLATION_ARGS ?= $(ABLATION_SEEDS) --rows $(ABLATION_ROWS)
ABLATION_DATA ?=
ablation: $(STAMP)
	$(PY) bench/ablation.py --config $(CONFIG) $(ABLATION_ARGS) $(ABLATION_DATA)

# variant A (stronger gap, weaker annotator) and variant B (weaker gap, better annotator)
VARIANT_ROWS ?= labeled_only,raw,cp,cp_stage2,cp_unimatch,recall,recall_stage2
ablation-variants: $(STAMP)
	$(PY) bench/ablation.py --config $(CONFIG) $(ABLATION_SEEDS) --rows $(VARIANT_ROWS) \
		--data-set demo_seed=1 --data-set demo_gap=0.7
	$(PY) bench/ablation.py --config $(CONFIG) $(ABLATION_SEEDS) --rows $(VARIANT_ROWS) \
		--data-set demo_seed=2 --data-set demo_gap=0.3

# the same rows over the domain gap, each gap with its own dataset and demo annotator; the
# demo's own gap (0.5) reads make ablation's runs
SWEEP ?= demo_gap=0,0.25,0.5,0.75,1
SWEEP_ARGS ?= --seeds 0,1,2 --jobs $(ABLATION_JOBS) \
	--rows labeled_only,raw,cp,cp_stage2
ablation-sweep: $(STAMP)
	$(PY) bench/ablation.py --config $(CONFIG) --sweep $(SWEEP) $(SWEEP_ARGS)

# The suite: every test but those that need a GPU or ../shared/upstream.
test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not upstream" $(PYTEST_ARGS)

# SEEM's real code: docs/annotate.md's recipe run in a fresh virtual environment (kept in
# .upstream-cache/, about 6.5 GB), then `annotate run` against SEEM's own forward. Needs
# ../shared/upstream. On 2 cores shared with other jobs: 6-7 minutes to build the environment
# (once per recipe text), 5-10 for the tests.
test-upstream: $(STAMP)
	$(PY) -m pytest -q -m upstream -p no:cacheprovider $(UPSTREAM_ARGS)

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
