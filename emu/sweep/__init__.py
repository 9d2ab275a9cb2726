"""Sweeps: many runs of a scenario over a grid of its keys, on a local pool or a Dask cluster.

spec (the grid), task (one run, in a worker), executors (the local pool, Dask), table (runs.csv,
resume), heatmap (P(stuck) per policy).  `netswap sweep` (emu/commands/sweep.py) drives them.
"""
