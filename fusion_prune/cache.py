"""The cache root: one folder for fetched assets and output locks.

``$FUSIONPRUNE_HOME`` or ``~/.cache/fusionprune``. A module of its own so that assets, models
and the output locks in :mod:`fusion_prune.utils` all read it without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The cache folder: ``$FUSIONPRUNE_HOME`` or ``~/.cache/fusionprune``."""
    return Path(os.environ.get("FUSIONPRUNE_HOME", Path.home() / ".cache" / "fusionprune")).expanduser()
