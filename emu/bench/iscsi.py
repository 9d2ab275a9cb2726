"""`netswap bench iscsi`: libiscsi's iscsi-perf against our target and against tgtd, same run.

Both targets serve a fresh file-backed LUN on loopback; iscsi-perf reads 4 KiB at a time with 32
commands in flight, alternating between the two targets for a few rounds of equal length (the
machine is shared and its load changes), and the mean of its "iops average" per run is each
figure. Needs root (tgtd) and the Debian packages tgt and libiscsi-bin.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from emu.bench.result import BenchResult, emit
from emu.cli import CONTEXT
from emu.util.units import parse_size
from emu.peers import iscsi as peer

_IOPS = re.compile(rb"iops average (\d+)")


def iscsi_perf(url: str, seconds: float, in_flight: int, blocks: int) -> int:
    """Run iscsi-perf for `seconds`, stop it with SIGINT, return its last "iops average"."""
    exe = shutil.which("iscsi-perf")
    if exe is None:
        raise click.ClickException("iscsi-perf not found (apt-get install libiscsi-bin)")
    proc = subprocess.Popen([exe, "-m", str(in_flight), "-b", str(blocks), url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(seconds)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    found = _IOPS.findall(out)
    if not found:
        raise click.ClickException(f"iscsi-perf against {url} reported nothing: {out[-300:].decode(errors='replace')}")
    return int(found[-1])


@click.command(context_settings=CONTEXT)
@click.option("--seconds", type=click.FloatRange(1, 600), default=6.0, show_default=True, help="Total iscsi-perf time against each target.")
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True, help="Alternate the targets this many times (fair on a noisy machine).")
@click.option("--in-flight", type=click.IntRange(1, 256), default=32, show_default=True, help="Commands in flight (iscsi-perf -m).")
@click.option("--block-kib", type=click.IntRange(1, 1024), default=4, show_default=True, help="Read size in KiB (512-byte blocks).")
@click.option("--size", default="64M", show_default=True, help="LUN size for both targets.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_iscsi(seconds: float, rounds: int, in_flight: int, block_kib: int, size: str, as_json: bool) -> None:
    """iscsi-perf (4 KiB reads, 32 in flight) against `netswap serve iscsi` vs tgtd.

    Prints both IOPS and our/tgtd ratio (goal: >= 0.5). Needs root for tgtd.
    """
    try:
        nbytes = parse_size(size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--size'") from None
    if os.geteuid() != 0:
        raise click.ClickException("tgtd needs root: run as root (sudo)")
    console = Console(stderr=True)
    blocks = block_kib * 2
    per_run = seconds / rounds
    ours_runs: list[int] = []
    tgt_runs: list[int] = []
    with tempfile.TemporaryDirectory(prefix="netswap-bench-iscsi-") as tmp:
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console, transient=True, disable=as_json) as progress:
            bar = progress.add_task("starting targets", total=2 * rounds)
            try:
                with peer.netswap_target(os.path.join(tmp, "netswap"), size=size, extra=["--nop-interval", "0"]) as ours, \
                        peer.tgtd(os.path.join(tmp, "tgtd"), size=nbytes, digests=False) as tgt:
                    # Interleaved rounds, so both targets see the same (shared, noisy) machine.
                    for r in range(rounds):
                        progress.update(bar, description=f"round {r + 1}/{rounds}: iscsi-perf vs netswap")
                        ours_runs.append(iscsi_perf(ours.url(), per_run, in_flight, blocks))
                        progress.update(bar, advance=1, description=f"round {r + 1}/{rounds}: iscsi-perf vs tgtd")
                        tgt_runs.append(iscsi_perf(tgt.url(), per_run, in_flight, blocks))
                        progress.update(bar, advance=1)
            except (FileNotFoundError, RuntimeError) as e:
                raise click.ClickException(f"could not start the targets: {e}") from None
    ours_iops = sum(ours_runs) / len(ours_runs)
    tgt_iops = sum(tgt_runs) / len(tgt_runs)
    result = BenchResult(
        name=f"iscsi-perf {block_kib} KiB reads, {in_flight} in flight",
        unit="IOPS",
        figure=float(ours_iops),
        baseline=float(tgt_iops),
        baseline_name="tgtd",
        extra={"seconds": seconds, "rounds": rounds, "in_flight": in_flight, "block_bytes": blocks * 512, "goal_ratio": 0.5,
               "netswap_runs": ours_runs, "tgtd_runs": tgt_runs},
    )
    emit([result], as_json)
    if not as_json and result.ratio < 0.5:
        console.print(f"[yellow]ratio {result.ratio:.2f} is below the goal of 0.5[/yellow]")
