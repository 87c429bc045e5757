"""The ``fusionprune`` command line: one module per command group, each command parsing its options
and calling one library function (docs/design.md, "CLI").

Exit status: 0 on success, 2 on bad input (one line on stderr, no traceback), 1 on an internal
error (traceback shown, so that it can be reported).
"""

from __future__ import annotations

import logging
import os
import sys

import click

from fusion_prune import __version__
from fusion_prune.cli.assets import assets
from fusion_prune.cli.common import Group
from fusion_prune.cli.compress import compress_cmd, demo
from fusion_prune.cli.fusion import collect, evaluate_fusion, fit_fusion
from fusion_prune.cli.models import export_cmd, inspect, prune
from fusion_prune.cli.signals import analyze, signals_cmd
from fusion_prune.cli.train import distill_cmd, evaluate, finetune
from fusion_prune.logs import configure_logging, note_before_work
from fusion_prune.utils import configure_threads


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fusionprune")
@click.option("-v", "--verbose", is_flag=True, help="Log more (debug messages of fusionprune).")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch. Default: FUSIONPRUNE_THREADS, else OMP_NUM_THREADS, else the CPUs not "
                   "busy with other work when the command starts.")
def main(verbose: bool, threads: int | None) -> None:
    """Make transformer classifiers and causal LMs smaller by removing whole layers."""
    configure_logging(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n, why = configure_threads(threads)
    if why == "CPUs free now":
        note_before_work(f"other work is using the CPU: computing on {n} thread(s) (--threads or "
                         "FUSIONPRUNE_THREADS to choose)")


for command in (assets, inspect, finetune, evaluate, prune, signals_cmd, analyze, collect, fit_fusion,
                evaluate_fusion, compress_cmd, distill_cmd, demo, export_cmd):
    main.add_command(command)

# Every option named in fusion_prune/params.py's table is checked by that table at parse time.
from fusion_prune.params import apply_to_cli  # noqa: E402

apply_to_cli(main)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
