"""`netswap demo`: the whole story, side by side, in under two minutes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console

from emu import scenario as scen
from emu.util.cli import OneLineCommand
from emu.kernel.policy import Policy

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DEMO_BACKENDS = scen.BACKENDS


def next_steps(out: Path, results: list, base: scen.Scenario) -> list[str]:
    """The footer: where the files are and the commands that dig deeper."""
    steps = [f"xdg-open {out / 'report.html'}    # everything below in one page, works offline"]
    for r in results:
        if r.files.get("report"):
            steps.append(f"less {r.files['report']}")
    stuck = next((r for r in results if r.policy is Policy.NONE), results[0] if results else None)
    if stuck is not None:
        b = stuck.backend
        shipped = base.source.endswith("(shipped)")
        scen_arg = "" if base.name == "demo" and shipped else f"{base.name if shipped else base.source} "
        pcap = stuck.files.get("pcap")
        if pcap is None:
            pcap = f"{b}-none.pcapng"
            steps.append(f"netswap run {scen_arg}--backend {b} --policy none --pcap {pcap} --dropwatch")
        steps.append(f"tshark -r {pcap} -Y 'frame.comment contains \"DROP\"' | head")
        steps.append(f"netswap run {scen_arg}--backend {b} --policy v12 --proc-dir /tmp/{b}-v12 &  watch cat /tmp/{b}-v12/meminfo")
        others = [r for r in results if r.backend == b and r.policy is not Policy.NONE]
        if others and stuck.files.get("json") and others[0].files.get("json"):
            steps.append(f"netswap compare {stuck.files['json']} {others[0].files['json']}")
    first = results[0].files.get("timeline_csv") if results else None
    if first:  # (one file: a redirect from a glob of several is an error in bash)
        steps.append(f"column -s, -t < {first} | less -S    # the data behind every plot")
    return steps


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder for the PNG timelines, their CSV/JSON-lines data, reports, report.html and summary.json (default: a new netswap-demo-<time> folder here).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(scen.BACKENDS), help="Backends to show (repeatable; default all three).")
@click.option("--policy", "policy_names", multiple=True, type=click.Choice(scen.POLICIES), help="Policies to show (repeatable; default all three).")
@click.option("--scenario", "scenario_file", metavar="SCENARIO", help="Scenario file or shipped name (default: demo). Its [expect] table says which verdict each policy should reach.")
@click.option("--pcap", is_flag=True, help="Also write each run's frames as pcapng into --out (BACKEND-POLICY.pcapng; see netswap run --pcap).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def demo(out_dir: str | None, backends: tuple[str, ...], policy_names: tuple[str, ...], scenario_file: str | None,
         pcap: bool, as_json: bool) -> None:
    """Run the whole story: each policy over NFS/UDP, NFS/TCP and iSCSI, side by side.

    The same emulated host, the same workload and the same background traffic run under `none`
    (a vanilla kernel: the swap write's reply cannot be received and the host gets stuck), `v12`
    (the seed's memory reserve) and `pfmemalloc` (Linux 3.6), which complete with every page
    verified. The host runs in emulated time, so the verdicts are the model's on any machine.
    Writes per run a PNG timeline with its data (CSV, JSON lines), a JSON result and for a stuck
    run its report, plus summary.png, summary.json and a self-contained report.html into --out.

    The result table and the next steps go to stdout, the live progress to stderr.

    Exit status: 0 when every run reached the verdict the scenario expects ([expect]), 1 otherwise,
    130/143 when interrupted by SIGINT/SIGTERM (the runs finished so far are shown and in
    summary.json).
    """
    progress_console = Console(stderr=True, width=None if sys.stderr.isatty() else 100)
    console = progress_console if as_json else Console(width=None if sys.stdout.isatty() else 100)
    try:
        base = scen.load(scenario_file) if scenario_file else scen.default()
    except scen.ScenarioError as e:
        progress_console.print(f"[red]error:[/] --scenario: {e}")
        sys.exit(EXIT_USAGE)
    out = Path(out_dir) if out_dir else Path.cwd() / time.strftime("netswap-demo-%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        click.echo(f"netswap: error: --out {out}: cannot create it: {e.strerror or e}", err=True)
        sys.exit(EXIT_USAGE)
    backends = backends or DEMO_BACKENDS
    policies = tuple(Policy(p) for p in policy_names or scen.POLICIES)

    from emu.host import run_matrix
    from emu.host.html import render
    from emu.host.observe import Observe
    from emu.host.progress import LiveProgress
    from emu.host.report import results_table
    from emu.host.result import RunInterrupted
    from emu.host.timeline import plot_summary
    from emu.util.signals import exit_interrupted, is_interrupt, sigterm_as_interrupt

    def observe_for(sc: scen.Scenario) -> Observe | None:
        return Observe(pcap=out / f"{sc.backend}-{sc.policy}.pcapng") if pcap else None

    from emu.commands.run import announce_traffic_fallback

    announce_traffic_fallback(base.traffic.profile)
    started = time.monotonic()
    interrupted: int | None = None
    with sigterm_as_interrupt() as sig:
        try:
            with LiveProgress(progress_console) as live:
                for b in backends:
                    for p in policies:
                        live.add_run(b, p)
                results = run_matrix(base, backends, policies, out_dir=out, progress=live.update,
                                     observe_for=observe_for)
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
    exp = base.expect
    ok = interrupted is None and all(exp.allows(r.policy, r.outcome) and r.integrity["mismatches"] == 0
                                     for r in results)
    expected = {p.value: exp.wants(p) for p in policies}
    rows = [(r.backend, r.policy, r.outcome, r.timeline, (r.stall or {}).get("t"))
            for r in results if r.timeline is not None]
    # an interrupted demo may have finished no run: no figure then
    summary_png = plot_summary(rows, out / "summary.png", f"netswap demo — scenario {base.name}") if rows else None
    steps = next_steps(out, results, base)
    runs_json = [r.to_json() for r in results]
    summary = {
        "scenario": base.name,
        "elapsed_s": round(elapsed, 2),
        "expected": expected,
        "as_expected": ok,
        "files": {"report_html": str(out / "report.html"), "summary_png": str(summary_png) if summary_png else None},
        "interrupted": sig.name if interrupted is not None else None,
        "runs": runs_json,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    exp_text = ", ".join(f"{p} {w}" for p, w in expected.items())
    (out / "report.html").write_text(render(
        runs_json, title=f"netswap demo — scenario {base.name}", summary_png=str(summary_png) if summary_png else None,
        intro=f"{base.description} Expected: {exp_text}. "
              f"{'Every run as expected.' if ok else 'NOT every run as expected.'} {elapsed:.0f} s wall.",
        footer=steps))
    for r in results:
        stall = f" at t={r.stall['t']:.2f} s, free pages {r.stall['nr_free']}" if r.stall else ""
        mark = "" if exp.allows(r.policy, r.outcome) else f"  (expected {exp.wants(r.policy)})"
        console.print(f"{r.backend}/{r.policy}: {r.outcome}{stall}{mark}", markup=False, highlight=False)
    if ok:
        console.print(f"[green]as expected[/] ({exp_text}), every page verified.")
    else:
        console.print(f"[red]NOT as expected[/] ({exp_text}): see the table and the reports.")
    console.print("\n[bold]Next steps[/]")
    for step in steps:
        console.print(f"  {step}", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    if interrupted is not None:
        click.echo(f"netswap: interrupted by {sig.name} after {len(results)} finished runs; servers stopped", err=True)
        exit_interrupted(sig)
    sys.exit(EXIT_OK if ok else EXIT_ERROR)
