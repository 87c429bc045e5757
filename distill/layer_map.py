"""Which teacher layer each student layer came from, from the kept-layer record."""

from __future__ import annotations

from fusion_prune.surgery import kept_layers


def layer_map(student_config, teacher_config) -> list[tuple[int, int]]:
    """Pairs (student layer, teacher layer) in current indices, matched by original layer index.

    A student pruned from the teacher keeps ``fusionprune_kept_layers``; each of its layers is
    paired with the teacher layer that has the same original index. Student layers with no
    counterpart in the teacher are left out.
    """
    teacher_pos = {orig: i for i, orig in enumerate(kept_layers(teacher_config))}
    return [(i, teacher_pos[orig]) for i, orig in enumerate(kept_layers(student_config)) if orig in teacher_pos]
