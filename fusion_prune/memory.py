"""Peak memory per phase of a run: resident memory on the CPU, allocated memory on CUDA.

On Linux the process's resident high-water mark (``VmHWM``) is reset at the start of each phase
(``/proc/self/clear_refs``), so each phase's peak is its own; elsewhere the peak is the process's
since it started (``ru_maxrss``), which only grows, and the record says so. On CUDA the allocator's
peak is reset per phase (``torch.cuda.reset_peak_memory_stats``).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def available_bytes(device=None) -> int:
    """Memory free for new tensors on ``device``: CUDA's free memory, else the host's
    ``MemAvailable`` (Linux), else its free physical pages."""
    import os

    import torch

    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _rss_peak_bytes() -> int:
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _reset_rss_peak() -> bool:
    """Reset the resident high-water mark; False where the OS does not allow it."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def _libc():
    """glibc, or None where there is none (macOS, musl)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def release_free_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc ``malloc_trim``), so that
    a phase's peak is its own and not what an earlier phase left in the allocator's free lists."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None:  # elsewhere: nothing to trim
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fix_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation of at least ``nbytes`` with its own ``mmap`` (glibc ``mallopt``), so that a
    freed tensor goes back to the OS at once. glibc's default raises the threshold to the largest
    block freed so far (up to 32 MiB), after which large tensors come from the heap and freed ones
    stay resident as slack: LoRA healing peaked at 3.1 GiB that way against 1.7 GiB with a fixed
    4 MiB threshold (docs/memory.md). Process-wide and permanent; a ``MALLOC_MMAP_THRESHOLD_`` set by
    the user wins. Returns whether it was set (False off glibc)."""
    import os

    libc = _libc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


def _cuda():
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    return torch.cuda if torch.cuda.is_available() else None


class PhasePeaks:
    """``with peaks.phase("signals"): ...`` records that phase's peak; :attr:`record` is JSON-ready:
    ``{phase: {"cpu_rss_bytes", "cuda_allocated_bytes"}}`` (the maximum over every time the phase ran)."""

    def __init__(self, record: dict | None = None) -> None:
        self.record: dict = record if record is not None else {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        release_free_memory()
        per_phase = _reset_rss_peak()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            entry = self.record.setdefault(name, {"cpu_rss_bytes": 0, "cuda_allocated_bytes": None,
                                                  "cpu_peak_is_per_phase": per_phase})
            entry["cpu_rss_bytes"] = max(entry["cpu_rss_bytes"], _rss_peak_bytes())
            if cuda is not None:
                entry["cuda_allocated_bytes"] = max(entry["cuda_allocated_bytes"] or 0, int(cuda.max_memory_allocated()))


def memory_lines(record: dict) -> list[str]:
    """A markdown table of a run's peak memory per phase."""
    from fusion_prune.utils import human_bytes

    if not record:
        return []
    lines = ["| phase | peak resident (CPU) | peak allocated (CUDA) |", "|---|---|---|"]
    for name, e in record.items():
        cuda = e.get("cuda_allocated_bytes")
        lines.append(f"| {name} | {human_bytes(e['cpu_rss_bytes'])} | {'' if cuda is None else human_bytes(cuda)} |")
    per_phase = all(e.get("cpu_peak_is_per_phase", True) for e in record.values())
    return [*lines, "", "Each phase's own peak." if per_phase else
            "CPU peaks are the process's since it started (this OS cannot reset them per phase).", ""]
