#!/usr/bin/env bash
# Profile lm-gpu: the causal-LM checks and budgets a 2-core CPU cannot afford, on one CUDA GPU.
#
#   benchmarks/lm_gpu.sh OUT [STEPS]        # about 7 minutes on one H200; STEPS default 200
#
# Needs the assets smollm2-135m, grimm-tales, book-excerpts, bbc-news and rotten-tomatoes fetched
# (FUSIONPRUNE_HOME), and the repository root as the working directory. In order:
#   1. speed.py: smollm2-135m at 30, 24 and 20 layers, bf16, prefill and generation (GPU alone);
#   then side by side (timings below are shared-GPU upper bounds):
#   2. lm_heal.py: LoRA, QLoRA and full fine-tuning on the Block Influence 24-layer set, 20 steps
#      (the CPU's budget, for a like-for-like check) and STEPS steps, with the GPU's peak memory;
#   3. lm_heal_choice.py: every removed set of results/lm-cpu-choice healed with STEPS LoRA steps
#      (10x the lm-cpu-healed budget), three workers;
#   4. lm_compress.py: sleb and fusion-verify on grimm-tales to 24 layers end to end on the GPU
#      (LoRA STEPS, distillation STEPS/2 with the teacher beside each step, zero-shot 100 examples a task);
#   5. the causal-LM tests on a machine with CUDA (models land on the GPU there).
# OUT receives at most eight files (run.log, speed.json, healed.csv, lm-gpu.csv, lm-heal-20.json,
# lm-heal-STEPS.json and the two compress reports); each step's exit status is in run.log.
set -u
OUT=${1:?usage: benchmarks/lm_gpu.sh OUT [STEPS]}
STEPS=${2:-200}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-420}          # seconds any one step may take
WORK=${WORK:-$(mktemp -d)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
mkdir -p "$OUT" "$WORK"
LOG=$OUT/run.log

. "$(dirname "$0")/gpu_run.sh"  # run TAG CMD..., versions MODULE...
versions transformers peft accelerate bitsandbytes

run speed $PY benchmarks/speed.py --model smollm2-135m --depths 30,24,20 --batch-size 8 --seq-len 256 \
    --dtype bf16 --generate 64 --repeats 7 --out "$OUT/speed.json"

BI=3,13,14,15,17,25
( run heal-20 $PY benchmarks/lm_heal.py --methods lora,qlora,full --steps 20 --drop-layers $BI \
      --out "$OUT/lm-heal-20.json"
  run heal-$STEPS $PY benchmarks/lm_heal.py --methods lora,qlora,full --steps "$STEPS" --drop-layers $BI \
      --out "$OUT/lm-heal-$STEPS.json" ) &
for w in 0 1 2; do
    run choice-$w $PY benchmarks/lm_heal_choice.py --steps "$STEPS" --worker $w/3 --out "$WORK/healed" &
done
for s in sleb fusion-verify; do
    run compress-$s $PY benchmarks/lm_compress.py --corpora grimm-tales --strategies $s --depths 24 \
        --heal-steps "$STEPS" --distill-steps $((STEPS / 2)) --zero-shot-samples 100 \
        --out "$WORK/lm-gpu-$s" --runs "$WORK/runs" &
done
run tests $PY -m pytest -q -p no:cacheprovider tests/test_causal_lm.py tests/test_real_causal_lm.py tests/test_distill.py
wait

cp "$WORK/healed/results.csv" "$OUT/healed.csv" 2>/dev/null
$PY - "$WORK" "$OUT" <<'EOF' >> "$LOG" 2>&1
import glob, shutil, sys
import pandas as pd
work, out = sys.argv[1:]
csvs = sorted(glob.glob(f"{work}/lm-gpu-*/results.csv"))
if csvs:
    pd.concat([pd.read_csv(c) for c in csvs], ignore_index=True).to_csv(f"{out}/lm-gpu.csv", index=False)
for r in sorted(glob.glob(f"{work}/runs/*/report.json")):
    shutil.copy(r, f"{out}/report-{r.split('/')[-2]}.json")
EOF
echo "done $(date +%T)" >> "$LOG"
