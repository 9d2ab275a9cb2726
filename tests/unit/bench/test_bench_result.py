"""How the benchmarks report their rounds: each round's own ratio (ours against the baseline
measured in that round), their range and how many met the goal, in the table and the JSON."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from emu.bench.result import BenchResult, emit, round_ratios


def test_round_ratios_pair_each_round_in_the_figures_direction() -> None:
    # Seconds (lower is better): theirs over ours; IOPS (higher is better): ours over theirs.
    assert round_ratios([2.0, 1.0], [3.0, 0.5], higher_is_better=False) == [1.5, 0.5]
    assert round_ratios([300.0, 100.0], [200.0, 200.0], higher_is_better=True) == [1.5, 0.5]


def test_the_table_shows_the_rounds_range_and_how_many_met_the_goal(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [BenchResult("copy out", "MB/s", 110.0, 100.0, "ganesha", rounds=[0.9, 1.2, 1.1]),
            BenchResult("copy in", "MB/s", 90.0, 100.0, "ganesha")]
    console = Console(width=200, record=True)
    emit(rows, as_json=False, console=console)
    text = console.export_text()
    assert "rounds: range, >= 1" in text
    assert "0.90-1.20, 2/3" in text
    line = next(ln for ln in text.splitlines() if "copy in" in ln)
    assert line.split("│")[-2].strip() == "-"  # no rounds: no spread
    capsys.readouterr()  # (the table went to stdout too)
    emit(rows, as_json=True)
    out = json.loads(capsys.readouterr().out)
    assert out[0]["rounds"] == [0.9, 1.2, 1.1] and out[0]["ratio"] == pytest.approx(1.1)
    assert out[1]["rounds"] == []


def test_no_rounds_no_column() -> None:
    console = Console(width=200, record=True)
    emit([BenchResult("x", "MB/s", 1.0, 2.0, "y")], as_json=False, console=console)
    assert "rounds" not in console.export_text()
