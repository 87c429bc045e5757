"""Checkpoints of a loop run, and the one resume check.

A checkpoint is a folder (model, tokenizer, tables, the run's record) written to a temporary
sibling and swapped in by one rename, so a kill at any moment leaves the previous checkpoint or
the new one, never a model one step ahead of its record. Its last file is a manifest with the
size and SHA-256 of every other file: a checkpoint that is truncated or corrupted afterwards (a
full disk, a copy cut short) is refused with one line, never loaded.

:class:`RunFolder` holds the resume check that ``compress`` and ``collect`` share: a stopped run
resumes only with the same arguments and data content, and what happens to a stopped run that
does not match is decided in one place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from fusion_prune.errors import BadInputError
from fusion_prune.utils import OUTPUT_MARKER, atomic_dir, write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINT_RECORD = "fusionprune_checkpoint.json"
MANIFEST = "fusionprune_manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    # The output marker is written by atomic_dir around the checkpoint, not part of it.
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, OUTPUT_MARKER))


def save_checkpoint(folder: Path, model, tok, record: dict, tables: dict | None = None) -> None:
    """The model, its record and ``tables`` ({file name: DataFrame}) in one folder swapped in by one rename."""
    from fusion_prune.models import save_model
    from fusion_prune.report import write_table

    with atomic_dir(folder, overwrite=True, lock=False) as tmp:  # the run already holds the output's lock
        save_model(model, tok, tmp)
        for name, table in (tables or {}).items():
            write_table(table, tmp / name)
        write_json_atomic(tmp / CHECKPOINT_RECORD, record)
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(tmp)}
        write_json_atomic(tmp / MANIFEST, manifest)


def verify_checkpoint(folder: Path) -> None:
    """Raise a one-line BadInputError unless every file of the checkpoint matches its manifest."""
    where = f"The checkpoint {str(folder)!r}"
    fix = "delete it (or pass --overwrite) to start again"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise BadInputError(f"{where} has no manifest (written by an older fusionprune, or cut short); expected "
                            f"a complete checkpoint: {fix}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInputError(f"{where} has a corrupt manifest; expected JSON: {fix}.") from None
    for name, want in manifest.items():
        path = folder / name
        if not path.is_file():
            raise BadInputError(f"{where} lacks {name!r}; expected every file of its manifest: {fix}.")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise BadInputError(f"{where} has {name!r} of {size} bytes; expected {want['bytes']} (truncated or "
                                f"corrupt): {fix}.")
        if _sha256(path) != want["sha256"]:
            raise BadInputError(f"{where} has {name!r} whose SHA-256 differs from its manifest (corrupt): {fix}.")
    extra = sorted(str(p.relative_to(folder)) for p in _files(folder) if str(p.relative_to(folder)) not in manifest)
    if extra:
        raise BadInputError(f"{where} holds files its manifest does not list: {extra[:3]}; expected a checkpoint "
                            f"written by fusionprune: {fix}.")


def load_checkpoint_record(folder: Path) -> dict | None:
    """The verified record of the checkpoint in ``folder``; None if there is no checkpoint there."""
    if not folder.exists():
        return None
    verify_checkpoint(folder)
    return json.loads((folder / CHECKPOINT_RECORD).read_text())


def same_meta(saved: Any, now: Any, defaults: Any) -> bool:
    """``saved == now``, except that a key missing from ``saved`` matches when ``now`` holds its default."""
    if not (isinstance(saved, dict) and isinstance(now, dict)):
        return saved == now
    defaults = defaults if isinstance(defaults, dict) else {}
    if set(saved) - set(now):
        return False
    return all(same_meta(saved[k], v, defaults.get(k)) if k in saved else (k in defaults and v == defaults[k])
               for k, v in now.items())


class RunFolder:
    """The work folder of a resumable run (``<output>.partial`` or ``<output>.state``): its checkpoints
    and the resume check, in one place.

    ``resume``: True (continue a matching stopped run, as ``compress --resume``), False (a stopped
    run is an error unless ``overwrite``), or "auto" (continue a matching one, refuse another:
    ``collect``). A stopped run with other arguments or data is refused with one line unless
    ``overwrite``, which starts again.
    """

    def __init__(self, path: Path, meta: dict, resume: bool | str, overwrite: bool, current: str = "current",
                 defaults: dict | None = None):
        self.path, self.resume, self.overwrite = path, resume, overwrite
        self.meta = json.loads(json.dumps(meta, default=str))  # as the record holds it
        # meta-shaped defaults of the options: an option a newer fusionprune added, absent from a
        # stopped run's record, matches when it is left at its default (so an upgrade keeps resuming).
        self.defaults = json.loads(json.dumps(defaults or {}, default=str))
        self.current = path / current

    def start(self) -> dict | None:
        """The record of the stopped run to continue, or None to start afresh (the folder is then empty)."""
        if self.path.exists() and self.resume is False:
            if not self.overwrite:
                raise BadInputError(f"A stopped run exists at {str(self.path)!r}; pass --resume to continue it "
                                    "(or --overwrite to start again).")
            shutil.rmtree(self.path)
        if not self.path.exists():
            return None
        self._recover_swap()
        if not self.current.exists():
            log.info("%s holds no finished checkpoint (stopped before the first one): starting again", self.path)
            shutil.rmtree(self.path)
            return None
        saved = load_checkpoint_record(self.current)
        if not same_meta(saved["meta"], self.meta, self.defaults):
            if not self.overwrite:
                what = ("data of other content" if saved["meta"].get("data_sha256") != self.meta.get("data_sha256")
                        else "other arguments")
                raise BadInputError(f"The stopped run at {str(self.path)!r} used {what}; expected the same "
                                    "arguments and data to resume (or --overwrite to start again).")
            log.info("the stopped run used other arguments: starting again (--overwrite)")
            shutil.rmtree(self.path)
            return None
        return saved

    def _recover_swap(self) -> None:
        """Finish a checkpoint swap that a kill interrupted, and clear what killed writes left.

        :func:`fusion_prune.utils.atomic_dir` replaces a checkpoint by moving the old one aside
        (``.current.old-PID``) and renaming the new one (``.current.tmp-*``) in its place; a kill
        between the two renames leaves no ``current``. Then the new one is used if it is complete (its
        manifest verifies), else the old one. Incomplete temporary folders are removed.
        """
        for name in dict.fromkeys(("teacher", self.current.name)):
            final = self.path / name
            tmps = sorted(self.path.glob(f".{name}.tmp-*"), key=lambda p: p.stat().st_mtime, reverse=True)
            olds = sorted(self.path.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
            if not final.exists():
                for cand in [*tmps, *olds]:
                    try:
                        verify_checkpoint(cand)
                    except BadInputError:
                        continue
                    cand.rename(final)
                    log.info("%s: finished the checkpoint swap a kill interrupted (%s)", self.path, cand.name)
                    break
            for stale in [*tmps, *olds]:
                if stale.exists():
                    shutil.rmtree(stale, ignore_errors=True)

    def save(self, name: str, model, tok, record: dict[str, Any], tables: dict | None = None) -> None:
        """Checkpoint ``name`` (``current``, ``teacher``) with ``record`` (the meta is added)."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.path / name, model, tok, {"meta": self.meta, **record}, tables)

    def done(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
