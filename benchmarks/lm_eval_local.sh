#!/usr/bin/env bash
# lm-evaluation-harness on two local tasks built from labelled assets (fp_rotten_tomatoes,
# fp_election_tweets; 200 test examples each, the same ones fusionprune's --zero-shot scores) for
# smollm2-135m, its 24-layer student (the fusion-verify seed-0 choice on grimm-tales from
# lm-cpu-choice: layers 12-17 removed, no healing) and gemma3-270m, beside fusionprune's own
# zero-shot accuracy. Resumable: finished outputs are skipped. Results: benchmarks/results/lm-eval/.
set -euo pipefail
cd "$(dirname "$0")/.."
RES=benchmarks/results/lm-eval
OUT=${RUNS:-runs}/lm-eval
N=${N:-200}
mkdir -p "$RES" "$OUT"
FP=.venv/bin/fusionprune
[ -d "$OUT/smollm2-24" ] || $FP prune -m smollm2-135m --drop 12,13,14,15,16,17 -o "$OUT/smollm2-24"
for m in smollm2-135m "$OUT/smollm2-24" gemma3-270m; do
  name=$(basename "$m")
  f="$RES/$name-harness.json"
  [ -s "$f" ] || { $FP evaluate -m "$m" --lm-eval fp_rotten_tomatoes,fp_election_tweets --limit "$N" --json > "$f.tmp" && mv "$f.tmp" "$f"; }
  for d in rotten-tomatoes election-tweets; do
    f="$RES/$name-zero-shot-$d.json"
    [ -s "$f" ] || { $FP evaluate -m "$m" -d "$d" --zero-shot --max-samples "$N" --json > "$f.tmp" && mv "$f.tmp" "$f"; }
  done
done
.venv/bin/python - "$RES" <<'PY'
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
for name in ("smollm2-135m", "smollm2-24", "gemma3-270m"):
    h = json.loads((res / f"{name}-harness.json").read_text())["lm_eval"]
    for d in ("rotten-tomatoes", "election-tweets"):
        z = json.loads((res / f"{name}-zero-shot-{d}.json").read_text())
        t = "fp_" + d.replace("-", "_")
        print(f"{name:>13} {d:>16}: harness acc {h[t]['acc']:.4f}, fusionprune zero-shot {z['accuracy']:.4f} "
              f"({z['examples']} examples, majority {z['majority_share']:.3f})")
PY
