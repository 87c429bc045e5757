#!/usr/bin/env bash
# Profile gpu-2: the cpu-2 comparison (the oracle, the classifier default, against the leading
# strategies) with strong teachers and full data, on one CUDA GPU, within a fixed time.
#
#   benchmarks/gpu_2.sh OUT            # LIMIT seconds (default 450) on one GPU, then whatever landed
#
# Needs minilm-l6 and the six datasets fetched (FUSIONPRUNE_HOME; see benchmarks/carry_assets.py for
# a machine without a registry) and the repository root as the working directory. One teacher job
# a dataset trains the six teachers side by side while WORKERS compare.py workers (default 12, one
# CPU thread each) claim cells in the profile's order: seed 0 of every strategy, dataset by dataset,
# then seeds 1 and 2. At LIMIT every job is stopped; a cell in progress is lost, finished cells are
# rows of results.csv. OUT receives results.csv, results.md, reports.tar (one report a cell),
# teachers.json (each teacher's accuracy) and run.log (versions, each job's output, exit statuses).
set -u
OUT=${1:?usage: benchmarks/gpu_2.sh OUT}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-450}
WORKERS=${WORKERS:-12}
PROFILE=${PROFILE:-gpu-2}
WORK=${WORK:-$(mktemp -d)}
DATASETS=${DATASETS:-bbc-news,election-tweets,rotten-tomatoes,reuters-r8,reuters-r52,20newsgroups}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 TQDM_DISABLE=1
mkdir -p "$OUT" "$WORK"
LOG=$OUT/run.log
RES=$WORK/$PROFILE

. "$(dirname "$0")/gpu_run.sh"  # run TAG CMD..., versions MODULE...
versions transformers accelerate

for d in ${DATASETS//,/ }; do
    run "teacher-$d" $PY benchmarks/compare.py --profile "$PROFILE" --datasets "$d" --out "$RES" --teachers-only &
done
sleep 5  # the teacher jobs usually take their locks first; whoever does trains it, the rest wait
for w in $(seq 1 "$WORKERS"); do
    run "w$w" $PY benchmarks/compare.py --profile "$PROFILE" --datasets "$DATASETS" --out "$RES" --threads 1 &
done
wait

$PY benchmarks/compare.py --profile "$PROFILE" --datasets "$DATASETS" --out "$RES" --summary-only >> "$LOG" 2>&1
cp "$RES/results.csv" "$RES/results.md" "$OUT/" 2>>"$LOG"
tar -cf "$OUT/reports.tar" -C "$RES" reports 2>>"$LOG"
$PY - "$RES/work/teachers" "$OUT/teachers.json" <<'EOF' >> "$LOG" 2>&1
import json, pathlib, sys
found = {}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/fusionprune_run.json")):
    try:
        found[f.parent.name] = json.loads(f.read_text())
    except ValueError:
        pass
pathlib.Path(sys.argv[2]).write_text(json.dumps(found, indent=1, default=str))
EOF
echo "done $(date +%T)" >> "$LOG"
