"""Benchmarks: workloads, metrics and timing scripts (run each with ``python -m``)."""
