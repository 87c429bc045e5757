#!/usr/bin/env bash
# The streamed choice against the in-memory one (issue 34): smollm2-135m on grimm-tales, 30 -> 28 layers
# by the oracle (measured drop-one NLL on 4 validation windows of 512 tokens), no healing; once with the whole model
# in memory (plain compress), once with the layers streamed from disk under a memory cap. Each run is its
# own process; the reports land in benchmarks/results/streaming/ and compare.py-style lines are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${RUNS:-runs}/streaming
RES=benchmarks/results/streaming
CAP=${CAP:-256MiB}
mkdir -p "$OUT" "$RES"
common=(-m smollm2-135m -d grimm-tales --target-layers 28 --strategy oracle --drop-one-samples 4 --heal none)
[ -f "$OUT/in-memory/report.json" ] || .venv/bin/fusionprune compress "${common[@]}" -o "$OUT/in-memory" --overwrite
[ -f "$OUT/streamed-$CAP/report.json" ] || \
  .venv/bin/fusionprune compress "${common[@]}" --max-memory "$CAP" -o "$OUT/streamed-$CAP" --overwrite
cp "$OUT/in-memory/report.json" "$RES/in-memory.json"
cp "$OUT/streamed-$CAP/report.json" "$RES/streamed-$CAP.json"
.venv/bin/python - "$RES/in-memory.json" "$RES/streamed-$CAP.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
print("in-memory kept", a["kept_layers"], "streamed kept", b["kept_layers"])
for e, s in zip(a["history"], b["steps"]):
    la, lb = e["drop_one"]["loss_after_drop"], s["drop_one"]["loss_after_drop"]
    print(f"step {e['step']}: removed {e['dropped_orig']} / {s['dropped_orig']}, max |drop-one NLL diff| "
          f"{max(abs(x - y) for x, y in zip(la, lb)):.2e}, validation ppl {e['validation_perplexity']:.5f} / "
          f"{s['validation_perplexity']:.5f}")
gi = lambda n: f"{n / 2**30:.2f} GiB"
for ph in b["peak_memory"]:
    print(ph, "in-memory", gi(a["info"]["peak_memory"].get(ph, {}).get("cpu_rss_bytes", 0)), "streamed",
          gi(b["peak_memory"][ph]["cpu_rss_bytes"]))
print("streamed: weights held at most", gi(b["streaming"]["weights_held_at_most_bytes"]), "layer reads",
      b["streaming"]["layer_reads"], "read", gi(b["streaming"]["bytes_read"]), "seconds", b["seconds"])
PY
