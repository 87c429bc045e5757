"""``fusionprune compress`` and ``fusionprune demo``."""

from __future__ import annotations

from pathlib import Path

import click

from fusion_prune.cli.common import (ParamChoice, RegistryChoice, dataset_options, field_option, model_option, output_option,
                                     overwrite_option, task_defaults, task_option, teacher_options)

RUN = "fusion_prune.loop:CompressConfig"
CLS = "fusion_prune.tasks.classification:ClassificationFinish"
LM = "fusion_prune.tasks.causal_lm:CausalLMFinish"


def _strategies() -> str:
    from fusion_prune.strategies import STRATEGIES
    from fusion_prune.tasks import TASKS

    defaults = ", ".join(f"{c.default_strategy} for {t}" for t, c in TASKS.items())
    return f"[default, by measurement: {defaults}] One of: {', '.join(STRATEGIES)}."


@click.command("compress")
@model_option("A classifier or causal LM (asset, folder, hub id).")
@dataset_options
@task_option
@field_option("--target-layers", source=RUN, type=int)
@field_option("--max-accuracy-drop", source=RUN, type=float)
@field_option("--max-perplexity-increase", source=RUN, type=float)
@field_option("--budget-after-finish/--budget-after-recovery", "budget_after_finish", source=RUN,
              path="budget_after_finish")
@output_option()
@field_option("--strategy", source=RUN, type=str, metavar="NAME",
              help_extra=_strategies)
@field_option("--fusion", "fusion_path", source=RUN, path="fusion_path", type=click.Path(path_type=str))
@field_option("--trust-pickle", source=RUN, is_flag=True)
@field_option("--verify-k", source=RUN, type=int)
@field_option("--guard", source=RUN, type=str, metavar="DATASETS")
@field_option("--guard-weight", source=RUN, type=float)
@field_option("--guard-samples", source=RUN, type=int)
@field_option("--guard-shortlist", source=RUN, type=int)
@field_option("--guard-target", source=RUN, type=ParamChoice("guard_target"))
@field_option("--calibration", source=RUN, type=str, metavar="CORPUS|teacher")
@field_option("--finetune-steps", source=RUN, type=int, help_extra=task_defaults("finetune_steps"))
@field_option("--signal-samples", source=RUN, type=int, help_extra=task_defaults("signal_samples"))
@field_option("--drop-one-samples", "--label-samples", "drop_one_samples", source=RUN, path="drop_one_samples",
              type=int, help_extra=task_defaults("drop_one_samples"))
@teacher_options(RUN)
@field_option("--max-eval-samples", source=RUN, type=int)
@field_option("--step-eval-samples", source=RUN, type=int, help_extra=task_defaults("step_eval_samples"))
@field_option("--max-length", source=RUN, type=int, help_extra=task_defaults("max_length"))
@field_option("--batch-size", source=RUN, type=int, help_extra=task_defaults("batch_size"))
@field_option("--lr", source=RUN, type=float)
@field_option("--dtype", source=RUN, type=RegistryChoice("fusion_prune.models:DTYPES"))
@field_option("--max-memory", source=RUN, type=str, metavar="SIZE")
@field_option("--distill-epochs", source=CLS, path="distill.epochs", type=float)
@field_option("--distill-samples", source=CLS, path="distill.max_train_samples", type=int)
@field_option("--temperature", source=CLS, path="distill.temperature", type=float)
@field_option("--hidden-weight", source=CLS, path="distill.hidden_weight", type=float)
@field_option("--distill-layers", source=CLS, path="distill.train_layers", type=int)
@click.option("--no-distill", is_flag=True, help="Stop after pruning and fine-tuning.")
@field_option("--distill-control", source=CLS, is_flag=True)
@field_option("--distill-data", source=CLS, type=ParamChoice("distill_data"))
@field_option("--heal", "heal_method", source=LM, path="heal.method",
              type=RegistryChoice("fusion_prune.heal:HEAL_METHODS"))
