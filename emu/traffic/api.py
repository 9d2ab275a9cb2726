"""The injector's Python API, for the CLI, scenarios and tests.

    stats = run(TrafficSpec(profile="udp-flood", ports=(9000,), rate=50_000, duration=2.0))
    stats = await inject("frag", "127.0.0.1:9000", count=1000, incomplete=True)   # from trio

Order of work in `run`: validate the spec (addresses against loopback: pure, before any socket),
check privileges, build the packets with scapy, open sockets, then the paced send loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from emu.traffic.pacing import Pacer
from emu.traffic.profiles import MIXED_FRAG_SIZE, MIXED_SHARES, Profile
from emu.traffic.spec import InjectStats, TrafficSpec
from emu.traffic.target import TargetError, parse_targets, spread_sources

ProgressFn = Callable[[InjectStats], None]
STOP_AFTER_ERRORS = 1000  # give up if this many sends fail before a single one succeeds


def make_spec(spec: TrafficSpec | Profile | str, to: str | int | Sequence[int] | None = None, **fields: Any) -> TrafficSpec:
    """A validated TrafficSpec from a spec, or from a profile name plus `to`
    ("127.0.0.1:9000,9001", a port, or a list of ports on 127.0.0.1) and field overrides."""
    if not isinstance(spec, TrafficSpec):
        spec = TrafficSpec(profile=spec)
    if to is not None:
        if isinstance(to, str):
            targets = parse_targets(to)
            hosts = {t.host for t in targets}
            if len(hosts) != 1:
                raise TargetError("one host per injection; run one per host", "to")
            fields = {"host": hosts.pop(), "ports": tuple(t.port for t in targets), **fields}
        elif isinstance(to, int):
            fields = {"ports": (to,), **fields}
        else:
            fields = {"ports": tuple(to), **fields}
    if fields:
        spec = spec.replace(**fields)
    return spec.validate()


def resolve(spec: TrafficSpec, fallback: bool = False) -> tuple[TrafficSpec, list[str]]:
    """Validate, then check privileges; with `fallback`, an unprivileged caller gets the
    ordinary-socket udp-flood instead of NeedsRawError. Returns the spec to run and notes."""
    from emu.traffic.rawsend import NeedsRawError, have_cap_net_raw

    spec = spec.validate()
    if spec.needs_raw and not have_cap_net_raw():
        if not fallback:
            raise NeedsRawError(str(spec.profile), "this process lacks CAP_NET_RAW")
        return spec.without_raw(), [f"no CAP_NET_RAW: {spec.profile} replaced by udp-flood without spoofing over an ordinary socket"]
    return spec, []


def open_senders(spec: TrafficSpec, stats: InjectStats) -> Any:
    """Build the packets (scapy) and open the sockets for a validated spec."""
    from emu.traffic.mixed import Blend
    from emu.traffic.profiles import frag_pool, udp_pool
    from emu.traffic.rawsend import RawSender, open_raw_socket
    from emu.traffic.tcpstream import TcpStreams
    from emu.traffic.udpsock import UdpSocketSender

    profile = Profile(spec.profile)
    targets = spec.targets
    assert spec.size is not None
    size: int = spec.size  # narrowed for the closures below
    net = spec.spoof_network()
    sources = spread_sources(net, spec.distinct) if net is not None else [spec.host]

    def tcp() -> TcpStreams:
        streams = TcpStreams(targets, spec.connections, size if profile is Profile.TCP_STREAM else 16384, sources if net is not None else None)
        stats.connections, stats.refused = len(streams.conns), len(streams.refused)
        if streams.refused:
            stats.notes.append(f"{len(streams.refused)} TCP connection(s) failed, e.g. {streams.refused[0]}")
        return streams

    if profile is Profile.TCP_STREAM:
        streams = tcp()
        if not streams.conns:
            raise ConnectionRefusedError(f"tcp-stream: no TCP connection could be made ({streams.refused[0]}); is something listening?")
        stats.method = "socket"
        return streams
    if not spec.needs_raw:
        stats.method = "socket"
        return UdpSocketSender(targets, spec.size)
    stats.method = "raw"
    # Packets first (scapy, slow-ish), then the socket: nothing is open while scapy works.
    if profile is Profile.UDP_FLOOD:
        return RawSender(open_raw_socket(str(profile)), udp_pool(targets, sources, spec.size, spec.distinct))
    if profile is Profile.FRAG:
        return RawSender(open_raw_socket(str(profile)), frag_pool(targets, sources, spec.size, spec.distinct, spec.fragsize, spec.incomplete))
    # mixed: plain datagrams and fragmented ones on one raw socket, plus TCP streams if anyone listens
    udp = udp_pool(targets, sources, spec.size, spec.distinct)
    frag = frag_pool(targets, sources, max(MIXED_FRAG_SIZE, spec.fragsize), spec.distinct, spec.fragsize, spec.incomplete)
    sock = open_raw_socket(str(profile))
    parts: list[tuple[Any, float]] = [(RawSender(sock, udp), MIXED_SHARES[Profile.UDP_FLOOD]), (RawSender(sock, frag), MIXED_SHARES[Profile.FRAG])]
    streams = tcp()
    if streams.conns:
        parts.append((streams, MIXED_SHARES[Profile.TCP_STREAM]))
        stats.method = "raw+tcp"
    else:
        stats.notes.append("mixed: no TCP listener at the targets, so no TCP share")
    return Blend(parts)


def run(
    spec: TrafficSpec,
    *,
    fallback: bool = False,
    stop: threading.Event | None = None,
    on_progress: ProgressFn | None = None,
    progress_interval: float = 0.25,
) -> InjectStats:
    """Inject `spec` synchronously (blocking) and return what happened.

    Raises TargetError/SpecError (before any socket exists), NeedsRawError (no CAP_NET_RAW and
    no `fallback`), ConnectionRefusedError (tcp-stream with no listener). `stop` ends it early.
    """
    spec, notes = resolve(spec, fallback)
    stats = InjectStats(profile=str(spec.profile), method="", notes=notes)
    sender = open_senders(spec, stats)
    try:
        _loop(spec, sender, stats, stop, on_progress, progress_interval)
    finally:
        sender.close()
    return stats


def _loop(spec: TrafficSpec, sender: Any, stats: InjectStats, stop: threading.Event | None, on_progress: ProgressFn | None, interval: float) -> None:
    pacer = Pacer(spec.rate, spec.duration, spec.count)
    clock = time.monotonic
    sleep = stop.wait if stop is not None else time.sleep
    t0 = clock()
    next_report = t0 + interval
    offered = 0
    while True:
        now = clock()
        elapsed = now - t0
        if stop is not None and stop.is_set():
            stats.stopped = "cancelled"
            break
        step = pacer.step(elapsed, offered)
        if step.done:
            stats.stopped = "count" if spec.count is not None and offered >= spec.count else "duration"
            break
        if step.n == 0:
            sleep(step.wait)
            continue
        k = sender.send(step.n, stats)
        offered += k
        if k == 0:  # every TCP connection is full: wait for room, but not past the end
            sender.wait(min(0.05, spec.duration - elapsed))
        if stats.sent == 0 and stats.errors >= STOP_AFTER_ERRORS:
            stats.stopped = "errors"
            break
        if on_progress is not None and now >= next_report:
            stats.elapsed = now - t0
            on_progress(stats)
            next_report = now + interval
    stats.elapsed = clock() - t0
    if on_progress is not None:
        on_progress(stats)


async def inject(
    spec: TrafficSpec | Profile | str,
    to: str | int | Sequence[int] | None = None,
    *,
    fallback: bool = False,
    isolate: bool = False,
    on_progress: ProgressFn | None = None,
    **fields: Any,
) -> InjectStats:
    """Inject from trio without blocking the event loop; returns the InjectStats.

    Validation (loopback only) and the privilege check happen first, in the caller, and raise
    like run(). Then the send loop runs in a worker thread (`trio.to_thread`), or with
    `isolate=True` in a child process (`python -m emu.traffic.worker`), which keeps the flood off
    this process's GIL so the emulated host's receive stage gets a core of its own.
    Cancelling the caller stops the traffic within one batch (thread) or on SIGTERM (process).
    `on_progress` (thread mode only) is called from the worker thread.

        stats = await inject(spec)                                  # a TrafficSpec
        stats = await inject("udp-flood", port, rate=20_000, duration=3, count=50_000, spoof=None)
    """
    import trio

    spec, notes = resolve(make_spec(spec, to, **fields), fallback)
    if isolate:
        stats = await _inject_process(spec)
    else:
        import functools

        stop = threading.Event()
        try:
            stats = await trio.to_thread.run_sync(
                functools.partial(run, spec, stop=stop, on_progress=on_progress), abandon_on_cancel=True
            )
        finally:
            stop.set()  # on cancellation the abandoned thread sees this and closes its sockets
    stats.notes[:0] = notes
    return stats


async def _inject_process(spec: TrafficSpec) -> InjectStats:
    import json
    import sys

    import trio

    done = await trio.run_process(
        [sys.executable, "-m", "emu.traffic.worker"],
        stdin=json.dumps(spec.to_mapping()).encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    try:
        result = json.loads(done.stdout)
    except ValueError:
        raise RuntimeError(f"injector process failed (exit {done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}") from None
    if "error" in result:
        kind = {"ConnectionRefusedError": ConnectionRefusedError, "NeedsRawError": PermissionError, "PermissionError": PermissionError}
        raise kind.get(result["error"], RuntimeError)(result["message"])
    return InjectStats.from_json(result)
