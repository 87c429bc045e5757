"""``python -m fusion_prune.cli`` (what ``accelerate launch -m fusion_prune.cli ...`` runs)."""

from fusion_prune.cli import main

main()
