"""Peak memory per phase (fusion_prune.memory)."""

from __future__ import annotations

import sys

import pytest

from fusion_prune.memory import PhasePeaks, memory_lines


def test_each_phase_records_its_own_peak():
    peaks = PhasePeaks()
    with peaks.phase("big"):
        block = bytearray(300 * 2**20)  # 300 MiB, touched
        block[::4096] = b"x" * len(block[::4096])
        del block
    with peaks.phase("small"):
        sum(range(1000))
    big, small = peaks.record["big"], peaks.record["small"]
    assert big["cpu_rss_bytes"] >= 300 * 2**20
    if sys.platform.startswith("linux") and small["cpu_peak_is_per_phase"]:
        assert small["cpu_rss_bytes"] < big["cpu_rss_bytes"] - 200 * 2**20  # reset at the phase's start
    with peaks.phase("small"):  # a phase run twice keeps its maximum
        pass
    assert peaks.record["small"]["cpu_rss_bytes"] >= small["cpu_rss_bytes"]
    md = "\n".join(memory_lines(peaks.record))
    assert "| big |" in md and "| small |" in md


@pytest.mark.parametrize("record", [{}, None])
def test_no_record_no_table(record):
    assert memory_lines(record or {}) == []


def test_the_mmap_threshold_is_fixed_unless_the_user_set_it(monkeypatch):
    import platform

    from fusion_prune.memory import fix_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold(4 << 20) is False  # the user's setting wins
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    glibc = platform.libc_ver()[0] == "glibc"
    assert fix_mmap_threshold(4 << 20) is glibc
