"""The healing table of issue 36: every way to bring a pruned causal LM back, at equal CPU wall time.

    python benchmarks/heal_table.py --corpora grimm-tales --depths 24,20 --budget 600 \\
        --arms none,lora,full,partial4,linear,linear+full

One removed set per (corpus, depth): the layers ``--strategy`` removed at seed 0 in
``results/lm-cpu-choice`` (the choice alone; SLEB by default, the strongest greedy choice at
30 -> 20). Each *arm* starts from the teacher with exactly those layers dropped and gets the same
``--budget`` seconds of wall time, everything after loading counted (the replacement fit, the
teacher-cache, the training steps). An arm is ``[REPLACE+]HEAL[/MOD...]``:

- ``REPLACE``: ``linear`` (least-squares map folded into the layer before each run, ReplaceMe) or
  ``layer`` (one layer of the model's class per run, initialised from a removed layer and trained
  to reproduce the run's output, LLM-Streamline), fitted on ``--replace-samples`` train windows;
- ``HEAL``: ``none``, ``lora``, ``full``, ``partialK`` (the last K layers, the final norm and the
  head), ``qlora``: compress's healing (:func:`fusion_prune.heal.heal`), lr 2e-4, 4 windows of 512
  tokens a step (compress's defaults);
- ``MOD``: ``kd[W]`` (the weight W, a half by default, of the loss is the KL to the teacher's
  logits, the teacher beside each step: over its top ``--kd-top-k`` logits and the mass outside
  them, or the full vocabulary at 0, as rows before 2026-12-04 had it), ``mix[S]`` (the share S,
  ``--mix-share`` by default, a quarter, of the windows are general text, ``--mix-corpus``, or
  windows the teacher samples with ``--mix-corpus teacher``: the zero-shot guard; the replacement is fitted on the same mixed windows), ``guard[W]`` (the weight
  W, 1 by default, times the KL from the teacher's to the student's answers on ``--guard-samples``
  train prompts of each ``--guard`` dataset joins the loss: compress's ``--heal-guard-weight``),
  ``lrX`` (learning rate X instead of compress's), ``control`` (the *teacher* is healed instead,
  nothing removed: the healed-teacher control), ``stepsN`` (exactly N healing steps instead of the
  wall budget: the table at a GPU's budget, where wall time is shared and says little), ``stop[K]``
  (the validation check of compress's healing every K steps, ``HealConfig.eval_every`` by default:
  stop when the corpus's validation loss has not improved for ``HealConfig.patience`` checks and keep
  the best weights; rows without it never check).

Equal wall time: an arm's healing gets the rest of its budget as ``--heal-seconds`` (the training
loop re-plans its steps and learning-rate schedule at its measured pace and stops when the next
step would not fit; rows before 2026-12-04 timed three steps at lr 0 first and fixed the count,
``probe_seconds_per_step``, which counted set-up as step time and used 398-672 of 600 s).
Each arm runs in its own process, so its peak resident memory is its own; ``--workers K`` runs K
arms at a time (on a GPU, where a 135M model leaves the card mostly idle; on a CPU their times
would be shared and the wall budget meaningless).

One row per (corpus, depth, arm, seed) lands in ``results/lm-heal-table/results.csv`` (finished
rows are skipped: a stopped run resumes) with the test perplexity on at most 8,192 tokens of the
corpus's test split (compress's protocol), its ratio to the teacher's, zero-shot accuracy on two
labelled tasks (200 examples each, with the standard error), peak resident memory, parameters,
steps and seconds; ``results.md`` beside it. ``--unseen C1,C2`` adds the test perplexity on corpora
that no arm trains on (and its ratio to the teacher's): general ability rather than the domain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lm-heal-table"
CHOICE = HERE / "results" / "lm-cpu-choice" / "results.csv"
KEY = ["corpus", "depth", "arm", "seed"]
#: the record's zero-shot protocol: each task's own prompt and verbalisers (fusion_prune.lm.zero_shot_defaults,
#: the prompts of lm_compress.py), 200 examples each, 256 tokens at most
ZERO_SHOT = ("rotten-tomatoes", "bbc-news")
MIX_SHARE = 0.25
KD_WEIGHT = 0.5
GUARD_WEIGHT = 1.0


def parse_arm(arm: str) -> dict:
    """``"linear+partial4/kd1/mix0.5/lr5e-5"`` -> {replace: linear, method: partial, top_layers: 4,
    mods: {kd, mix}, kd_weight: 1.0, mix_share: 0.5, lr: 5e-5}; a bare ``kd``/``mix`` takes
    KD_WEIGHT/``--mix-share``, no ``lr`` compress's default."""
    head, *mods = arm.split("/")
    parts = head.split("+")
    repl, method = (parts[0], parts[1]) if len(parts) == 2 else \
        (parts[0], "none") if parts[0] in ("linear", "linear-cosine", "layer") else ("none", parts[0])
    top = None
    if method.startswith("partial"):
        top, method = int(method[len("partial"):] or 4), "partial"
    grammar = "[linear+|layer+]none|lora|full|partialK|qlora[/kd[W]][/mix[S]][/guard[W]][/lrX][/stepsN][/stop[K]][/control]"
    if repl not in ("none", "linear", "linear-cosine", "layer") or method not in ("none", "lora", "qlora", "full", "partial"):
        raise SystemExit(f"--arms: cannot read {arm!r}; expected {grammar}")
    spec = {"replace": repl, "method": method, "top_layers": top, "mods": set(), "kd_weight": None,
            "mix_share": None, "lr": None, "guard_weight": None, "steps": None, "stop": None}
    for mod in mods:
        m = re.fullmatch(r"(kd|mix|lr|guard|steps|stop)([0-9.eE+-]*)|control", mod)
        name, value = (m.group(1) or "control", m.group(2) or "") if m else (mod, "")
        try:
            number = float(value) if value else None
        except ValueError:
            m = None
        counted = name in ("steps", "stop") and number is not None and (number != int(number) or number < 1)
        if m is None or (name in ("lr", "steps") and not number) or counted:
            raise SystemExit(f"--arms: cannot read the modifier {mod!r} in {arm!r}; expected {grammar}")
        spec["mods"].add(name)
        if name != "control":
            spec[{"kd": "kd_weight", "mix": "mix_share", "lr": "lr", "guard": "guard_weight", "steps": "steps",
                  "stop": "stop"}[name]] = number
    return spec


