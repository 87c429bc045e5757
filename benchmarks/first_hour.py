"""A new user's first hour, timed: the README's set-up, ``make demo`` and the tour on your own CSV,
on a fresh clone, with the README's commands exactly as written.

What it does, in a temporary folder:

1. ``git clone`` this repository's HEAD (uncommitted changes are not part of a fresh clone);
2. ``make install`` there (a new virtual environment; pip's cache and the asset cache are the
   machine's, as on any machine that installed once before);
3. ``make demo``;
4. writes ``reviews.csv``: ``--rows`` real Rotten Tomatoes review snippets, columns ``review``
   and ``stars`` (5 fresh, 1 rotten), a labelled CSV of the size the README promises for;
5. runs the README's tour block line by line (``source .venv/bin/activate`` first), each command
   timed on its own.

Each phase's seconds, the CPUs free when it started and the machine are written to
``--out/first_hour.json`` as they land (a rerun with ``--resume`` skips finished phases of the
same commit), and a table to ``--out/README.md``. The CPU must be otherwise idle: a second job
on the cores makes every time longer (``benchmarks/threads_under_load.py`` measures by how much).

    .venv/bin/python benchmarks/first_hour.py [--rows 5000] [--skip demo] [--resume] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tour_block(readme: str) -> tuple[str, list[str]]:
    """The tour section's title and its bash lines, continuations joined (as a shell reads them)."""
    m = re.search(r"## (Tour on your own CSV[^\n]*)\n.*?```bash\n(.*?)```", readme, re.S)
    if m is None:
        raise SystemExit("README.md has no '## Tour on your own CSV' section with a bash block")
    lines = [ln.strip() for ln in m.group(2).replace("\\\n", " ").splitlines() if ln.strip()]
    return m.group(1), lines


def write_reviews(path: Path, rows: int, seed: int = 0) -> dict:
    """``rows`` Rotten Tomatoes snippets (train and test pooled, then sampled) as review,stars."""
    import pandas as pd

    from fusion_prune.data import load_dataset

    ds = load_dataset("rotten-tomatoes")
    pool = pd.concat([ds.train, ds.validation, ds.test], ignore_index=True)
    if rows > len(pool):
        raise SystemExit(f"--rows: at most {len(pool)} rows are available; got {rows}")
    df = pool.sample(n=rows, random_state=seed).reset_index(drop=True)
    names = ds.labels
    stars = {names.index("fresh") if "fresh" in names else 1: 5, names.index("rotten") if "rotten" in names else 0: 1}
    out = pd.DataFrame({"review": df["text"], "stars": df["label"].map(stars)})
    out.to_csv(path, index=False)
    words = out["review"].str.split().str.len()
    return {"rows": rows, "source": "rotten-tomatoes (train, validation and test pooled)", "seed": seed,
            "words_median": float(words.median()), "words_p95": float(words.quantile(0.95)),
            "stars_share": {str(k): round(float(v), 3) for k, v in out["stars"].value_counts(normalize=True).items()}}


def timed(cmd: str, cwd: Path, log: Path) -> dict:
    """Run ``cmd`` in bash in ``cwd``; its seconds, exit status and the CPUs free as it started."""
    from fusion_prune.utils import free_cpus

    free = round(free_cpus(0.5), 2)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "OMP_NUM_THREADS", "FUSIONPRUNE_THREADS")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n$ {cmd}\n")
        fh.flush()
        rc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    return {"command": cmd, "seconds": round(time.perf_counter() - t0, 1), "exit": rc, "free_cpus_at_start": free}


def table(record: dict) -> str:
    rows = ["| phase | command | seconds | minutes | free CPUs at start | exit |", "|---|---|---|---|---|---|"]
    for name, r in record["phases"].items():
        shown = r["command"].split(" && ")[-1]  # without the README's `source .venv/bin/activate`
        shown = shown if len(shown) <= 100 else shown[:97] + "..."
        rows.append(f"| {name} | `{shown}` | {r['seconds']:.0f} | {r['seconds'] / 60:.1f} | "
                    f"{r['free_cpus_at_start']} | {r['exit']} |")
    tour = sum(r["seconds"] for n, r in record["phases"].items() if n.startswith("tour "))
    m = record["machine"]
    head = (f"# First hour, timed ({record['date'][:10]}, commit {record['commit'][:7]})\n\n"
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}.\n"
            f"Tour CSV: {record['csv']['rows']} rows ({record['csv']['source']}), median "
            f"{record['csv']['words_median']:.0f} words.\n\n"
            f"**Tour ({record['tour_title']}): {tour:.0f} s = {tour / 60:.1f} min**"
            + (f"; `make demo`: {record['phases']['make demo']['seconds'] / 60:.1f} min"
               if "make demo" in record["phases"] else "") + ".\n\n")
    return head + "\n".join(rows) + "\n"


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem, 1),
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--skip", action="append", default=[], choices=["install", "demo", "tour"],
                    help="a phase not to run (install: reuse this checkout's .venv by a link)")
    ap.add_argument("--resume", action="store_true", help="skip phases already timed for this commit")
    ap.add_argument("--workdir", type=Path, default=None, help="where the clone goes (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "first-hour")
    args = ap.parse_args()

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "first_hour.json"
    record = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    if record.get("commit") != commit:
        record = {"commit": commit, "phases": {}}
    record |= {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fp-first-hour-"))
    clone = work / "clone"
    if not (clone / ".git").is_dir():
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "--quiet", commit], cwd=clone, check=True)
    log = work / "first_hour.log"  # progress bars and pip's output: kept beside the clone, not in the record
    print(f"clone: {clone}; log: {log}", flush=True)

    def phase(name: str, cmd: str) -> None:
        if name in record["phases"] and record["phases"][name]["exit"] == 0:
            print(f"{name}: done before ({record['phases'][name]['seconds']} s)", flush=True)
            return
        r = timed(cmd, clone, log)
        record["phases"][name] = r
        path.write_text(json.dumps(record, indent=1))
        print(f"{name}: {r['seconds']} s, exit {r['exit']}", flush=True)
        if r["exit"]:
            raise SystemExit(f"{name} failed (exit {r['exit']}); see {log}")

    if "install" in args.skip:
        if not (clone / ".venv").exists():
            (clone / ".venv").symlink_to(ROOT / ".venv")
    else:
        phase("make install", "make install")
    if "demo" not in args.skip:
        phase("make demo", "make demo")
    if "tour" not in args.skip:
        record["csv"] = write_reviews(clone / "reviews.csv", args.rows)
        title, lines = tour_block((clone / "README.md").read_text())
        record["tour_title"] = title
        setup = [ln for ln in lines if not ln.startswith("fusionprune ")]
        for ln in lines:
            if ln.startswith("fusionprune "):
                name = "tour " + shlex.split(ln)[1]
                phase(name, " && ".join(setup + [ln]))
    path.write_text(json.dumps(record, indent=1))
    (args.out / "README.md").write_text(table(record))
    print(table(record))


if __name__ == "__main__":
    main()
