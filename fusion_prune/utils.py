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


#: Left in every folder fusionprune publishes: ``--overwrite`` replaces only folders that hold it
#: (or are empty). Folders from before the marker are recognised by their record files.
OUTPUT_MARKER = ".fusionprune"
_LEGACY_RECORDS = ("fusionprune_run.json", "fusionprune_prune.json", "fusionprune_distill.json", "report.json",
                   "asset.json")


def _bad(msg: str) -> Exception:
    from fusion_prune.errors import BadInputError

    return BadInputError(msg)


def check_output(path: str | os.PathLike, overwrite: bool, kind: str = "folder") -> Path:
    """Refuse an output that exists (unless ``overwrite``) or that ``--overwrite`` must not replace.

    ``kind`` is "folder" or "file". ``--overwrite`` replaces a file, an empty folder, or a folder
    fusionprune wrote (it holds :data:`OUTPUT_MARKER`); anything else is left alone.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    if not overwrite:
        raise _bad(f"The output {kind} {str(path)!r} already exists; expected a new path (or pass --overwrite).")
    if kind == "file" and path.is_dir():
        raise _bad(f"The output file {str(path)!r} is a folder; expected a file path.")
    if kind == "folder":
        if not path.is_dir():
            raise _bad(f"The output folder {str(path)!r} is a file; expected a folder path.")
        names = {p.name for p in path.iterdir()}
        if names and OUTPUT_MARKER not in names and not names & set(_LEGACY_RECORDS):
            raise _bad(f"--overwrite replaces only an empty folder or one fusionprune wrote; {str(path)!r} holds "
                       f"other files ({sorted(names)[:3]}...); expected a fusionprune output (delete it yourself).")
    return path


# Locks this process holds: {lock file: (open file, depth)}. flock is per open file, so a second
# flock of the same file from this process would fail; nesting is counted instead.
_HELD: dict[str, list] = {}


def _lock_file(path: Path) -> Path:
    """``<cache>/locks/<hash of the absolute path>-<name>.lock``: outside the user's folders."""
    import hashlib

    from fusion_prune.cache import home

    key = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return home() / "locks" / f"{key}-{path.name[:60]}.lock"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, what: str = "output") -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on a lock file for ``path`` (in the cache's ``locks/``) for the block.

    A second process asking for the same path gets a BadInputError naming the holder (its pid and
    command); the OS drops the lock when the holder dies, so a crash leaves no stale lock.
    Re-entrant within one process.
    """
    import fcntl
    import sys

    lock = _lock_file(Path(os.path.abspath(path)))
    key = str(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise _bad(f"The {what} {str(path)!r} is in use by {holder} (lock {str(lock)!r}); expected no other "
                       "fusionprune run on it: wait for that one or choose another path.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} ({' '.join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]})")
        fh.flush()
        _HELD[key] = [fh, 1]
        try:
            yield
        finally:
            del _HELD[key]
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False, lock: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder that is renamed to ``final`` only if the block succeeds.

    A crash or Ctrl-C leaves no half-written ``final``; the temporary folder is removed. The
    output is checked (:func:`check_output`) on entry and again just before the swap, so a folder
    that appeared meanwhile is never replaced without ``overwrite``. ``lock``: hold
    :func:`output_lock` on ``final`` (checkpoints inside a locked run pass False).
    """
    final = Path(final)
    check_output(final, overwrite)
    with output_lock(final) if lock else contextlib.nullcontext():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            yield tmp
            (tmp / OUTPUT_MARKER).write_text("written by fusionprune\n")
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes owner-only folders
            check_output(final, overwrite)
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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True, lock: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (same suffix); renamed onto ``path`` only if the block succeeds.

    Readers never see half a file. ``overwrite`` False: refuse an existing ``path`` on entry and
    again before the rename. ``lock``: hold :func:`output_lock` on ``path`` meanwhile (user-named
    outputs; files inside a folder being written need neither).
    """
    path = Path(path)
    check_output(path, overwrite, kind="file")
    with output_lock(path) if lock else contextlib.nullcontext():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            check_output(path, overwrite, kind="file")
            publish(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    """Write ``text`` through a temp file and a rename: readers never see half a file."""
    with atomic_file(path, overwrite) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> None:
    """Write ``obj`` as sorted, indented JSON through a temp file and a rename."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", overwrite)


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


def machine_description() -> str:
    """Where a measurement ran, for result rows: ``"NVIDIA H200 (CUDA)"`` when this process has a
    GPU, else ``"x86_64 2 cores (CPU)"``."""
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA)"
    return f"{platform.machine()} {os.cpu_count()} cores (CPU)"


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


def free_cpus(window: float = 0.1) -> float:
    """CPUs of this process's affinity not in use by other work, from /proc/stat over ``window`` s.

    Idle and niced time count as free (a niced job yields to us). Without /proc (not Linux):
    every CPU of the affinity.
    """
    import time

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def sample() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(f), f[1] + f[3] + f[4]  # total, nice + idle + iowait

    try:
        t0, free0 = sample()
        time.sleep(window)
        t1, free1 = sample()
    except (OSError, ValueError, IndexError):
        return float(cpus)
    if t1 <= t0:
        return float(cpus)
    return min(cpus, (os.cpu_count() or cpus) * (free1 - free0) / (t1 - t0))


_TORCH_DEFAULT_THREADS: dict[str, int] = {}


def configure_threads(requested: int | None = None) -> tuple[int, str]:
    """Set torch's CPU thread count and say why: ``requested`` (``--threads``), else
    ``FUSIONPRUNE_THREADS``, else ``OMP_NUM_THREADS`` (torch reads it), else the CPUs free now.

    Why not torch's default (one thread per core): with another job on the cores, a thread per
    core oversubscribes them and torch's threads wait on each other, far slower than one thread
    per free core (benchmarks/README.md, "Threads under load"). Returns (threads, reason).
    """
    import torch

    env = os.environ.get("FUSIONPRUNE_THREADS")
    if requested is None and env:
        try:
            requested = int(env)
        except ValueError:
            raise _bad(f"FUSIONPRUNE_THREADS must be a positive integer. Got {env!r}.") from None
    if requested is not None:
        if requested < 1:
            raise _bad(f"--threads / FUSIONPRUNE_THREADS must be a positive integer. Got {requested}.")
        torch.set_num_threads(requested)
        return requested, "asked for"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    # torch's own default (a thread per physical core), remembered: a process that runs several
    # commands (tests, notebooks) must not take an earlier reduction for the default.
    default = _TORCH_DEFAULT_THREADS.setdefault("n", torch.get_num_threads())
    n = max(1, min(default, round(free_cpus())))
    torch.set_num_threads(n)
    return n, "CPUs free now" if n < default else "default"
