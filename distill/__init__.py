"""Knowledge distillation: KD losses, the student-to-teacher layer map, and the trainer."""

from distill.layer_map import layer_map
from distill.losses import (KD_LOSSES, hard_ce, hidden_mse, kl_rows, next_token_kl, soft_kl, teacher_kl,
                            topk_kl_rows, topk_next_token_kl)
from distill.trainer import DistillConfig, distill, teacher_topk_logits

__all__ = ["KD_LOSSES", "DistillConfig", "distill", "hard_ce", "hidden_mse", "kl_rows", "layer_map", "next_token_kl",
           "soft_kl", "teacher_kl", "teacher_topk_logits", "topk_kl_rows", "topk_next_token_kl"]
