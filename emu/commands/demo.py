"""`netswap demo`: the whole story, side by side, in under two minutes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console

from emu import scenario as scen
from emu.commands.run import OneLineCommand

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DEMO_BACKENDS = scen.BACKENDS
EXPECTED = {"none": ("deadlock", "livelock"), "v12": ("completed",), "pfmemalloc": ("completed",)}


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder for the PNG timelines, reports and summary.json (default: a new netswap-demo-<time> folder here).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(scen.BACKENDS), help="Backends to show (repeatable; default all three).")
@click.option("--policy", "policies", multiple=True, type=click.Choice(scen.POLICIES), help="Policies to show (repeatable; default all three).")
@click.option("--scenario", "scenario_file", metavar="SCENARIO", help="Scenario file or shipped name (default: demo).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def demo(out_dir: str | None, backends: tuple[str, ...], policies: tuple[str, ...], scenario_file: str | None,
         as_json: bool) -> None:
    """Run the whole story: each policy over NFS/UDP, NFS/TCP and iSCSI, side by side.

    The same emulated host, the same workload and the same background traffic run under `none`
    (a vanilla kernel: the swap write's reply cannot be received and the host gets stuck), `v12`
    (the seed's memory reserve) and `pfmemalloc` (Linux 3.6), which complete with every page
    verified. The host runs in emulated time, so the verdicts are the model's on any machine.
    Writes a PNG timeline and a report per run and summary.json into --out.

    Exit status: 0 when every run had its expected outcome, 1 otherwise, 130/143 when
    interrupted by SIGINT/SIGTERM (the runs finished so far are shown and in summary.json).
    """
    stream_tty = (sys.stderr if as_json else sys.stdout).isatty()
    console = Console(stderr=as_json, width=None if stream_tty else 140)
    try:
        base = scen.load(scenario_file) if scenario_file else scen.default()
    except scen.ScenarioError as e:
        console.print(f"[red]error:[/] --scenario: {e}")
        sys.exit(EXIT_USAGE)
    out = Path(out_dir) if out_dir else Path.cwd() / time.strftime("netswap-demo-%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        click.echo(f"netswap: error: --out {out}: cannot create it: {e.strerror or e}", err=True)
        sys.exit(EXIT_USAGE)
    backends = backends or DEMO_BACKENDS
    policies = policies or scen.POLICIES

    from emu.host import run_matrix
    from emu.host.report import LiveProgress, results_table
    from emu.host.result import RunInterrupted
    from emu.util.signals import exit_interrupted, is_interrupt, sigterm_as_interrupt

    from emu.commands.run import announce_traffic_fallback

    announce_traffic_fallback(base.traffic.profile)
    started = time.monotonic()
    interrupted: int | None = None
    with sigterm_as_interrupt() as sig:
        try:
            with LiveProgress(console) as live:
                for b in backends:
                    for p in policies:
                        live.add_run(b, p)
                results = run_matrix(base, backends, policies, out_dir=out, progress=live.update)
        except BaseException as e:
            if not is_interrupt(e):
                if not isinstance(e, Exception):
                    raise
                from emu.commands.run import one_line

                click.echo(f"netswap: error: {one_line(e)}", err=True)
                sys.exit(EXIT_ERROR)
            # an interrupted demo still shows (and writes) the runs it finished
            results = [r for r in e.results if r.outcome != "interrupted"] if isinstance(e, RunInterrupted) else []
            interrupted = sig.exit_status
    elapsed = time.monotonic() - started
    title = f"netswap demo — scenario {base.name}, {elapsed:.0f} s"
    if interrupted is not None:
        title += f" (interrupted by {sig.name}: {len(results)} of {len(backends) * len(policies)} runs finished)"
    if results:
        results_table(console, results, title=title)
    ok = interrupted is None and all(r.outcome in EXPECTED[r.policy] and r.integrity["mismatches"] == 0 for r in results)
    summary = {
        "scenario": base.name,
        "elapsed_s": round(elapsed, 2),
        "as_expected": ok,
        "interrupted": sig.name if interrupted is not None else None,
        "runs": [r.to_json() for r in results],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        stall = f" at t={r.stall['t']:.2f} s, free pages {r.stall['nr_free']}" if r.stall else ""
        console.print(f"{r.backend}/{r.policy}: {r.outcome}{stall} — timeline {r.files.get('timeline', '-')}")
    console.print(f"summary: {out / 'summary.json'}")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    if interrupted is not None:
        click.echo(f"netswap: interrupted by {sig.name} after {len(results)} finished runs; servers stopped", err=True)
        exit_interrupted(sig)
    if ok:
        console.print("[green]as expected:[/] `none` got stuck; `v12` and `pfmemalloc` completed with every page verified.")
    else:
        console.print("[red]NOT as expected[/]: see the table and the reports above.")
    sys.exit(EXIT_OK if ok else EXIT_ERROR)
