"""Knowledge distillation: KD losses, the student-to-teacher layer map, and the trainer."""

from distill.layer_map import layer_map
from distill.losses import KD_LOSSES, hard_ce, hidden_mse, soft_kl
from distill.trainer import DistillConfig, distill

__all__ = ["KD_LOSSES", "DistillConfig", "distill", "hard_ce", "hidden_mse", "layer_map", "soft_kl"]
