"""``fusionprune signals`` and ``fusionprune analyze``: what the signals say about each layer."""

from __future__ import annotations

from pathlib import Path

import click

from fusion_prune.cli.common import (dataset_options, hold_output, model_option, output_option, overwrite_option,
                                     table_output, task_option)


@click.command("signals")
@model_option("A fine-tuned classifier or a causal LM (folder, asset or hub id).")
@dataset_options
@task_option
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Table: .parquet or .csv.")
@click.option("--split", default="validation", show_default=True, type=click.Choice(["train", "validation", "test"]),
              help="Classifier: the split the calibration sample is drawn from (causal LM: train windows).")
@click.option("--samples", default=None, type=int, help="Calibration examples [256] or token windows [4].")
@click.option("--batch-size", default=None, type=int, help="[classification 16, causal LM 4]")
@click.option("--max-length", default=None, type=int, help="Tokens per example [128] or per window [512].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the calibration sample.")
@click.option("--extra", multiple=True, help="Opt-in extra signal (repeatable), e.g. activation_patching.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Heatmap PNG.")
@overwrite_option("table and plot")
def signals_cmd(model: str, dataset: str, text_column: str, label_column: str, task: str | None, output: Path,
                split: str, samples: int | None, batch_size: int | None, max_length: int | None, seed: int,
                extra: tuple[str, ...], plot: Path | None, overwrite: bool) -> None:
    """The 12 layer-importance signals of MODEL on a calibration sample of DATASET."""
    from fusion_prune.api import compute_signals
    from fusion_prune.report import plot_signals_heatmap, write_table
    from signals import DEFAULT_SIGNALS, resolve_signals

    table_output(output)
    for path in (output, plot):
        if path is not None:
            hold_output(path, overwrite, kind="file")
    resolve_signals([*DEFAULT_SIGNALS, *extra])  # unknown names fail before anything is loaded
    table = compute_signals(model, dataset, samples=samples, signals=list(extra), task=task, text_column=text_column,
                            label_column=label_column, batch_size=batch_size, max_length=max_length, seed=seed,
                            split=split, progress=True)
    write_table(table, output, overwrite)
    click.echo(f"saved {output} ({len(table)} layers x {len(table.columns) - 2} signals)")
    if plot is not None:
        plot_signals_heatmap(table, plot, title=f"{model} on {dataset} ({split})")
        click.echo(f"saved {plot}")
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


@click.command()
@model_option("A fine-tuned classifier or a causal LM.")
@dataset_options
@task_option
@output_option()
@click.option("--samples", default=None, type=int, help="Calibration examples [256] or token windows [4].")
@click.option("--split", default="validation", show_default=True, type=click.Choice(["train", "validation", "test"]),
              help="Classifier: the split the calibration sample is drawn from (as for `signals`).")
@click.option("--extras", default="default", show_default=True,
              help="Opt-in signals beside the 12: default (the extras worth their cost, docs/signals.md), all "
                   "(every extra; several times slower), none, or comma-separated names.")
@click.option("--measure", is_flag=True, help="Also measure the validation metric without each layer (the reference).")
@click.option("--drop-one-samples", "--label-samples", "drop_one_samples", default=None, type=int,
              help="Validation examples [400] or windows [8] for --measure.")
@click.option("--fusion", "fusion_path", default="default", show_default=True,
              help="Fusion bundle whose ranking is shown (default: the shipped one; 'none': no bundle).")
@click.option("--batch-size", default=None, type=int, help="[classification 16, causal LM 4]")
@click.option("--max-length", default=None, type=int, help="Tokens per example [128] or per window [512].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the calibration sample.")
@overwrite_option()
def analyze(model: str, dataset: str, output: Path, extras: str, fusion_path: str, overwrite: bool, **options) -> None:
    """Every signal's, consensus's and the fusion bundle's ranking of MODEL's layers, their agreement, and
    (--measure) the measured metric without each layer: analysis.md, plots and a parquet table."""
    from fusion_prune.analyze import analyze as run

    hold_output(output, overwrite)
    from signals import opt_in_signals

    names = (None if extras == "default" else opt_in_signals() if extras == "all"
             else [] if extras == "none" else [e.strip() for e in extras.split(",") if e.strip()])
    a = run(model, dataset, extras=names, fusion=None if fusion_path == "none" else fusion_path, **options)
    a.save(output, overwrite=overwrite)
    click.echo(f"saved {output} (analysis.md, analysis.parquet, agreement.csv, plots/)")
    click.echo("first layer to remove (original index): "
               + ", ".join(f"{m} {l}" for m, l in a.first_layers().items()))