def removed_set(corpus: str, depth: int, strategy: str, teacher_layers: int, choice: Path = CHOICE) -> list[int]:
    """The layers ``strategy`` removed from a ``teacher_layers``-deep teacher at seed 0 (``choice``'s row)."""
    import pandas as pd

    d = pd.read_csv(choice)
    row = d[(d.dataset == corpus) & (d.target_layers == depth) & (d.strategy == strategy) & (d.seed == 0)]
    if row.empty:
        raise SystemExit(f"no seed-0 choice of {strategy!r} at depth {depth} on {corpus!r} in {choice}")
    keep = {int(i) for i in str(row.iloc[0].kept_layers).split()}
    return [i for i in range(teacher_layers) if i not in keep]


def zero_shot_all(model, tok, samples: int, seed: int = 0) -> dict:
    from fusion_prune.data import load_dataset, subsample
    from fusion_prune.lm import parse_verbalisers, zero_shot, zero_shot_defaults

    out = {}
    for name in ZERO_SHOT:
        ds = load_dataset(name)
        df = subsample(ds.test, samples, seed)
        prompt, words = zero_shot_defaults(name)
        res = zero_shot(model, tok, df, ds.labels, prompt, parse_verbalisers(words, ds.labels), max_length=256,
                        batch_size=8)
        acc = res["accuracy"]
        out[name] = {"accuracy": acc, "se": math.sqrt(acc * (1 - acc) / len(df)), "n": len(df)}
    return out


