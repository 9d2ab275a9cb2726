"""Benchmarks: each prints a figure, a same-run baseline and their ratio."""
