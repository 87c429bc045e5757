"""Run compress or collect in this process and SIGKILL it at a chosen point (tests/test_faults.py).

    python tests/fault_driver.py SPEC.json

SPEC: {"kind": "compress"|"collect", "model", "data", "out", "options": {...}, "fault": "POINT:N"}.
Points (N counts from 1 over the whole run):

- ``record:N``   inside the Nth checkpoint write, after the model, before the checkpoint's record
- ``manifest:N`` inside the Nth checkpoint write, while its manifest is being hashed
- ``swap:N``     between the two renames that replace the Nth checkpoint (the old one moved aside)
- ``drop:N``     at the start of the Nth step's removal and recovery
- ``finish``     in the task's finish (distillation / healing), after every step
- ``output``     while the final output folder is written

The kill is a real SIGKILL: no ``finally`` runs, no file is closed, as when a machine is shut down.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _after(n: int):
    """A counter that is True on its nth call."""
    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == n
    return hit


def install(point: str) -> None:
    import fusion_prune.checkpoint as C
    import fusion_prune.loop as L
    import fusion_prune.report as R
    from fusion_prune.tasks import TASKS

    name, _, n = point.partition(":")
    hit = _after(int(n or 1))
    if name == "record":
        real = C.write_json_atomic

        def record(path, obj, *a, **k):
            if Path(path).name == C.CHECKPOINT_RECORD and hit():
                _die()
            return real(path, obj, *a, **k)
        C.write_json_atomic = record
    elif name == "manifest":
        real_sha = C._sha256

        def sha(path):
            if Path(path).name.endswith(".safetensors") and hit():
                _die()
            return real_sha(path)
        C._sha256 = sha
    elif name == "swap":
        real_rename = Path.rename

        def rename(self, target):
            if ".tmp-" in self.name and not Path(target).exists() and Path(target).parent.name.endswith(
                    (".partial", ".state")) and hit():
                _die()
            return real_rename(self, target)
        Path.rename = rename
    elif name == "drop":
        real_drop = L.apply_drop

        def drop(*a, **k):
            if hit():
                _die()
            return real_drop(*a, **k)
        L.apply_drop = drop
    elif name == "finish":
        for cls in TASKS.values():
            cls.finish = lambda *a, **k: _die()
    elif name == "output":
        R.write_compress_report = lambda *a, **k: _die()
    elif name:
        raise SystemExit(f"unknown fault point {point!r}")


def run(spec: dict) -> None:
    if spec["kind"] == "compress":
        from fusion_prune.loop import run_compress

        run_compress(spec["model"], spec["data"], spec["out"], resume=True, **spec["options"])
    else:
        from fusion_prune.collect import run_collect

        run_collect(spec["model"], spec["data"], spec["out"], **spec["options"])


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    install(spec.get("fault", ""))
    run(spec)
