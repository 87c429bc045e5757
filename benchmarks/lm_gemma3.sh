#!/usr/bin/env bash
# gemma3-270m (18 layers) compressed to two depths on grimm-tales with the CLI's defaults, except
# the healing budget: 20 LoRA steps of 4 x 512 tokens instead of 60 (about 3x cheaper on a 2-core
# CPU). DTYPE=bfloat16 makes the choice in bfloat16 without healing (runs named *-bf16), to set
# beside the float32 one. Resumable: a stopped run continues (--resume), a finished one is
# skipped. The reports are copied to benchmarks/results/lm-gemma3/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${RUNS:-runs}/lm-gemma3
RES=benchmarks/results/lm-gemma3
DTYPE=${DTYPE:-float32}
mkdir -p "$OUT" "$RES"
extra=(--heal-steps "${HEAL_STEPS:-20}"); suffix=""
[ "$DTYPE" = float32 ] || { extra=(--dtype "$DTYPE" --heal none); suffix="-${DTYPE/bfloat/bf}"; }
for depth in ${DEPTHS:-15 12}; do
  run="$OUT/gemma3-270m-grimm-tales-$depth$suffix"
  if [ -f "$run/report.json" ]; then echo "done: $run"; else
    flag=""; [ -d "$run.partial" ] || [ -d "$run" ] && flag="--resume"
    /usr/bin/time -v -o "$RES/time-$depth$suffix.txt" .venv/bin/fusionprune compress -m gemma3-270m -d grimm-tales \
      --target-layers "$depth" "${extra[@]}" -o "$run" $flag
  fi
  cp "$run/report.json" "$RES/gemma3-270m-grimm-tales-$depth$suffix.json"
done
