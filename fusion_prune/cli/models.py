"""``fusionprune inspect`` and ``fusionprune prune``: what a model is, and removing given layers."""

from __future__ import annotations

from pathlib import Path

import click

from fusion_prune.cli.common import (RegistryChoice, echo_json, hold_output, model_option, output_option,
                                     overwrite_option)


@click.command()
@click.argument("model", required=False)
@click.option("-m", "--model", "model_option", help="Asset name, local folder or hub id (or give it as MODEL, "
                                                  "the argument).")
@click.option("--families", is_flag=True, help="List the model families whose layers can be removed, and the rule.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(model: str | None, model_option: str | None, families: bool, as_json: bool) -> None:
    """Family, depth, width, parameters and kept-layer history of MODEL (--families: what is supported)."""
    from fusion_prune.api import inspect_model
    from fusion_prune.errors import BadInputError
    from fusion_prune.surgery import families as supported

    if families:
        f = supported()
        if as_json:
            return echo_json(f)
        click.echo("table: " + ", ".join(f"{k} ({', '.join(v)})" for k, v in f["table"].items()))
        click.echo(f"and {f['generic']}")
        click.echo("refused: " + "; ".join(f"{k}: {v}" for k, v in f["refused"].items()))
        return
    if model is not None and model_option is not None and model != model_option:
        raise BadInputError(f"The '--model' option and the 'MODEL' argument name different models; expected one. "
                            f"Got {model_option!r} and {model!r}.")
    model = model or model_option
    if model is None:
        raise BadInputError("The '--model' option is needed; expected a model (or --families). Got none.")
    d = inspect_model(model)
    if as_json:
        return echo_json(d)
    click.echo(f"{model}: {d['family']} {d['kind']} ({d['class']})")
    for label, value in (("task", d["task"]), ("layers", d["layers"]), ("hidden size", d["hidden_size"]),
                         ("parameters", f"{d['parameters']:,}"),
                         ("kept layers", f"original layers {d['kept_layers']}" if d["pruned"] else "never pruned")):
        click.echo(f"  {label:<11} {value}")


@click.command()
@model_option("Asset name, local folder or hub id.")
@click.option("--drop", required=True, help="Comma-separated current layer indices, e.g. 3,7.")
@output_option()
@overwrite_option()
def prune(model: str, drop: str, output: Path, overwrite: bool) -> None:
    """Remove layers and save a folder that plain transformers loads (same class as the input)."""
    from fusion_prune.api import prune_to_folder
    from fusion_prune.surgery import parse_layers

    layers = parse_layers(drop, param="--drop")
    hold_output(output, overwrite)
    rec = prune_to_folder(model, layers, output, overwrite=overwrite)
    before, after = rec["before"], rec["after"]
    click.echo(f"saved {output}: {before['layers']} -> {after['layers']} layers, "
               f"{before['parameters']:,} -> {after['parameters']:,} parameters, kept original {after['kept_layers']}")


@click.command("export")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, type=RegistryChoice("fusion_prune.export:TARGETS"),
              help="mergekit: a passthrough YAML that rebuilds the kept layers from the original model; llama.cpp: "
                   "the original layers to remove, as llama-quantize --prune-layers takes them; onnx: the model as "
                   "an ONNX graph in the --output folder (needs fusionprune[onnx]).")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Recipes: write here (default: print). onnx: the folder to write (needed).")
@overwrite_option("output")
def export_cmd(folder: Path, to: str, output: Path | None, overwrite: bool) -> None:
    """Repeat the cut of FOLDER (written by compress, prune or distill) in another tool, or export it to ONNX."""
    from fusion_prune.export import export
    from fusion_prune.utils import check_output, write_text_atomic

    if to == "onnx":
        return click.echo(export(folder, to, output, overwrite), nl=False)
    text = export(folder, to)
    if output is None:
        return click.echo(text, nl=False)
    check_output(output, overwrite, kind="file")
    write_text_atomic(output, text)
    click.echo(f"saved {output}")