def cached(path: Path, compute):
    """The JSON at ``path`` (a tensor for a ``.pt`` path), computed and written (atomically: a stopped
    arm leaves no half file) when missing; concurrent workers may each compute it, and each writes
    its own temporary file."""
    import torch

    tensor = path.suffix == ".pt"
    if path.is_file():
        return torch.load(path) if tensor else json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    value = compute()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    if tensor:
        torch.save(value, tmp)
    else:
        tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
    return value


def run_arm(args) -> dict:
    """One arm in this process: the row of the table."""
    sys.path.insert(0, str(HERE))
    import torch
    from signals_cost import PeakRSS

    from fusion_prune.cache import home
    from fusion_prune.corpus import load_corpus, mix_count, mix_windows, token_windows
    from fusion_prune.heal import HealConfig, heal
    from fusion_prune.lm import TEACHER_TEXT, general_windows, perplexity
    from fusion_prune.models import load_causal_lm
    from fusion_prune.surgery import count_parameters, drop_layers, num_layers

    torch.manual_seed(args.seed)
    spec = parse_arm(args.arm)
    out = Path(args.out)
    teacher, tok = load_causal_lm(args.model)
    data = load_corpus(args.corpus)
    train = token_windows(tok, data.train, args.max_length, None, what="train split")
    test = token_windows(tok, data.test, args.max_length, args.max_eval_tokens, what="test split")
    zs_n = args.zero_shot_samples
    base = cached(out / f"teacher-{args.model}-{args.corpus}.json", lambda: {
        "perplexity": perplexity(teacher, test)["perplexity"], "zero_shot": zero_shot_all(teacher, tok, zs_n),
        "parameters": count_parameters(teacher)})
    unseen = {}  # a corpus neither the teacher's nor any arm's training saw: general ability, not the domain
    for other in (c for c in args.unseen.split(",") if c):
        windows = token_windows(tok, load_corpus(other).test, args.max_length, args.max_eval_tokens,
                                what=f"test split of {other}")
        unseen[other] = (windows, cached(out / f"teacher-{args.model}-unseen-{other}.json", lambda: {
            "perplexity": perplexity(teacher, windows)["perplexity"]})["perplexity"])
    gone = [int(i) for i in args.removed.split(",")] if args.removed else \
        removed_set(args.corpus, args.depth, args.strategy, num_layers(teacher))
    control = "control" in spec["mods"]
    tag = "removed-" + "-".join(map(str, gone))  # the set itself: a strategy's choice file may change
    student = teacher if control else drop_layers(teacher, gone)
    if not control:
        cached(out / f"pruned-{args.model}-{args.corpus}-{args.depth}-{tag}.json", lambda: {
            "perplexity": perplexity(student, test)["perplexity"], "zero_shot": zero_shot_all(student, tok, zs_n)})
    from fusion_prune.utils import machine_description

    row = {"corpus": args.corpus, "depth": args.depth, "arm": args.arm, "seed": args.seed, "removed": " ".join(map(str, gone)),
           "budget_seconds": args.budget, "machine": machine_description()}
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        windows = train  # what the arm learns from: the replacement's fit and the healing
        if "mix" in spec["mods"]:
            share = args.mix_share if spec["mix_share"] is None else spec["mix_share"]
            n = mix_count(len(train), share)
            make = lambda: general_windows(args.mix_corpus, teacher, tok, n, args.max_length, seed=args.seed)  # noqa: E731
            if args.mix_corpus == TEACHER_TEXT:  # compress --heal-mix teacher; sampled once, then cached
                general = cached(home() / "heal-table" / f"teacher-text-{args.model}-{n}x{args.max_length}"
                                 f"-seed{args.seed}.pt", make)
                t0 = time.perf_counter()  # sampling once for every arm and seed is not part of an arm's budget
            else:
                general = make()
            windows = mix_windows(train, general, share, seed=args.seed)
            row["mix_share"], row["mix_corpus"] = share, args.mix_corpus
        if spec["replace"] != "none":
            from fusion_prune.replace import replace_layers

            g = torch.Generator().manual_seed(args.seed)
            fit = windows[torch.randperm(len(windows), generator=g)[: args.replace_samples].sort().values]
            student, record = replace_layers(teacher, student, fit, batch_size=4, method=spec["replace"])
            row["replace_seconds"] = round(time.perf_counter() - t0, 1)
            # which removed layer each trained layer started from: a layer+ arm's same-depth control
            # removes the others (--removed)
            row["put_back"] = " ".join(str(r["initialised_from"]) for r in record["runs"]
                                       if r.get("initialised_from") is not None)
            t_eval = time.perf_counter()
            row["replaced_perplexity"] = perplexity(student, test)["perplexity"]
            t0 += time.perf_counter() - t_eval  # the evaluation is not part of the budget
        kd = "kd" in spec["mods"]
        guard = ()
        if "guard" in spec["mods"]:  # the teacher's answers on the guard datasets' train prompts
            from fusion_prune.tasks.causal_lm import heal_guard

            guard = heal_guard(teacher, tok, args.guard, args.guard_samples, args.seed)
            row.update(guard=args.guard, guard_prompts=args.guard_samples)
        if not kd and not control:
            del teacher  # not needed again: free it before training
        steps = 0
        if spec["method"] != "none":
            # the rest of the budget, as compress's --heal-seconds: the loop re-plans its steps (and the
            # learning-rate schedule) at its measured pace and stops when the next step would not fit
            left = max(args.budget - (time.perf_counter() - t0), 1.0)
            weight = (KD_WEIGHT if spec["kd_weight"] is None else spec["kd_weight"]) if kd else 0.0
            fixed = int(spec["steps"]) if spec["steps"] else None
            stop = "stop" in spec["mods"]  # the corpus's validation windows, as compress checks them
            every = int(spec["stop"] or HealConfig.eval_every) if stop else 0
            cfg = HealConfig(method=spec["method"], steps=fixed or 10_000, max_seconds=0.0 if fixed else left,
                             top_layers=spec["top_layers"] or 4,
                             kd_weight=weight, kd_top_k=args.kd_top_k if kd else 0, seed=args.seed, progress=False,
                             guard_weight=(spec["guard_weight"] or GUARD_WEIGHT) if guard else 0.0, eval_every=every,
                             **({"lr": spec["lr"]} if spec["lr"] else {}))
            row.update(lr=cfg.lr, **({"kd_weight": weight, "kd_top_k": cfg.kd_top_k} if kd else {}))
            val = token_windows(tok, data.validation, args.max_length, args.max_eval_tokens,
                                what="validation split") if stop else None
            student, hstats = heal(student, windows, cfg, teacher=teacher if kd else None, guard=guard, validation=val)
            if stop:
                es = hstats.get("early_stopping", {})
                row.update(eval_every=every, stopped_by=hstats["stopped_by"], best_step=es.get("best_step"),
                           validation_curve=" ".join(f"{s}:{v:.4f}" for s, v in es.get("curve", [])))
            if guard:
                row.update(guard_weight=cfg.guard_weight, guard_kl_first=hstats["guard"]["kl_first"],
                           guard_kl_last=hstats["guard"]["kl_last"])
            steps = hstats["steps"]
            row.update(timing="fixed steps" if fixed else "in-loop limit", final_train_loss=hstats.get("final_loss"),
                       **({"gpu_peak_gib": round(hstats["gpu_peak_bytes"] / 2**30, 3)} if "gpu_peak_bytes" in hstats else {}))
        row["seconds"] = round(time.perf_counter() - t0, 1)
    row["steps"] = steps
    row["peak_rss_gib"] = round(rss.peak / 2**30, 3)
    ppl = perplexity(student, test)["perplexity"]
    zs = zero_shot_all(student, tok, zs_n)
    pruned = {} if control else json.loads((out / f"pruned-{args.model}-{args.corpus}-{args.depth}-{tag}.json").read_text())
    for other, (windows, ref) in unseen.items():
        row[f"unseen_{other}"] = perplexity(student, windows)["perplexity"]
        row[f"unseen_{other}_over_teacher"] = row[f"unseen_{other}"] / ref
    row.update(layers=num_layers(student), parameters=count_parameters(student), teacher_perplexity=base["perplexity"],
               pruned_perplexity=pruned.get("perplexity"), perplexity=ppl, over_teacher=ppl / base["perplexity"])
    for name, r in zs.items():
        row[f"zs_{name}"] = r["accuracy"]
        row[f"zs_{name}_se"] = r["se"]
        row[f"zs_{name}_teacher"] = base["zero_shot"][name]["accuracy"]
        if pruned:
            row[f"zs_{name}_pruned"] = pruned["zero_shot"][name]["accuracy"]
    return row


