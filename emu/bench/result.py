"""How every benchmark reports: a figure, a baseline measured in the same run, and their ratio."""

from __future__ import annotations

import json
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

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.figure / self.baseline if self.baseline else float("nan")
        return self.baseline / self.figure if self.figure else float("nan")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def emit(results: list[BenchResult], as_json: bool, console: Console | None = None) -> None:
    """Print results as a table, or as JSON (one object, or a list for several) on stdout."""
    if as_json:
        payload: Any = [r.to_json() for r in results]
        if len(payload) == 1:
            payload = payload[0]
        print(json.dumps(payload, indent=2))
        return
    console = console or Console()
    table = Table(title="benchmark")
    for col in ("what", "figure", "baseline", "ratio"):
        table.add_column(col, justify="right" if col != "what" else "left")
    for r in results:
        table.add_row(
            r.name,
            f"{r.figure:,.1f} {r.unit}",
            f"{r.baseline:,.1f} {r.unit} ({r.baseline_name})",
            f"{r.ratio:.2f}",
        )
    console.print(table)
