"""`netswap bench inject`: the injector's packets/s against a plain UDP sendto() loop, same run."""

from __future__ import annotations

import socket
import time
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress

from emu.bench.result import BenchResult, emit
from emu.cli import CONTEXT


GOAL = 0.5  # issue 5: the injector keeps at least half the pace of the plainest sender


def _sink() -> socket.socket:
    """A bound UDP socket nobody reads: every sender pays the same delivery (then drop) cost."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def sendto_loop(port: int, size: int, count: int) -> float:
    """The baseline: the plainest Python UDP sender. Returns datagrams/s."""
    from emu.traffic.profiles import payload

    data, addr = payload(size), ("127.0.0.1", port)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    try:
        sendto = s.sendto
        t0 = time.perf_counter()
        for _ in range(count):
            sendto(data, addr)
        return count / (time.perf_counter() - t0)
    finally:
        s.close()


def injector(port: int, size: int, count: int, **fields: Any) -> tuple[float, float]:
    """Run the injector unpaced for `count` datagrams; returns (datagrams/s, packets/s)."""
    from emu.traffic.api import run
    from emu.traffic.spec import TrafficSpec

    stats = run(TrafficSpec(ports=(port,), rate=None, duration=60.0, count=count, size=size, **fields))
    if stats.errors:
        raise click.ClickException(f"injector send errors: {stats.errors} (first: {stats.first_error})")
    return stats.rate, stats.pps


@click.command(context_settings=CONTEXT)
@click.option("--count", type=int, default=200_000, show_default=True, help="Datagrams per measurement.")
@click.option("--size", type=int, default=64, show_default=True, help="UDP payload bytes.")
@click.option("--repeat", type=int, default=3, show_default=True, help="Measurements of each; the best counts (the machine is shared).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_inject(count: int, size: int, repeat: int, as_json: bool) -> None:
    """Injector packets/s vs a plain UDP sendto loop.

    Measures, alternating and best of --repeat: the plain loop (baseline); udp-flood with spoofed
    sources on the raw socket (needs root); udp-flood --no-spoof (ordinary socket); frag (IP
    fragments/s). All go to one bound, unread UDP socket on 127.0.0.1. Goal: ratio >= 0.5.
    """
    from emu.traffic.rawsend import have_cap_net_raw

    if count < 1 or repeat < 1:
        raise click.BadParameter("must be >= 1", param_hint="--count/--repeat")
    raw = have_cap_net_raw()
    sink = _sink()
    port = sink.getsockname()[1]
    cases: dict[str, Any] = {"no-spoof": lambda: injector(port, size, count, spoof=None)}
    if raw:
        cases = {"udp-flood": lambda: injector(port, size, count),
                 **cases,
                 "frag": lambda: injector(port, 4000, max(1, count // 6), profile="frag")}
    best: dict[str, tuple[float, float]] = {}
    base = 0.0
    err = Console(stderr=True)
    try:
        with Progress(console=err, transient=True, disable=as_json or not err.is_terminal) as progress:
            task = progress.add_task("bench inject", total=repeat * (1 + len(cases)))
            for _ in range(repeat):
                base = max(base, sendto_loop(port, size, count))
                progress.advance(task)
                for name, fn in cases.items():
                    r = fn()
                    if r[1] > best.get(name, (0.0, 0.0))[1]:
                        best[name] = r
                    progress.advance(task)
    finally:
        sink.close()
    results = []
    common = {"count": count, "size": size, "repeat": repeat, "goal_ratio": GOAL}
    if raw:
        results.append(BenchResult("inject udp-flood (raw, spoofed)", "pkt/s", best["udp-flood"][1], base, "plain sendto loop", extra=common))
    results.append(BenchResult("inject udp-flood --no-spoof (socket)", "pkt/s", best["no-spoof"][1], base, "plain sendto loop", extra=common))
    if raw:
        results.append(BenchResult("inject frag (raw, 4000 B in 3 fragments)", "pkt/s", best["frag"][1], base, "plain sendto loop",
                                   extra={**common, "size": 4000, "datagrams_per_s": best["frag"][0]}))
    emit(results, as_json)
    for r in results:
        if r.ratio < GOAL and not as_json:
            err.print(f"[yellow]below the goal:[/] {r.name} ratio {r.ratio:.2f} < {GOAL} (a busy machine? try --repeat 5)")
    if not raw and not as_json:
        err.print("note: no CAP_NET_RAW, so only the unprivileged fallback was measured; run with sudo for the raw socket")