def upsert(row: dict, csv: Path) -> None:
    import pandas as pd

    from fusion_prune.report import write_table

    old = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=list(row))
    if len(old):
        same = (old[KEY].astype(str) == pd.Series({k: str(row[k]) for k in KEY})).all(axis=1)
        old = old[~same]
    table = pd.concat([old, pd.DataFrame([row])], ignore_index=True).sort_values(KEY)
    write_table(table, csv)
    cols = ["corpus", "depth", "arm", "seed", "steps", "seconds", "pruned_perplexity", "perplexity", "over_teacher",
            "zs_rotten-tomatoes", "zs_bbc-news", *[c for c in table if c.startswith("unseen_")], "peak_rss_gib",
            "layers", "parameters"]
    from fusion_prune.utils import write_text_atomic

    write_text_atomic(csv.with_suffix(".md"), table[[c for c in cols if c in table]].to_markdown(index=False, floatfmt=".4g") + "\n")


def done(csv: Path) -> set[tuple]:
    import pandas as pd

    if not csv.is_file():
        return set()
    d = pd.read_csv(csv)
    return {tuple(str(v) for v in r) for r in d[KEY].itertuples(index=False)}


def main() -> None:
    from fusion_prune.heal import HealConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpora", default="grimm-tales")
    ap.add_argument("--depths", default="24,20")
    ap.add_argument("--arms", default="none,lora,full,partial4,linear,linear+full")
    ap.add_argument("--budget", type=float, default=600.0, help="wall seconds per arm after loading")
    ap.add_argument("--strategy", default="sleb")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-eval-tokens", type=int, default=8192)
    ap.add_argument("--replace-samples", type=int, default=16)
    ap.add_argument("--mix-corpus", default="book-excerpts", help="a /mix arm's general text: a corpus, or "
                    "'teacher' (windows the teacher samples, as compress --heal-mix teacher; cached under "
                    "$FUSIONPRUNE_HOME/heal-table, and the sampling is outside the arm's budget)")
    ap.add_argument("--mix-share", type=float, default=MIX_SHARE, help="share of the windows from --mix-corpus")
    ap.add_argument("--guard", default="rotten-tomatoes", help="a /guard arm's labelled datasets: the teacher's "
                    "answers on their train prompts join the healing loss (compress --heal-guard-weight)")
    ap.add_argument("--guard-samples", type=int, default=HealConfig.guard_samples,
                    help="train prompts of each --guard dataset (compress's --heal-guard-samples)")
    ap.add_argument("--kd-top-k", type=int, default=64, help="a /kd arm's KL over the teacher's top-k logits per "
                    "token (and the mass outside them), taken beside each step; 0: the full vocabulary")
    ap.add_argument("--unseen", default="", help="comma-separated corpora no arm trains on: test perplexity on "
                    "each (at most --max-eval-tokens), against the teacher's")
    ap.add_argument("--removed", default="", help="comma-separated layers to remove instead of the strategy's "
                    "choice; give the depth they leave (--depths 26) so its rows are their own cell, e.g. the "
                    "same-depth control of a layer+ arm: SLEB's six but the row's put_back layers")
    ap.add_argument("--zero-shot-samples", type=int, default=200)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--workers", type=int, default=1, help="arms run at a time, each in its own process (a GPU's "
                    "table; on a CPU keep 1, or the arms share the cores their wall budget is measured on)")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "results.csv"
    if args.arm:  # a worker: one arm, its row on stdout's last line
        print(json.dumps(run_arm(args)))
        return
    for a in args.arms.split(","):
        parse_arm(a)  # refuse a bad arm before hours of work
    # A stopped table stops its arms too: SIGTERM becomes SystemExit, and the finally below kills
    # them. Without it a worker ran on beside the next arms, taking half the CPU they are timed on.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    finished = done(csv)
    cells = [(corpus, int(depth), arm, int(seed)) for corpus in args.corpora.split(",")
             for depth in args.depths.split(",") for seed in args.seeds.split(",") for arm in args.arms.split(",")
             if (corpus, depth, arm, seed) not in finished]
    running: list[tuple[tuple, subprocess.Popen, tuple]] = []
    try:
        _work(cells, running, args, out, csv)
    finally:  # a stopped table (SIGTERM, ^C) stops its arms: they would go on beside whatever runs next
        for _, proc, _ in running:
            proc.kill()


