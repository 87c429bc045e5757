"""Atomic outputs: nothing half-written, and the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat

import pytest

from fusion_prune.errors import BadInputError
from fusion_prune.utils import atomic_dir, write_json_atomic


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_files_and_folders_get_default_modes(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~_umask()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~_umask()


def test_atomic_dir_leaves_nothing_on_failure_and_refuses_existing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(BadInputError, match="already exists"):
        with atomic_dir(tmp_path / "out"):
            pass
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".fusionprune", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
