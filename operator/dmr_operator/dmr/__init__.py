"""model-runner's own rules, pure (no I/O): references, validation, wire shapes, Go semantics."""