@field_option("--heal-steps", source=LM, path="heal.steps", type=int)
@field_option("--heal-seconds", source=LM, path="heal.max_seconds", type=float)
@field_option("--heal-lr", source=LM, path="heal.lr", type=float)
@field_option("--heal-eval-every", source=LM, path="heal.eval_every", type=int)
@field_option("--heal-patience", source=LM, path="heal.patience", type=int)
@field_option("--lora-r", source=LM, path="heal.lora_r", type=int)
@field_option("--lora-alpha", source=LM, path="heal.lora_alpha", type=int)
@field_option("--lora-targets", source=LM, path="heal.target_modules", type=str)
@field_option("--heal-layers", source=LM, path="heal.top_layers", type=int)
@field_option("--heal-teacher", source=LM, is_flag=True)
@field_option("--replace", source=LM, type=RegistryChoice("fusion_prune.replace:REPLACE_METHODS"))
@field_option("--replace-samples", source=LM, type=int)
@field_option("--heal-mix", source=LM, type=str, metavar="CORPUS")
@field_option("--heal-mix-share", source=LM, type=float)
@field_option("--lm-distill-steps", source=LM, type=int)
@field_option("--kd-weight", source=LM, type=float)
@field_option("--heal-kd-weight", source=LM, path="heal.kd_weight", type=float)
@field_option("--heal-guard-weight", source=LM, path="heal.guard_weight", type=float)
@field_option("--heal-guard-samples", source=LM, path="heal.guard_samples", type=int)
@field_option("--kd-top-k", source=LM, path="heal.kd_top_k", type=int)
@field_option("--max-eval-tokens", source=RUN, type=int)
@click.option("--zero-shot", "zero_shot", multiple=True,
              help="Causal LM: labelled dataset to score zero-shot before and after (repeatable).")
@click.option("--prompt", default=None, help="Zero-shot prompt with {text} [each dataset's own where it has one "
                                             "(rotten-tomatoes, bbc-news), else \"{text}\\nAnswer:\"].")
@click.option("--verbalisers", default=None, help="Zero-shot words per label, e.g. fresh=positive,rotten=negative.")
@click.option("--zero-shot-samples", default=None, type=int, help="Examples of each zero-shot set [200].")
@field_option("--lm-eval", source=LM, type=str, metavar="TASKS")
@field_option("--lm-eval-include", source=LM, type=click.Path(path_type=str))
@field_option("--lm-eval-limit", source=LM, type=int)
@field_option("--seed", source=RUN, type=int)
@click.option("--resume", is_flag=True, help="Continue a stopped run with the same arguments.")
@overwrite_option()
def compress_cmd(model: str, dataset: str, text_column: str, label_column: str, task: str | None, output: Path,
             zero_shot: tuple[str, ...], prompt: str | None, verbalisers: str | None, zero_shot_samples: int | None,
             resume: bool, overwrite: bool, **options) -> None:
    """Remove layers down to --target-layers or a budget, recovering after each removal, then distil
    (classifiers) or heal (full fine-tuning where it fits, else LoRA) and optionally distil (causal LMs)."""
    from fusion_prune.loop import run_compress
    from fusion_prune.report import compress_summary

    if zero_shot:
        options["zero_shot"] = {z: {"prompt": prompt, "verbalisers": verbalisers, "max_samples": zero_shot_samples}
                                for z in zero_shot}
    # Every finish flag is offered; those of the other task (its defaults) are left out for this one.
    report, t = run_compress(model, dataset, output, task=task, text_column=text_column, label_column=label_column,
                             resume=resume, overwrite=overwrite, other_tasks_options="ignore", **options)
    click.echo("")
    if isinstance(report, dict):  # --max-memory: the streamed choice (fusion_prune.streaming)
        from fusion_prune.streaming import summary_lines

        lines = summary_lines(report, output)
    else:
        lines = compress_summary(report, t, output)
    for line in lines:
        click.echo(f"  {line}")


@click.command()
@click.option("--output", "-o", default="runs/demo", show_default=True, type=click.Path(path_type=Path),
              help="The demo's run folder (the teacher, the compressed model, report.md).")
@click.option("--resume", is_flag=True, help="Continue a stopped demo (nothing to continue: start it).")
@overwrite_option()
@click.pass_context
def demo(ctx: click.Context, output: Path, resume: bool, overwrite: bool) -> None:
    """minilm-l6 on rotten-tomatoes, 6 -> 3 layers with the default strategy and distillation."""
    # Every option not named here takes compress's own default (click fills them in).
    ctx.invoke(compress_cmd, model="minilm-l6", dataset="rotten-tomatoes", target_layers=3, output=output,
               max_length=64, resume=resume, overwrite=overwrite)
