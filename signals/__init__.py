"""Layer-importance signals: registry and capture engine (issue 4)."""
