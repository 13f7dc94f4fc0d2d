"""model-runner's own rules, pure and I/O-free: references, validation, wire shapes, Go semantics."""
