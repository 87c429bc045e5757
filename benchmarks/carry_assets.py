"""Carry fetched assets to an offline GPU machine in pieces of bounded size, and unpack them there.

    python benchmarks/carry_assets.py pack --out .gpu minilm-l6 rotten-tomatoes --as A
    python benchmarks/carry_assets.py pack --out .gpu mpnet-base 20newsgroups --as B --piece-mb 56
    # on the GPU machine, once every piece of an archive is there:
    FUSIONPRUNE_HOME=/tmp/fph python benchmarks/carry_assets.py unpack .gpu/B.*

A machine that reaches no registry cannot ``fusionprune assets fetch``; what reaches it may be
capped in size. ``pack`` writes the assets' folders as one tar archive, split into numbered
pieces, with model weights stored as float16 (half the bytes; a weight's relative rounding error
is at most 2**-11); ``unpack`` joins the pieces, restores float32 weights (so that training starts
from float32 master weights, as from a fetched asset) and marks ``asset.json`` with
``"carried_as": "float16"``, so that every report made from it can say so.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path

SAFETENSORS = "model.safetensors"


def _half(path: Path) -> bytes:
    from safetensors.torch import load_file, save

    tensors = load_file(str(path))
    return save({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()})


def pack(names: list[str], out: Path, tag: str, piece_mb: int) -> list[Path]:
    """Write ``out/<tag>.000, .001, ...``: the tar of the named fetched assets, float16 weights."""
    from fusion_prune.assets import asset_path

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            folder = asset_path(name)
            for f in sorted(folder.rglob("*")):
                if not f.is_file():
                    continue
                arc = f"{folder.name}/{f.relative_to(folder)}"
                data = _half(f) if f.name == SAFETENSORS else f.read_bytes()
                info = tarfile.TarInfo(arc)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    blob, size = buf.getvalue(), piece_mb * 2**20
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{tag}.[0-9][0-9][0-9]"):
        old.unlink()
    pieces = []
    for i in range(0, len(blob), size):
        p = out / f"{tag}.{i // size:03d}"
        p.write_bytes(blob[i:i + size])
        pieces.append(p)
    print(f"{tag}: {len(blob) / 2**20:.1f} MiB in {len(pieces)} pieces: {', '.join(p.name for p in pieces)}")
    return pieces


def unpack(pieces: list[Path]) -> list[Path]:
    """Join ``pieces`` (one archive, in name order) into the asset cache; float32 weights again."""
    from safetensors.torch import load_file, save_file

    from fusion_prune.assets import home

    dest = home() / "assets"
    dest.mkdir(parents=True, exist_ok=True)
    blob = b"".join(p.read_bytes() for p in sorted(pieces))
    done = []
    with tempfile.TemporaryDirectory(dir=dest) as tmp, tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tmp, filter="data")
        for folder in sorted(Path(tmp).iterdir()):
            weights = folder / SAFETENSORS
            if weights.is_file():
                tensors = load_file(str(weights))
                save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()},
                          str(weights), metadata={"format": "pt"})
                meta = json.loads((folder / "asset.json").read_text())
                meta["carried_as"] = "float16"
                (folder / "asset.json").write_text(json.dumps(meta, indent=2))
            final = dest / folder.name
            if final.exists():
                continue
            os.replace(folder, final)
            done.append(final)
    print(f"unpacked into {dest}: {', '.join(p.name for p in done) or 'nothing new'}")
    return done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("names", nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--as", dest="tag", required=True)
    p.add_argument("--piece-mb", type=int, default=56)
    u = sub.add_parser("unpack")
    u.add_argument("pieces", nargs="+", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        pack(args.names, args.out, args.tag, args.piece_mb)
    else:
        unpack(args.pieces)


if __name__ == "__main__":
    main(sys.argv[1:])
