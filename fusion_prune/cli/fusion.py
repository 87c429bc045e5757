"""``fusionprune collect``, ``fit-fusion`` and ``evaluate-fusion``: the fusion model's data, fit and judgement."""

from __future__ import annotations

from pathlib import Path

import click

from fusion_prune.cli.common import (RegistryChoice, dataset_options, echo_json, field_option, hold_output,
                                     model_option, output_option, overwrite_option, table_output, task_option,
                                     teacher_options)

COLLECT = "fusion_prune.collect:CollectConfig"
BUNDLE = "fusion_prune.fusion:FusionBundle"


def _measured_option(f):
    return field_option("--measured", "--label", "measured", source=BUNDLE, path="measured",
                        type=RegistryChoice("fusion_prune.fusion:MEASURED"),
                        help="Measured column the target is computed from: accuracy right after the drop, after "
                             "collect's --recovery-steps, or (causal-LM rows) the validation NLL after the drop "
                             "(lower is better).")(f)


@click.command()
@model_option("A classifier, a model to fine-tune into one first, or a causal LM.")
@dataset_options
@output_option("Rows: .parquet or .csv.")
@field_option("--min-layers", source=COLLECT, type=int)
@field_option("--finetune-steps", source=COLLECT, type=int)
@teacher_options(COLLECT)
@field_option("--max-eval-samples", source=COLLECT, type=int)
@field_option("--signal-samples", source=COLLECT, type=int)
@field_option("--recovery-steps", source=COLLECT, type=int)
@field_option("--max-length", source=COLLECT, type=int)
@field_option("--seed", source=COLLECT, type=int)
@field_option("--extra", "extra_signals", source=COLLECT, path="extra_signals", multiple=True)
@field_option("--walk", source=COLLECT, type=RegistryChoice("fusion_prune.collect:WALKS"))
@task_option
@overwrite_option("output file")
def collect(model: str, dataset: str, text_column: str, label_column: str, output: Path, task: str | None,
            overwrite: bool, **options) -> None:
    """Pruning states with signals and measured drop-one values: the rows fit-fusion learns from.

    Resumable: run the same command again after an interruption. For a causal LM the sample
    options count token windows of --max-length, and the measure is next-token NLL.
    """
    from fusion_prune.collect import run_collect

    table_output(output)
    rows = run_collect(model, dataset, output, task=task, text_column=text_column, label_column=label_column,
                       overwrite=overwrite, **options)
    click.echo(f"saved {output}: {rows['step'].nunique()} states, {len(rows)} rows")


@click.command("fit-fusion")
@click.option("--data", "data", multiple=True, required=True, help="Rows tables (repeatable; glob patterns allowed).")
@click.option("--model-type", default="rf", show_default=True, type=RegistryChoice("fusion_prune.fusion:FUSION_MODELS"),
              help="A registered fusion model (xgb-rank: XGBoost with a pairwise ranking objective grouped by state).")
@output_option("Bundle to write (.npz).")
@click.option("--feature-norm", default="auto", show_default=True,
              type=RegistryChoice("fusion_prune.fusion:NORMALISATIONS", extra=("auto",)),
              help="Per-state feature normalisation; auto: best leave-one-dataset-out regret.")
@click.option("--target", default="auto", show_default=True,
              type=RegistryChoice("fusion_prune.fusion:TARGETS", extra=("auto",)),
              help="What the model learns per layer; auto: best leave-one-dataset-out regret.")
@_measured_option
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Leave-one-dataset-out report (JSON, with a plot beside it).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the estimator (forest, XGBoost).")
@click.option("--extra", multiple=True, help="Also learn from this opt-in signal (a column collect --extra wrote).")
@overwrite_option("bundle")
def fit_fusion(data: tuple[str, ...], model_type: str, output: Path, report: Path | None, extra: tuple[str, ...],
               overwrite: bool, **options) -> None:
    """Fit a fusion model on collected rows and save it as a bundle (.npz: JSON metadata and arrays, no pickle)."""
    import pandas as pd

    from fusion_prune.collect import check_extra_signals
    from fusion_prune.fusion import count_states, fit_fusion as run

    for path in (output, report, report and report.with_suffix(".png")):
        if path is not None:
            hold_output(path, overwrite, kind="file")
    check_extra_signals(extra)
    bundle, rows, rep = run(data, output, model_type, extra, report=report, overwrite=overwrite, **options)
    click.echo(f"saved {output}: {model_type}, features normalised by {bundle.feature_norm}, target {bundle.target}, "
               f"{count_states(rows)} states from {rows['dataset'].nunique()} datasets")
    if rep is not None:
        click.echo(f"saved {report} and {report.with_suffix('.png')}")
        click.echo(pd.DataFrame(rep["mean"]).set_index("method").round(4).to_string())
        if "per_family" in rep:
            click.echo("leave-one-family-out (regret; held-out family = the one scored):")
            click.echo(pd.DataFrame(rep["per_family"]).pivot_table(index="method", columns="held_out",
                                                                   values="regret").round(4).to_string())


@click.command("evaluate-fusion")
@click.option("--fusion", "fusion_path", type=click.Path(path_type=Path), default=None,
              help="Bundle; default: the one shipped for classifiers.")
@click.option("--trust-pickle", is_flag=True,
              help="Also load a joblib (pickle) bundle from before format 2. Unpickling runs any code the file holds.")
@click.option("--data", "data", multiple=True, required=True, help="Rows tables (repeatable; glob patterns allowed).")
@_measured_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate_fusion(fusion_path: Path | None, trust_pickle: bool, data: tuple[str, ...], measured: str,
                    as_json: bool) -> None:
    """How well a bundle picks layers on given rows, next to every single signal and consensus."""
    from fusion_prune import fusion as F

    res = F.evaluate_bundle(F.load_bundle(fusion_path, trust_pickle=trust_pickle),
                            F.use_measured(F.read_rows(data), measured))
    if as_json:
        return echo_json(res)
    click.echo(f"{res['states']} states; higher Spearman and top-1, lower regret are better")
    for what, names in res["unseen"].items():
        if names:
            click.echo(f"  rows from {what} the bundle was not fitted on: {', '.join(map(str, names))}")
    for name, m in [("fusion", res["fusion"]), ("consensus", res["consensus"]), *res["signals"].items()]:
        click.echo(f"  {name:<15} spearman {m['spearman']:+.3f}  top1 {m['top1']:.3f}  regret {m['regret']:.4f}")
