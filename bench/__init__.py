"""Benchmarks of dmr-operator on the local control plane (``python bench/run.py``); not tests."""
