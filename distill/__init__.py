"""Knowledge distillation: losses, layer map and trainer (issue 6)."""
