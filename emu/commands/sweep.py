"""`netswap sweep`: many runs over a grid of scenario keys; where the deadlock begins."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from emu import scenario as scen
from emu.util.cli import OneLineCommand, Seconds, usage
from emu.util.signals import sigterm_as_interrupt

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _policies(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for v in value or ("none,v12,pfmemalloc",):
        for p in v.split(","):
            p = p.strip()
            if p not in scen.POLICIES:
                raise click.BadParameter(f"{p!r}: expected some of {', '.join(scen.POLICIES)}", ctx, param)
            if p not in out:
                out.append(p)
    return out


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("scenario_file", metavar="SCENARIO")
@click.option("--vary", "varies", multiple=True, metavar="KEY=VALUES",
              help="A scenario key and its values: a..b:n (n evenly spaced), a..b:n:log, a..b (every integer) "
                   "or v1,v2,... Repeatable; the grid is every combination.")
@click.option("--policy", "policies", multiple=True, callback=_policies, metavar="P[,P...]",
              help="Policies to run each point under (default: none,v12,pfmemalloc).")
@click.option("--repeat", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Runs per point and policy, with workload.seed, seed+1, ... (a run is deterministic).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for runs.csv, sweep.json and the heatmaps. Restarting with the same --out resumes.")
@click.option("--workers", type=click.IntRange(1, 1024), default=None,
              help="Local pool size (default: one per core). Ignored with --scheduler.")
@click.option("--scheduler", metavar="tcp://HOST:8786", default=None,
              help="Run every point as a task on this Dask distributed scheduler (default: "
                   "$DASK_SCHEDULER_ADDRESS, else the local pool).")
@click.option("--wall-timeout", type=Seconds(min=1.0), default=600.0, show_default=True, metavar="S",
              help="Safety net per run, in wall-clock seconds (outcome timeout).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def sweep(scenario_file: str, varies: tuple[str, ...], policies: list[str], repeat: int, out_dir: Path,
          workers: int | None, scheduler: str | None, wall_timeout: float, as_json: bool, quiet: bool) -> None:
    """Run SCENARIO over a grid of its keys under each policy; write one CSV row per run as it
    finishes and a heatmap per policy of P(stuck) over the first two varied keys.

    \b
    Examples:
      netswap sweep demo --vary traffic.rate=2000..40000:8 --vary host.ram=8M,12M,16M \\
          --policy none,v12,pfmemalloc --repeat 3 --out sweep-rate-ram
      netswap sweep demo --vary host.reserve_scale=0..1:6 --policy v12 --out sweep-reserve
      netswap sweep demo --vary traffic.rate=1000..64000:7:log --scheduler tcp://10.0.0.5:8786 --out s

    Every run decides its verdict on its own emulated clock, so a point's row is the same on the
    local pool, on a Dask worker anywhere, and on a busy machine. Runs execute on a local pool
    of processes (one per core), or, with --scheduler or $DASK_SCHEDULER_ADDRESS, as tasks of a
    Dask distributed cluster (install netswap[dask]; a task whose worker dies is run again).
    Interrupted (Ctrl-C or SIGTERM) and restarted with the same --out, the sweep runs only what is missing.

    Exit status: 0 every run has a verdict, 1 some could not run (outcome error), 2 usage error,
    130 interrupted (143 by SIGTERM).
    """
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

    from emu.sweep.executors import SchedulerError, default_workers, run_dask, run_local, scheduler_address
    from emu.sweep.spec import Sweep, SweepSpecError, parse_vary
    from emu.sweep.table import RunTable, SweepDirError
    from emu.sweep.task import payload

    try:
        base = scen.load(scenario_file)
    except scen.ScenarioError as e:
        raise click.BadParameter(str(e), param_hint="SCENARIO") from None
    try:
        sw = Sweep(base, [parse_vary(v) for v in varies], policies, repeat)
        sw.check()
    except SweepSpecError as e:
        usage(str(e))
    table = RunTable(out_dir, sw)
    try:
        table.open()
    except SweepDirError as e:
        raise click.BadParameter(str(e), param_hint="--out") from None

    runs = sw.runs()
    todo = table.todo(runs)
    by_id = {r.run_id: r for r in runs}
    payloads = {r.run_id: payload(sw.scenario_for(r), r.run_id, wall_timeout) for r in todo}
    address = scheduler_address(scheduler)
    nworkers = workers or default_workers()
    where = f"Dask scheduler {address}" if address else f"local pool of {nworkers} worker(s)"
    console.print(f"netswap sweep: {len(runs)} runs ({len(runs) - len(todo)} done already), {where}; "
                  f"rows in {table.path}")

    counts: dict[str, float] = {"finished": 0, "stuck": 0, "error": 0}
    progress = Progress(TextColumn("[bold]sweep[/]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("stuck {task.fields[stuck]:g}  errors {task.fields[errors]:g}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=quiet or not console.is_terminal)
    bar = progress.add_task("runs", total=len(runs), completed=len(runs) - len(todo), stuck=0, errors=0)

    def on_row(rid: str, result: dict[str, Any]) -> None:
        row = table.append(by_id[rid], result)
        counts["finished"] += 1
        counts["stuck"] += float(row["stuck"] or 0)
        counts["error"] += int(row["outcome"] == "error")
        progress.update(bar, advance=1, stuck=counts["stuck"], errors=counts["error"])
        if progress.disable and not quiet:
            console.print(f"[{len(runs) - len(todo) + int(counts['finished'])}/{len(runs)}] {rid}: {row['outcome']}"
                          f" (emulated {row['emulated_s']} s, wall {row['wall_s']} s)", markup=False, highlight=False)

    started = time.monotonic()
    try:
        with sigterm_as_interrupt() as interrupts, progress:  # SIGTERM: stop the workers, as Ctrl-C does
            if address:
                nworkers = run_dask(payloads, on_row, address, sw.fingerprint())
            elif payloads:
                run_local(payloads, on_row, nworkers)
    except SchedulerError as e:
        console.print(f"[red]error:[/] {e}")
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        done = sum(table.done(r.run_id) for r in runs)
        console.print(f"[yellow]interrupted[/]: {done} of {len(runs)} runs are in {table.path}; "
                      "run the same command again to finish the rest")
        sys.exit(interrupts.exit_status)
    elapsed = time.monotonic() - started

    from emu.sweep.heatmap import plot

    rows = table.current(runs)
    figure = plot(sw, rows, out_dir, title=f"netswap sweep {base.name}")
    summary = _summary(sw, rows, int(counts["finished"]), elapsed, nworkers, address, figure, table.path)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(console, summary)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    missing = sum(not table.done(r.run_id) for r in runs)
    sys.exit(EXIT_OK if missing == 0 else EXIT_ERROR)


def _summary(sw: Any, rows: list[dict[str, str]], finished: int, elapsed: float, nworkers: int,
             address: str | None, figure: Path | None, csv_path: Path) -> dict[str, Any]:
    per_policy = {}
    for p in sw.policies:
        mine = [r for r in rows if r["policy"] == p and r["outcome"] not in ("", "error")]
        per_policy[p] = {"runs": len(mine), "stuck": round(sum(float(r["stuck"]) for r in mine), 6),
                         "outcomes": {o: sum(r["outcome"] == o for r in mine) for o in sorted({r["outcome"] for r in mine})}}
    return {
        "scenario": sw.base.name, "vary": {v.key: v.labels() for v in sw.varies}, "policies": sw.policies,
        "repeat": sw.repeat, "runs": len(sw.runs()), "rows": len(rows),
        "errors": sum(r["outcome"] == "error" for r in rows),
        "finished_now": finished, "elapsed_s": round(elapsed, 2),
        "runs_per_minute": round(finished / elapsed * 60, 2) if elapsed > 0 and finished else 0.0,
        "executor": f"dask {address}" if address else "local", "workers": nworkers,
        "per_policy": per_policy, "csv": str(csv_path), "heatmap": str(figure) if figure else None,
    }


def _print_summary(console: Console, s: dict[str, Any]) -> None:
    t = Table(title=f"netswap sweep {s['scenario']}: {s['rows']}/{s['runs']} runs")
    for c in ("policy", "runs", "stuck", "P(stuck)", "outcomes"):
        t.add_column(c, justify="left" if c in ("policy", "outcomes") else "right")
    for p, d in s["per_policy"].items():
        frac = f"{d['stuck'] / d['runs']:.2f}" if d["runs"] else "-"
        t.add_row(p, str(d["runs"]), f"{d['stuck']:g}", frac, ", ".join(f"{k} {v}" for k, v in d["outcomes"].items()))
    console.print(t)
    console.print(f"{s['finished_now']:g} runs in {s['elapsed_s']:.0f} s on {s['executor']} ({s['workers']} worker{'' if s['workers'] == 1 else 's'}): "
                  f"{s['runs_per_minute']} runs/min; table {s['csv']}" + (f"; heatmap {s['heatmap']}" if s["heatmap"] else ""))
