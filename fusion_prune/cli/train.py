"""``fusionprune finetune``, ``evaluate`` and ``distill``: train a teacher, measure a model, distil."""

from __future__ import annotations

from pathlib import Path

import click

from fusion_prune.cli.common import (ParamChoice, RegistryChoice, dataset_options, echo_json, field_option, hold_output,
                                     model_option, output_option, overwrite_option, task_option)

TEACHER = "fusion_prune.finetune:teacher_config"  # the defaults of a teacher
DISTILL = "distill.trainer:DistillConfig"


@click.command()
@model_option()
@dataset_options
@output_option()
@field_option("--epochs", source=TEACHER, type=float)
@field_option("--max-steps", source=TEACHER, type=int)
@field_option("--min-steps", source=TEACHER, type=int)
@field_option("--patience", source=TEACHER, type=int)
@field_option("--batch-size", source=TEACHER, type=int)
@field_option("--lr", source=TEACHER, type=float)
@field_option("--max-length", source=TEACHER, type=int)
@field_option("--seed", source=TEACHER, type=int)
@field_option("--max-train-samples", source=TEACHER, type=int)
@field_option("--max-eval-samples", source=TEACHER, type=int)
@field_option("--teacher-margin", source="fusion_prune.loop:CompressConfig", type=float)
@field_option("--mixed-precision", source=TEACHER, type=ParamChoice("mixed_precision"))
@overwrite_option()
def finetune(model: str, dataset: str, text_column: str, label_column: str, output: Path, teacher_margin: float,
             overwrite: bool, **options) -> None:
    """Fine-tune a sequence classifier and save it (the teacher of later steps)."""
    from fusion_prune.data import load_dataset
    from fusion_prune.finetune import finetune as run, teacher_config
    from fusion_prune.utils import check_output

    check_output(output, overwrite)
    res = run(model, load_dataset(dataset, text_column, label_column), teacher_config(**options), output,
              overwrite=overwrite, teacher_margin=teacher_margin)
    if not res.is_main_process:  # under accelerate launch, one summary line is enough
        return
    m = res.record["metrics"]
    click.echo(f"saved {output}  validation accuracy {m['validation']['accuracy']:.4f}  test accuracy "
               f"{m['test']['accuracy']:.4f}  macro-F1 {m['test']['macro_f1']:.4f}  ({res.record['wall_seconds']:.0f} s)")


@click.command()
@model_option("A fine-tuned classifier or a causal LM (folder, asset or hub id).")
@dataset_options(required=False, help_extra=" Needed unless --lm-eval is given.")
@task_option
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "validation", "test"]),
              help="The dataset split to evaluate on.")
@click.option("--batch-size", default=None, type=int, help="[classification 64, causal LM 4 (zero-shot 8)]")
@click.option("--max-length", default=None, type=int,
              help="Classifier: default the one the model was trained with, else 128. Causal LM: window [512].")
@click.option("--max-samples", default=None, type=int, help="Cap on the examples scored.")
@click.option("--max-eval-tokens", default=None, type=int, help="Causal LM: cap on the tokens scored.")
@click.option("--zero-shot", "zero_shot", is_flag=True,
              help="Causal LM: zero-shot accuracy on a labelled dataset instead of perplexity.")
@click.option("--prompt", default=None, help="Zero-shot prompt with {text} [the dataset's own where it has one "
                                             "(rotten-tomatoes, bbc-news), else \"{text}\\nAnswer:\"].")
@click.option("--verbalisers", default=None, help="Zero-shot words per label, e.g. fresh=positive,rotten=negative.")
@click.option("--dtype", default="auto", show_default=True, type=RegistryChoice("fusion_prune.models:DTYPES"),
              help="Weights as loaded and computed (auto: bfloat16 for a causal LM on a GPU that has it, else "
                   "float32).")
@click.option("--lm-eval", default=None, metavar="TASKS",
              help="Causal LM: lm-evaluation-harness tasks (comma-separated) instead: harness names, or fp_<dataset> "
                   "built from a labelled asset (offline). Needs fusionprune[lm-eval].")
@click.option("--lm-eval-include", default=None, type=click.Path(path_type=str),
              help="A folder of your own harness task YAMLs.")
@click.option("--limit", default=None, type=int, help="--lm-eval: examples per task (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(model: str, dataset: str | None, task: str | None, as_json: bool, **options) -> None:
    """Accuracy of a classifier, perplexity or zero-shot accuracy of a causal LM on a dataset split, or
    lm-evaluation-harness tasks (--lm-eval)."""
    from fusion_prune.api import evaluate as run

    t, res = run(model, dataset, task=task, progress=not as_json, **options)
    echo_json(res) if as_json else click.echo(t.evaluation_line(res))


@click.command("distill")
@click.option("--teacher", required=True, help="The fine-tuned teacher classifier.")
@click.option("--student", required=True, help="The student classifier (e.g. a pruned copy of the teacher).")
@dataset_options
@output_option()
@field_option("--epochs", source=DISTILL, type=float)
@field_option("--max-steps", source=DISTILL, type=int)
@field_option("--max-train-samples", source=DISTILL, type=int)
@field_option("--batch-size", source=DISTILL, type=int)
@field_option("--lr", source=DISTILL, type=float)
@field_option("--temperature", source=DISTILL, type=float)
@field_option("--soft-weight", source=DISTILL, type=float)
@field_option("--hard-weight", source=DISTILL, type=float)
@field_option("--hidden-weight", source=DISTILL, type=float)
@field_option("--max-length", source=DISTILL, type=int)
@field_option("--seed", source=DISTILL, type=int)
@overwrite_option()
def distill_cmd(teacher: str, student: str, dataset: str, text_column: str, label_column: str, output: Path,
                overwrite: bool, **options) -> None:
    """Knowledge distillation from TEACHER into STUDENT (soft + hard labels, optional hidden states)."""
    from distill import DistillConfig
    from fusion_prune.api import distill_to_folder
    from fusion_prune.data import load_dataset
    from fusion_prune.training import make_accelerator

    cfg = DistillConfig(**options)
    acc = make_accelerator(cfg.mixed_precision)
    if acc.is_main_process:  # only the main process writes the output, so only it holds the lock
        hold_output(output, overwrite)
    rec = distill_to_folder(teacher, student, load_dataset(dataset, text_column, label_column), cfg, output,
                            overwrite=overwrite, accelerator=acc)
    if rec is None:  # not the main process
        return
    n = rec["num_processes"]
    click.echo(f"saved {output}: test accuracy {rec['test']['accuracy']:.4f} after {rec['train']['steps']} "
               f"distillation steps ({n} process{'es' if n > 1 else ''})")
