"""fusionprune's log messages: every module logs to ``logging.getLogger(__name__)``; this module
only decides where they go when the command line runs.

Library users configure logging as they like (the package adds no handler of its own beyond
Python's default); the CLI shows INFO messages of ``fusion_prune`` on stderr as
``[fusionprune] message``, and ``-v`` adds DEBUG.
"""

from __future__ import annotations

import logging
import warnings
import sys


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted (click's test
    runner swaps it), not to the stream that existed when the handler was made.

    Notes given to :func:`note_before_work` wait for the first message of the run: a command
    refused for bad input says nothing before its one-line error, as every command does.
    """

    pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        while _StderrHandler.pending:
            super().emit(logging.makeLogRecord({"msg": _StderrHandler.pending.pop(0), "levelno": logging.INFO,
                                                "levelname": "INFO", "name": "fusion_prune"}))
        super().emit(record)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def note_before_work(message: str) -> None:
    """Show ``message`` just before the command's first log message (never before an input error)."""
    _StderrHandler.pending.append(message)


def configure_logging(level: int = logging.INFO) -> None:
    """Show fusionprune's messages (and those of signals and distill) at ``level`` on stderr, once."""
    _StderrHandler.pending.clear()  # a second command in one process (tests) starts with nothing pending
    for name in ("fusion_prune", "signals", "distill"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("[fusionprune] %(message)s"))
            logger.addHandler(handler)
        logger.propagate = False
    # bitsandbytes warns on import that an optional CPU kernel package is missing: on every command
    # (peft imports it), about a path only --heal qlora on the CPU takes, which falls back and works.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers' deprecation notice for an attribute peft reads while healing: nothing to act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