def _work(cells: list, running: list, args, out: Path, csv: Path) -> None:
    """Run ``cells`` (corpus, depth, arm, seed) at most ``args.workers`` at a time; each row into ``csv``."""
    import tempfile

    while cells or running:
        while cells and len(running) < args.workers:
            corpus, depth, arm, seed = cell = cells.pop(0)
            cmd = [sys.executable, __file__, "--arm", arm, "--corpus", corpus, "--depth", str(depth),
                   "--seed", str(seed), "--model", args.model, "--budget", str(args.budget),
                   "--strategy", args.strategy, "--max-length", str(args.max_length),
                   "--max-eval-tokens", str(args.max_eval_tokens), "--replace-samples", str(args.replace_samples),
                   "--mix-corpus", args.mix_corpus, "--mix-share", str(args.mix_share),
                   "--unseen", args.unseen, "--kd-top-k", str(args.kd_top_k), "--guard", args.guard,
                   "--guard-samples", str(args.guard_samples),
                   "--zero-shot-samples", str(args.zero_shot_samples),
                   "--removed", args.removed,
                   "--out", str(out)]
            print(f"[{time.strftime('%H:%M:%S')}] {corpus} {depth} {arm} seed {seed}", flush=True)
            # output to files, not pipes: a worker's warnings could fill a pipe nobody reads while it runs
            logs = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            proc = subprocess.Popen(cmd, stdout=logs[0], stderr=logs[1], text=True,
                                    env={**os.environ, "TQDM_DISABLE": "1"})
            running.append((cell, proc, logs))
        cell, proc, logs = _first_done(running)
        stdout, stderr = (_read(f) for f in logs)
        if proc.returncode:
            print(f"{' '.join(map(str, cell))} failed:\n{stderr[-3000:]}", flush=True)
            continue
        row = json.loads(stdout.strip().splitlines()[-1])
        upsert(row, csv)  # one row at a time, in this process: a stopped table keeps every finished arm
        print(f"    {' '.join(map(str, cell))}: ppl {row['perplexity']:.2f} ({row['over_teacher']:.2f}x), "
              f"{row['steps']} steps, {row['seconds']:.0f} s", flush=True)


def _first_done(running: list) -> tuple:
    """Wait for one of ``running``'s processes to end; remove it from the list and return it."""
    while True:
        for i, (_, proc, _) in enumerate(running):
            if proc.poll() is not None:
                return running.pop(i)
        time.sleep(0.5)


def _read(f) -> str:
    """The whole text of a temporary file written by a child process; the file is closed (deleted)."""
    with f:
        f.seek(0)
        return f.read()


if __name__ == "__main__":
    main()
