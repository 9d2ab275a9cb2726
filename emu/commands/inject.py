"""`netswap inject`: bounded background traffic (scapy) to loopback ports."""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from emu.cli import CONTEXT, EXIT_ERROR
from emu.traffic.profiles import Profile
from emu.traffic.spec import DEFAULT_DURATION, DEFAULT_RATE, InjectStats, SpecError, TrafficSpec
from emu.traffic.target import DEFAULT_SPOOF, TargetError

FLAG = {"to": "--to", "host": "--to", "ports": "--to", "method": "--no-spoof"}


def _rate(value: str) -> float | None:
    """Messages/s, or None (unpaced) for 'max'. 0 is refused, not taken to mean unlimited:
    unpaced must be asked for by name."""
    if value.strip().lower() in ("max", "unlimited"):
        return None
    try:
        rate = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of messages/s (or 'max')", param_hint="--rate") from None
    if not rate > 0:  # also NaN
        raise click.BadParameter(f"{value} is not > 0 messages/s; for unpaced sending say --rate max", param_hint="--rate")
    return rate


def _usage(exc: TargetError | SpecError) -> click.BadParameter:
    return click.BadParameter(str(exc), param_hint=FLAG.get(exc.param, "--" + exc.param.replace("_", "-")))


def stats_table(stats: InjectStats) -> Table:
    t = Table(title=f"netswap inject: {stats.profile} ({stats.method})", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    unit = {"tcp-stream": "writes", "mixed": "messages"}.get(stats.profile, "datagrams")
    t.add_row(f"{unit} sent", f"{stats.sent:,}")
    if stats.packets and stats.packets != stats.sent:
        t.add_row("IP packets sent", f"{stats.packets:,}")
    t.add_row("bytes", f"{stats.bytes:,}")
    t.add_row("elapsed", f"{stats.elapsed:.3f} s")
    t.add_row("achieved rate", f"{stats.rate:,.0f} {unit}/s")
    if stats.packets and stats.packets != stats.sent:
        t.add_row("achieved packet rate", f"{stats.pps:,.0f} packets/s")
    t.add_row("throughput", f"{stats.bytes / stats.elapsed / 1e6:,.1f} MB/s" if stats.elapsed else "-")
    if stats.connections or stats.refused:
        t.add_row("TCP connections", f"{stats.connections} up, {stats.refused} failed")
    t.add_row("send errors", f"{stats.errors:,}" + (f" (first: {stats.first_error})" if stats.first_error else ""))
    t.add_row("stopped by", stats.stopped)
    return t


@click.command(context_settings=CONTEXT)
@click.option("--to", "to", required=True, metavar="HOST:PORT[,PORT...]", help="Destination(s); HOST must be in 127.0.0.0/8.")
@click.option("--profile", type=click.Choice([p.value for p in Profile]), default=Profile.UDP_FLOOD.value, show_default=True,
              help="udp-flood: datagrams from spoofed sources; frag: IP fragments; tcp-stream: TCP connections streaming; mixed: a blend.")
@click.option("--rate", default=str(int(DEFAULT_RATE)), show_default=True, metavar="N|max", help="Messages per second (datagrams, or TCP writes), > 0; 'max' for unpaced (as fast as the socket takes them).")
@click.option("--duration", type=float, default=DEFAULT_DURATION, show_default=True, metavar="S", help="Stop after S seconds (always bounded; at most 3600).")
@click.option("--count", type=int, default=None, metavar="N", help="Stop after N messages (whichever of count and duration comes first).")
@click.option("--spoof", default=DEFAULT_SPOOF, show_default=True, metavar="CIDR", help="Source range for spoofed sources (inside 127.0.0.0/8). Needs root.")
@click.option("--no-spoof", is_flag=True, help="Do not spoof: udp-flood then uses an ordinary UDP socket and needs no root.")
@click.option("--size", type=int, default=None, metavar="B", help="Payload bytes per message (default: udp-flood/mixed 512, frag 4000, tcp-stream 16384).")
@click.option("--incomplete", is_flag=True, help="frag/mixed: leave out the last fragment of each datagram (fills the reassembly queue).")
@click.option("--fragsize", type=int, default=1480, show_default=True, metavar="B", help="IP payload bytes per fragment (multiple of 8).")
@click.option("--connections", type=int, default=8, show_default=True, metavar="N", help="tcp-stream/mixed: TCP connections to open.")
@click.option("--distinct", type=int, default=1024, show_default=True, metavar="N", help="Distinct packets (sources x IP IDs) built before the pool repeats.")
@click.option("--fallback/--no-fallback", default=None,
              help="Without root: run udp-flood --no-spoof over ordinary sockets instead (default: ask when interactive, else refuse).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def inject(to: str, profile: str, rate: str, duration: float, count: int | None, spoof: str, no_spoof: bool, size: int | None,
           incomplete: bool, fragsize: int, connections: int, distinct: int, fallback: bool | None, as_json: bool) -> None:
    """Send bounded background traffic to loopback ports.

    Packets are built once with scapy and sent as raw bytes on one raw socket; every run is
    bounded by --rate, --duration and --count and stops by itself. Only 127.0.0.0/8 may be a
    target. Spoofing and fragments need root (CAP_NET_RAW); `--profile udp-flood --no-spoof`
    and tcp-stream need none.

    \b
    Examples:
      sudo netswap inject --to 127.0.0.1:9000,9001 --profile udp-flood --rate 50000 --duration 10
      sudo netswap inject --to 127.0.0.1:2049 --profile frag --incomplete --count 5000
      netswap inject --to 127.0.0.1:9000 --no-spoof --rate max --duration 2
      netswap inject --to 127.0.0.1:3260 --profile tcp-stream --connections 64 --duration 5
    """
    from emu.traffic.api import make_spec, resolve, run
    from emu.traffic.rawsend import NeedsRawError

    err = Console(stderr=True)
    # Everything is validated here, before any packet is built or any socket exists.
    try:
        spec = make_spec(TrafficSpec(profile=profile), to, rate=_rate(rate), duration=duration, count=count,
                         spoof=None if no_spoof else spoof, size=size, incomplete=incomplete, fragsize=fragsize,
                         connections=connections, distinct=distinct)
    except (TargetError, SpecError) as exc:
        raise _usage(exc) from None

    try:
        spec, notes = resolve(spec, fallback=bool(fallback))
    except NeedsRawError as exc:
        click.echo(f"netswap inject: {exc}", err=True)
        if fallback is None and sys.stdin.isatty() and click.confirm("Run udp-flood without spoofing over an ordinary socket instead?", err=True):
            spec, notes = spec.without_raw(), ["ran the unprivileged fallback (udp-flood --no-spoof)"]
        else:
            sys.exit(EXIT_ERROR)
    for note in notes:
        err.print(f"[yellow]note:[/] {note}")

    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())  # first Ctrl-C: stop and report
    try:
        stats = _run_with_progress(run, spec, stop, err, quiet=as_json)
    except ConnectionRefusedError as exc:
        click.echo(f"netswap inject: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    finally:
        signal.signal(signal.SIGINT, previous)
    stats.notes[:0] = notes
    if as_json:
        print(json.dumps(stats.to_json(), indent=2))
    else:
        Console().print(stats_table(stats))
        for note in stats.notes[len(notes):]:
            err.print(f"[yellow]note:[/] {note}")
    if stats.sent == 0:
        sys.exit(EXIT_ERROR)


def _run_with_progress(run: Any, spec: TrafficSpec, stop: threading.Event, console: Console, quiet: bool) -> InjectStats:
    if quiet or not console.is_terminal:
        return run(spec, stop=stop)
    by_count = spec.count is not None and spec.rate is not None and spec.count / spec.rate < spec.duration
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"{spec.profile}", total=spec.count if by_count else spec.duration, status="building packets")

        def update(stats: InjectStats) -> None:
            progress.update(task, completed=stats.sent if by_count else stats.elapsed,
                            status=f"{stats.sent:,} sent, {stats.rate:,.0f}/s")

        return run(spec, stop=stop, on_progress=update)
