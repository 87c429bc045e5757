"""torch's thread count: asked for, from the environment, or the CPUs free when a command starts."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from fusion_prune.cli import main
from fusion_prune.errors import BadInputError
from fusion_prune.utils import configure_threads, free_cpus


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("FUSIONPRUNE_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_free_cpus_is_within_the_affinity():
    free = free_cpus(0.05)
    assert 0 <= free <= len(os.sched_getaffinity(0))


def test_asked_for_wins_then_the_environment(monkeypatch):
    assert configure_threads(1) == (1, "asked for") and torch.get_num_threads() == 1
    monkeypatch.setenv("FUSIONPRUNE_THREADS", "2")
    assert configure_threads() == (2, "asked for") and torch.get_num_threads() == 2


def test_omp_num_threads_is_left_to_torch(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert configure_threads() == (1, "OMP_NUM_THREADS")


def test_the_free_cpus_decide_otherwise(monkeypatch):
    import fusion_prune.utils as U

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setitem(U._TORCH_DEFAULT_THREADS, "n", 2)
    monkeypatch.setattr(U, "free_cpus", lambda window=0.1: 0.8)  # another job holds about one of two cores
    assert configure_threads() == (1, "CPUs free now") and torch.get_num_threads() == 1
    monkeypatch.setattr(U, "free_cpus", lambda window=0.1: 2.0)
    assert configure_threads() == (2, "default")  # the earlier reduction is not taken for the default


@pytest.mark.parametrize("bad", ["0", "two"])
def test_a_bad_thread_count_is_one_line(monkeypatch, bad):
    monkeypatch.setenv("FUSIONPRUNE_THREADS", bad)
    with pytest.raises(BadInputError, match=f"FUSIONPRUNE_THREADS must be a positive integer. Got .*{bad}"):
        configure_threads()
    monkeypatch.delenv("FUSIONPRUNE_THREADS")
    res = CliRunner().invoke(main, ["--threads", "0", "assets", "list"])
    assert res.exit_code == 2 and "--threads / FUSIONPRUNE_THREADS must be a positive integer. Got 0." in res.stderr


def test_the_thread_note_waits_for_the_run_so_bad_input_stays_one_line(monkeypatch, tmp_path, sentiment_csv_dir):
    import fusion_prune.utils as U

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setitem(U._TORCH_DEFAULT_THREADS, "n", 2)
    monkeypatch.setattr(U, "free_cpus", lambda window=0.1: 0.8)
    res = CliRunner().invoke(main, ["finetune", "-m", str(tmp_path / "no-such-model"), "-d", str(sentiment_csv_dir),
                                    "-o", str(tmp_path / "t")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "other work" not in res.stderr
    res = CliRunner().invoke(main, ["assets", "fetch", "no-such-asset"])
    assert "other work" not in res.stderr


def test_a_note_before_work_comes_just_before_the_first_message(capsys):
    import logging

    from fusion_prune.logs import configure_logging, note_before_work

    configure_logging()
    note_before_work("the note")
    logging.getLogger("fusion_prune.x").info("first message")
    logging.getLogger("fusion_prune.x").info("second message")
    assert capsys.readouterr().err.splitlines() == ["[fusionprune] the note", "[fusionprune] first message",
                                                    "[fusionprune] second message"]
