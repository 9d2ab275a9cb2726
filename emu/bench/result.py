"""How every benchmark reports: a figure, a baseline measured in the same run, and their ratio."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class BenchResult:
    name: str
    unit: str
    figure: float
    baseline: float
    baseline_name: str
    higher_is_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    rounds: list[float] = field(default_factory=list)  # the ratio of each round, where both ran side by side

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.figure / self.baseline if self.baseline else float("nan")
        return self.baseline / self.figure if self.figure else float("nan")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d

    def spread(self, goal: float = 1.0) -> str:
        """The rounds' own ratios at a glance: their range and how many met `goal`."""
        if not self.rounds:
            return "-"
        return f"{min(self.rounds):.2f}-{max(self.rounds):.2f}, {sum(r >= goal for r in self.rounds)}/{len(self.rounds)}"


def round_ratios(ours: list[float], theirs: list[float], higher_is_better: bool) -> list[float]:
    """Per round, ours against theirs measured in that same round (a round's two runs see the
    same machine load; the load drifts between rounds)."""
    return [(o / t if higher_is_better else t / o) if o and t else float("nan") for o, t in zip(ours, theirs)]


def emit(results: list[BenchResult], as_json: bool, console: Console | None = None, goal: float = 1.0) -> None:
    """Print results as a table, or as JSON (one object, or a list for several) on stdout.
    Results with per-round ratios get a column of their range and how many rounds met `goal`."""
    if as_json:
        payload: Any = [r.to_json() for r in results]
        if len(payload) == 1:
            payload = payload[0]
        print(json.dumps(payload, indent=2))
        return
    console = console or Console()
    table = Table(title="benchmark")
    with_rounds = any(r.rounds for r in results)
    cols = ["what", "figure", "baseline", "ratio"] + ([f"rounds: range, >= {goal:g}"] if with_rounds else [])
    for col in cols:
        table.add_column(col, justify="right" if col != "what" else "left")
    for r in results:
        row = [r.name, f"{r.figure:,.1f} {r.unit}", f"{r.baseline:,.1f} {r.unit} ({r.baseline_name})", f"{r.ratio:.2f}"]
        table.add_row(*row, *([r.spread(goal)] if with_rounds else []))
    console.print(table)


def emit_cpu(rows: list[tuple[str, list[float], list[float]]], title: str, first: str, ours: str, theirs: str,
             unit: str, fmt: str, note: str) -> None:
    """Each server's own CPU cost beside a benchmark's figures: a row per figure with the
    medians of its rounds (`ours`, `theirs`) and theirs/ours (above 1: ours spent less)."""
    t = Table(title=title)
    for col in (first, ours, theirs, f"{theirs}/{ours}"):
        t.add_column(col, justify="left" if col == first else "right")
    for name, o_runs, t_runs in rows:
        o, g = statistics.median(o_runs), statistics.median(t_runs)
        t.add_row(name, f"{o:{fmt}} {unit}", f"{g:{fmt}} {unit}", f"{g / o:.2f}" if o and g else "-")
    console = Console()
    console.print(t)
    console.print(note, soft_wrap=True)
