"""lm-evaluation-harness as an evaluator of a causal LM already in memory (``fusionprune[lm-eval]``).

Task names are the harness's own (online: its registry downloads their data) or local ones built
here from fusionprune's labelled dataset assets, so the path works offline: ``fp_<dataset>`` (dashes
as underscores, e.g. ``fp_rotten_tomatoes``) is a multiple-choice task over the dataset's test
split whose context is fusionprune's zero-shot prompt and whose choices are its verbalisers,
written as YAML plus a JSONL data file into a folder the harness reads (``include_path``). Its
``acc`` is the same rule as ``fusionprune evaluate --zero-shot`` (the choice with the highest
summed log-likelihood), so the two must agree exactly on the same examples.

The model runs through the harness's ``HFLM`` wrapper, which takes a loaded model and tokenizer:
no second copy is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Sequence

from fusion_prune.errors import BadInputError

LOCAL_PREFIX = "fp_"


def require_harness() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise BadInputError("The '--lm-eval' option needs lm-evaluation-harness, which is not installed: "
                            "pip install 'fusionprune[lm-eval]'")


def local_task_name(dataset: str) -> str:
    return LOCAL_PREFIX + dataset.replace("-", "_")


def local_datasets() -> dict[str, str]:
    """``{task name: dataset asset}`` of every labelled dataset asset (the local tasks)."""
    from fusion_prune import assets

    return {local_task_name(n): n for n, a in assets.ASSETS.items() if a.kind == "dataset" and "no labels" not in
            a.description}


def write_local_task(dataset: str, folder: str | Path, *, prompt: str | None = None,
                     verbalisers: Sequence[str] | None = None, split: str = "test",
                     max_samples: int | None = None, seed: int = 0, name: str | None = None) -> str:
    """Write the harness task of ``dataset``'s ``split`` (subsampled as fusionprune subsamples it) to
    ``folder`` (``NAME.yaml``, ``NAME.jsonl``); returns its name. Without ``prompt`` or ``verbalisers``
    the dataset's own (:func:`fusion_prune.lm.zero_shot_defaults`), as ``evaluate --zero-shot`` scores it."""
    import yaml

    from fusion_prune.data import load_dataset, subsample
    from fusion_prune.lm import parse_verbalisers, zero_shot_defaults

    prompt, words = zero_shot_defaults(dataset, prompt)  # words: used when no verbalisers are given
    if "{text}" not in prompt:
        raise BadInputError(f"The '--prompt' option must contain '{{text}}'. Got {prompt!r}.")
    data = load_dataset(dataset)
    df = subsample(data.split(split), max_samples, seed)
    name = name or local_task_name(Path(dataset).name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = folder / f"{name}.jsonl"
    with rows.open("w") as f:
        for text, label in zip(df["text"], df["label"]):
            f.write(json.dumps({"text": str(text), "label": int(label)}) + "\n")
    choices = list(verbalisers if verbalisers is not None else parse_verbalisers(words, data.labels))
    spec = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(rows.resolve())}},
        "test_split": "test", "output_type": "multiple_choice",
        # The context is the prompt as fusionprune formats it, the continuations its verbalisers
        # exactly (no delimiter added), so both score the same strings.
        "doc_to_text": prompt.replace("{text}", "{{text}}"), "doc_to_choice": choices, "doc_to_target": "label",
        "target_delimiter": "", "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": f"fusionprune asset {dataset}, split {split}"},
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return name


def run(model, tokenizer, tasks: Sequence[str], *, include: str | Path | None = None, limit: int | None = None,
        batch_size: int = 8, max_length: int = 256, workdir: str | Path | None = None) -> dict:
    """``{task: {metric: value}}`` of the harness on ``model`` (in memory). Names in
    :func:`local_datasets` are built into ``workdir`` (a temporary folder when None); ``include``
    adds a folder of the user's own task YAMLs; ``limit`` caps the examples per task."""
    import tempfile

    require_harness()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    with tempfile.TemporaryDirectory(prefix="fusionprune-lm-eval-") as tmp:
        local = Path(workdir or tmp)
        # A local task holds the same examples fusionprune's zero-shot scores for max_samples=limit.
        assets = local_datasets()
        built = [write_local_task(assets[t], local, max_samples=limit) for t in tasks if t in assets]
        paths = ([str(local)] if built else []) + ([str(Path(include).resolve())] if include else [])
        manager = _manager(paths)
        check_tasks(tasks, include, manager)
        # The wrapper warns that a loaded model bypasses its loading options: true, and meant here.
        quiet, level = logging.getLogger("lm_eval"), logging.getLogger("lm_eval").level
        quiet.setLevel(logging.ERROR)
        was_training = model.training
        # No BOS, as fusionprune's own scoring (its protocol, kept for every model); the prefix id is
        # only what the harness puts before an empty context.
        prefix = next((i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                       if i is not None), 0)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  add_bos_token=False, prefix_token_id=prefix, device=str(next(model.parameters()).device))
        try:
            out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                                  bootstrap_iters=0, verbosity="ERROR")
        finally:
            model.train(was_training)
            quiet.setLevel(level)
    # "acc,none" -> "acc" (the filter name); counts and aliases are not metrics
    return {task: {key.split(",")[0]: value for key, value in metrics.items()
                   if "," in key and isinstance(value, (int, float)) and not key.endswith("_stderr,none")}
            for task, metrics in out["results"].items()}


def parse_tasks(text: str | Sequence[str] | None) -> list[str]:
    """Comma-separated task names (or a list of them) as a list."""
    if not text:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    return [t.strip() for t in items if t.strip()]


def _manager(paths: list[str]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=paths or None, verbosity="ERROR")


def check_tasks(tasks: Sequence[str], include: str | Path | None = None, manager=None) -> None:
    """Refuse, in one line, a missing harness, a missing include folder or an unknown task name:
    before a run spends hours to reach its evaluation."""
    require_harness()
    if include is not None and not Path(include).is_dir():
        raise BadInputError(f"The '--lm-eval-include' option must be a folder of task YAMLs. Got {str(include)!r}.")
    local = local_datasets()
    rest = [t for t in tasks if t not in local]
    if not rest:
        return
    manager = manager or _manager([str(Path(include).resolve())] if include else [])
    unknown = [t for t in rest if t not in manager.all_tasks]
    if unknown:
        raise BadInputError(f"The '--lm-eval' option names unknown task(s) {unknown}; expected harness task names "
                            f"(their data needs the network) or local ones: {', '.join(sorted(local))}"
                            f"{' or the YAMLs in ' + str(include) if include else ''}.")
