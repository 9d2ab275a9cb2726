"""`netswap bench iscsi`: our target against tgtd, same machine, same run.

Three workloads, each against both targets in alternating rounds (the machine is shared and its
load changes), each figure the median of its rounds:
- reads: libiscsi's `iscsi-perf`, 4 KiB reads, 32 in flight (its "iops average");
- random 4 KiB writes with FUA, and random 4 KiB writes each followed by a SYNCHRONIZE CACHE of
  its range: iscsi-perf cannot write, so netswap's own initiator drives both targets the same way,
  16 commands in flight (the emulated host's queue depth).
Beside the IOPS: each target's own CPU time per operation (its process, all threads).
Both targets serve a fresh file-backed LUN on loopback, in the same directory: /dev/shm by default
(tmpfs, as the emulated host's LUN), so the figures are the targets' own costs; `--dir` on a disk
measures the disk's fsync as well (where tgtd's FUA is a sync_file_range of the range, and ours an
fdatasync of the file, shared by every write executed meanwhile). Needs root (tgtd) and the Debian
packages tgt and libiscsi-bin.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import click
import trio
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from emu.bench.result import BenchResult, emit, emit_cpu, round_ratios
from emu.cli import CONTEXT
from emu.peers import iscsi as peer
from emu.util.procs import cpu_seconds, stop_process
from emu.util.units import SIZE_HELP, parse_size
from iscsi.initiator import Initiator

_IOPS = re.compile(rb"iops average (\d+)")
GOAL = 1.0
PAGE = 4096
MIN_RUN = 2.0  # seconds per workload run: iscsi-perf prints no average for less than a second (login included)


def iscsi_perf(url: str, seconds: float, in_flight: int, blocks: int) -> float:
    """Run iscsi-perf for `seconds`, stop it with SIGINT, return its last "iops average"."""
    exe = shutil.which("iscsi-perf")
    if exe is None:
        raise click.ClickException("iscsi-perf not found (apt-get install libiscsi-bin)")
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: it never fills while we sleep
        proc = subprocess.Popen([exe, "-m", str(in_flight), "-b", str(blocks), url], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            time.sleep(seconds)
        finally:
            stop_process(proc, grace=10, sig=signal.SIGINT)  # it prints its averages on SIGINT
        log.seek(0)
        out = log.read()
    found = _IOPS.findall(out)
    if not found:
        raise click.ClickException(f"iscsi-perf against {url} reported nothing: {out[-300:].decode(errors='replace')}")
    return float(found[-1])


async def _random_writes(port: int, iqn: str, lun: int, seconds: float, in_flight: int, durability: str) -> float:
    """Random page writes with FUA (or each followed by SYNCHRONIZE CACHE of its range) from
    `in_flight` workers for `seconds`; returns completed writes per second."""

    async def connect() -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    page = os.urandom(PAGE)
    done = 0
    async with Initiator(connect, iqn, lun=lun, command_timeout=30) as ini:
        per = PAGE // ini.block_size
        slots = ini.nblocks // per
        rng = random.Random(7143)
        deadline = trio.current_time() + seconds

        async def worker() -> None:
            nonlocal done
            while trio.current_time() < deadline:
                lba = rng.randrange(slots) * per
                if durability == "fua":
                    await ini.write(lba, page, fua=True)
                else:
                    await ini.write(lba, page)
                    await ini.synchronize_cache(lba, per)
                done += 1

        start = trio.current_time()
        async with trio.open_nursery() as n:
            for _ in range(in_flight):
                n.start_soon(worker)
        elapsed = trio.current_time() - start
    return done / elapsed


def random_writes(port: int, iqn: str, lun: int, seconds: float, in_flight: int, durability: str) -> float:
    return trio.run(_random_writes, port, iqn, lun, seconds, in_flight, durability)


@dataclass
class Workload:
    name: str
    run: Callable[[peer.Daemon, float], float]
    ours: list[float]
    tgtd: list[float]
    ours_cpu: list[float] = field(default_factory=list)  # the target's own CPU µs per operation, per run
    tgtd_cpu: list[float] = field(default_factory=list)


@click.command(context_settings=CONTEXT)
@click.option("--seconds", type=click.FloatRange(1, 600), default=6.0, show_default=True,
              help="Time per workload against each target (split over the rounds).")
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Alternate the targets this many times (fair on a noisy machine).")
@click.option("--in-flight", type=click.IntRange(1, 256), default=32, show_default=True, help="Reads in flight (iscsi-perf -m).")
@click.option("--write-depth", type=click.IntRange(1, 256), default=16, show_default=True, help="Writes in flight.")
@click.option("--size", default="64M", show_default=True, help=f"LUN size for both targets ({SIZE_HELP}).")
@click.option("--dir", "where", type=click.Path(file_okay=False, exists=True), default=None,
              help="Where both LUN files go [default: /dev/shm if present, else the temporary directory].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_iscsi(seconds: float, rounds: int, in_flight: int, write_depth: int, size: str, where: str | None,
                as_json: bool) -> None:
    """Our target vs tgtd: 4 KiB reads (iscsi-perf), random 4 KiB writes with FUA and with
    SYNCHRONIZE CACHE (netswap's initiator driving both). Prints IOPS and our/tgtd ratios (goal:
    >= 1.0), and each target's own CPU time per operation. Needs root for tgtd."""
    try:
        nbytes = parse_size(size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--size'") from None
    if nbytes < 1 << 20 or nbytes % PAGE:
        raise click.BadParameter("at least 1M, a whole number of 4 KiB pages", param_hint="'--size'")
    per_run = seconds / rounds
    if per_run < MIN_RUN:
        raise click.BadParameter(f"{seconds:g} s over {rounds} rounds is {per_run:.2g} s per run; iscsi-perf reports "
                                 f"its average only after whole seconds of reads: give at least {MIN_RUN:g} s per "
                                 f"round (--seconds {MIN_RUN * rounds:g} for {rounds} rounds)", param_hint="'--seconds'")
    if os.geteuid() != 0:
        raise click.ClickException("tgtd needs root: run as root (sudo)")
    console = Console(stderr=True)
    workloads = [
        Workload(f"iscsi-perf 4 KiB reads, {in_flight} in flight",
                 lambda d, s: iscsi_perf(d.url(), s, in_flight, PAGE // 512), [], []),
        Workload(f"random 4 KiB writes, FUA, {write_depth} in flight",
                 lambda d, s: random_writes(d.port, d.iqn, d.lun, s, write_depth, "fua"), [], []),
        Workload(f"random 4 KiB writes + SYNCHRONIZE CACHE, {write_depth} in flight",
                 lambda d, s: random_writes(d.port, d.iqn, d.lun, s, write_depth, "sync_cache"), [], []),
    ]
    if where is None and os.path.isdir("/dev/shm"):
        where = "/dev/shm"
    with tempfile.TemporaryDirectory(prefix="netswap-bench-iscsi-", dir=where) as tmp:
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                      transient=True, disable=as_json) as progress:
            bar = progress.add_task("starting targets", total=2 * rounds * len(workloads))
            try:
                with peer.netswap_target(os.path.join(tmp, "netswap"), size=size, extra=["--nop-interval", "0"]) as ours, \
                        peer.tgtd(os.path.join(tmp, "tgtd"), size=nbytes, digests=False) as tgt:
                    for r in range(rounds):
                        for w in workloads:
                            # Interleaved, and the order flips every round: both targets see the same machine.
                            order = [(ours, w.ours, w.ours_cpu), (tgt, w.tgtd, w.tgtd_cpu)]
                            for daemon, runs, cpus in order if r % 2 == 0 else reversed(order):
                                who = "netswap" if daemon is ours else "tgtd"
                                progress.update(bar, description=f"round {r + 1}/{rounds}: {w.name} vs {who}")
                                c0 = cpu_seconds(daemon.proc.pid)
                                ops_per_s = w.run(daemon, per_run)
                                cpu = cpu_seconds(daemon.proc.pid) - c0
                                runs.append(ops_per_s)
                                # (operations: about the rate times the run's length)
                                cpus.append(round(cpu / (ops_per_s * per_run) * 1e6, 2) if ops_per_s else 0.0)
                                progress.update(bar, advance=1)
            except (FileNotFoundError, peer.PeerError) as e:
                raise click.ClickException(f"could not start the targets: {e}") from None
    results = [
        BenchResult(name=w.name, unit="IOPS", figure=statistics.median(w.ours), baseline=statistics.median(w.tgtd),
                    baseline_name="tgtd", rounds=round_ratios(w.ours, w.tgtd, higher_is_better=True),
                    extra={"seconds": seconds, "rounds": rounds, "goal_ratio": GOAL, "dir": where,
                           "netswap_runs": w.ours, "tgtd_runs": w.tgtd,
                           "netswap_cpu_us_per_op": w.ours_cpu, "tgtd_cpu_us_per_op": w.tgtd_cpu})
        for w in workloads
    ]
    emit(results, as_json, goal=GOAL)
    if not as_json:
        # Each target's own CPU time (its process, all threads) per operation: less exposed to
        # the machine's load than the IOPS, which the initiators' CPU shares bound.
        emit_cpu([(w.name, w.ours_cpu, w.tgtd_cpu) for w in workloads],
                 "target CPU per operation (median of the rounds; /proc/PID/stat, 10 ms steps)", "workload",
                 "netswap", "tgtd", "µs", ".1f", "tgtd/netswap above 1: ours spent less per operation.")
        for res in results:
            if res.ratio < GOAL:
                console.print(f"[yellow]{res.name}: ratio {res.ratio:.2f} is below the goal of {GOAL}[/yellow]")
