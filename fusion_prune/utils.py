"""Small helpers shared across the package: atomic output, versions, seeding, devices."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that is renamed to ``final`` only if the block succeeds.

    A crash or Ctrl-C leaves no half-written ``final``; the temporary folder is removed.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        from fusion_prune.errors import BadInputError

        raise BadInputError(
            f"The output folder {str(final)!r} already exists; expected a new path (or pass --overwrite)."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes owner-only folders
        if final.exists():
            # Move the old folder aside first so that the swap is never half-done.
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a finished temp file onto ``final`` with the mode a plain ``open`` would give it.

    (``mkstemp`` creates files readable by their owner only.)
    """
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, final)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` through a temp file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON through a temp file and a rename."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a result depends on."""
    import importlib.metadata as md

    out = {}
    for name in ("fusionprune", "torch", "transformers", "datasets", "accelerate", "scikit-learn", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    for name in ("xgboost-cpu", "xgboost"):
        with contextlib.suppress(md.PackageNotFoundError):
            out["xgboost"] = md.version(name)
            break
    return out


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"
