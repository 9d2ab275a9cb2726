"""`netswap compare`: a table of what differs between runs, and one figure with them overlaid."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.table import Table

from emu.util.cli import OneLineCommand, usage

EXIT_OK, EXIT_USAGE = 0, 2
PER_TABLE = 4  # runs per table: a label column and four runs fit 80 columns


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))
    return "-" if v is None else str(v)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("results", nargs=-1, required=True, metavar="RUN.json RUN.json [...]")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default="netswap-compare.png", show_default=True,
              metavar="FILE", help="The figure with the runs overlaid (free pages, pages out, drops over emulated time).")
@click.option("--all", "all_rows", is_flag=True, help="Show every figure, not only those that differ.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
def compare(results: tuple[str, ...], plot_path: str, all_rows: bool, as_json: bool) -> None:
    """Compare runs side by side: their JSON results (netswap run --json / --out; a demo's
    summary.json counts as all its runs).

    Prints a table of the figures that differ (runs named A, B, ... with a legend, at most four
    per table so it fits 80 columns) and writes one figure with the runs' timelines overlaid,
    read from the *-timeline.jsonl files the results name (as written, relative to the
    result's folder, or beside it).

    Exit status: 0, or 2 when a file is missing or not a run result.
    """
    from emu.host.compare import CompareError, differences, load_runs, plot_overlay

    err = Console(stderr=True)
    try:
        runs = load_runs(list(results))
    except CompareError as e:
        usage(str(e))
    plot = Path(plot_path)
    if plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        usage(f"--plot {plot_path}: expected a .png, .svg or .pdf file")
    if not plot.parent.is_dir():
        usage(f"--plot {plot_path}: directory {plot.parent} does not exist")
    if not os.access(plot.parent, os.W_OK):
        usage(f"--plot {plot_path}: directory {plot.parent} is not writable")
    labels = [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(len(runs))]
    rows = differences([r for _, r in runs], all_rows)
    png, drawn = plot_overlay(runs, labels, plot)
    if as_json:
        click.echo(json.dumps({"runs": {lab: p for lab, (p, _) in zip(labels, runs)},
                               "rows": {k: dict(zip(labels, v)) for k, v in rows}, "figure": str(png)}, indent=2))
        sys.exit(EXIT_OK)
    out = Console(width=None if sys.stdout.isatty() else 80)
    for lab, (p, r) in zip(labels, runs):
        out.print(f"{lab}: {p}  ({r['backend']}/{r['policy']}, {r['outcome']})", markup=False, highlight=False)
    if not rows:
        out.print("the runs do not differ in any figure compared")
    for start in range(0, len(runs), PER_TABLE):
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
        t.add_column("differs" if not all_rows else "figure", no_wrap=True, max_width=20)
        for lab in labels[start:start + PER_TABLE]:
            t.add_column(lab, justify="right", no_wrap=True, max_width=13)
        for k, vals in rows:
            t.add_row(k, *[_cell(v) for v in vals[start:start + PER_TABLE]])
        out.print(t)
    err.print(f"figure: {png} ({drawn} of {len(runs)} runs had a timeline)", markup=False, highlight=False,
              soft_wrap=True)
    sys.exit(EXIT_OK)
