# The two README commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/fusionprune
# torch first, pinned: on this platform torch==2.13.0 is a CPU wheel; an unpinned torch pulled
# in by transformers would be a multi-GB CUDA build. GPU users: `make TORCH_SPEC=torch install`
# or install their own torch into the venv first (an importable torch is kept as it is).
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.fusionprune-installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast assets clean fusion-rows fusion-rows-lm fusion-rows-random fusion-rows-mpnet fusion-bundle compare

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,gguf,qlora,onnx,lm-eval]"
	touch $(STAMP)

assets: $(STAMP)
	$(CLI) assets fetch minilm-l6 rotten-tomatoes

demo: assets
	$(CLI) demo -o $(DEMO_DIR) --resume --overwrite  # a stopped demo continues; a finished one is replaced

# Every asset a test loads, fetched before the workers start (two workers fetching one asset at
# once: the second is refused, by design).
TEST_ASSETS ?= minilm-l6 mpnet-base smollm2-135m gemma3-270m rotten-tomatoes bbc-news election-tweets \
               reuters-r8 reuters-r52 20newsgroups grimm-tales

# One pytest-xdist worker per core, each on one thread (tests/conftest.py): 21 min against 36 min
# serial on the 2-core CPU (benchmarks/journal.md, 2026-12-03).
test: $(STAMP)
	$(CLI) assets fetch $(TEST_ASSETS)
	$(PY) -m pytest -n auto

test-fast: $(STAMP)
	$(PY) -m pytest -n auto -m "not slow"

# Fusion training data: greedy states of minilm-l6 on the six public datasets (resumable: a
# finished dataset is skipped, an interrupted one resumes from its .state folder), then the bundle.
FUSION_DATA     := fusion_prune/fusion_data
FUSION_DATASETS ?= rotten-tomatoes bbc-news election-tweets reuters-r8 reuters-r52 20newsgroups
COLLECT_ARGS    ?= --min-layers 1 --finetune-steps 40 --max-train-samples 2000 --teacher-epochs 2 --teacher-patience 3 \
                   --max-eval-samples 400 \
                   --signal-samples 256 --max-length 128 --seed 0

fusion-rows: $(STAMP)
	mkdir -p $(FUSION_DATA)/rows
	for d in $(FUSION_DATASETS); do \
	  test -f $(FUSION_DATA)/rows/minilm-l6-$$d.parquet || \
	  $(CLI) collect --model minilm-l6 --dataset $$d -o $(FUSION_DATA)/rows/minilm-l6-$$d.parquet $(COLLECT_ARGS) \
	  || exit 1; \
	done

# Causal-LM rows: smollm2-135m's greedy states (30 -> 20 layers) on three prose corpora, each
# state labelled by drop-one NLL on 4 held-out windows of 256 tokens. Resumable like fusion-rows.
LM_CORPORA      ?= grimm-tales book-excerpts bbc-news
LM_COLLECT_ARGS ?= --task causal-lm --min-layers 20 --finetune-steps 0 --signal-samples 4 --max-eval-samples 4 \
                   --max-length 256 --seed 0

fusion-rows-lm: $(STAMP)
	mkdir -p $(FUSION_DATA)/rows-lm
	for c in $(LM_CORPORA); do \
	  test -f $(FUSION_DATA)/rows-lm/smollm2-135m-$$c.parquet || \
	  $(CLI) collect --model smollm2-135m --dataset $$c -o $(FUSION_DATA)/rows-lm/smollm2-135m-$$c.parquet $(LM_COLLECT_ARGS) \
	  || exit 1; \
	done

# Rows of a seeded random walk (collect --walk random), settings as fusion-rows: states the oracle
# never visits. benchmarks/archive/walks.py measures whether the fusion chooses better with them.
fusion-rows-random: $(STAMP)
	mkdir -p $(FUSION_DATA)/rows-random
	for d in $(FUSION_DATASETS); do \
	  test -f $(FUSION_DATA)/rows-random/minilm-l6-$$d.parquet || \
	  $(CLI) collect --model minilm-l6 --dataset $$d -o $(FUSION_DATA)/rows-random/minilm-l6-$$d.parquet $(COLLECT_ARGS) \
	  --walk random || exit 1; \
	done

# A second encoder family for leave-one-family-out (benchmarks/archive/fusion_verify.py): mpnet-base 12 -> 6,
# capped for the 2-core CPU (a base-size teacher wants a smaller learning rate than minilm's).
MPNET_DATASETS     ?= rotten-tomatoes bbc-news
MPNET_COLLECT_ARGS ?= --min-layers 6 --finetune-steps 20 --max-train-samples 600 --max-eval-samples 200 \
                      --signal-samples 64 --max-length 64 --teacher-epochs 1 --teacher-lr 1e-4 --seed 0

fusion-rows-mpnet: $(STAMP)
	mkdir -p $(FUSION_DATA)/rows-mpnet
	for d in $(MPNET_DATASETS); do \
	  test -f $(FUSION_DATA)/rows-mpnet/mpnet-base-$$d.parquet || \
	  $(CLI) collect --model mpnet-base --dataset $$d -o $(FUSION_DATA)/rows-mpnet/mpnet-base-$$d.parquet \
	  $(MPNET_COLLECT_ARGS) || exit 1; \
	done

# The shipped bundles, one per task, from the shipped rows (settings chosen by leave-one-out regret).
fusion-bundle: fusion-rows fusion-rows-lm
	$(CLI) fit-fusion --data '$(FUSION_DATA)/rows/*.parquet' --model-type rf \
	  -o $(FUSION_DATA)/default-fusion.npz --report benchmarks/results/fusion/lodo.json --overwrite
	$(CLI) fit-fusion --data '$(FUSION_DATA)/rows-lm/*.parquet' --measured loss_after_drop --model-type rf \
	  -o $(FUSION_DATA)/default-fusion-lm.npz --report benchmarks/results/fusion/lodo-lm.json --overwrite

clean:
	rm -rf $(VENV) runs .pytest_cache

# Strategy comparison (benchmarks/compare.py). Resumable; two one-thread workers share the 2 cores
# and one results file (assets are fetched on first use). PROFILE=gpu for mpnet-base on a GPU machine.
PROFILE ?= cpu
compare: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/compare.py --profile $(PROFILE) --threads 1 & \
	OMP_NUM_THREADS=1 $(PY) benchmarks/compare.py --profile $(PROFILE) --threads 1; wait
	$(PY) benchmarks/compare.py --profile $(PROFILE) --summary-only
