"""`netswap bench inject`: the injector's packets/s against a plain UDP sendto() loop, same run.

udp-flood is compared with a sendto() loop of datagrams of the same size. frag is compared with
sendto() of datagrams of ITS size (FRAG_SIZE), which the kernel must then fragment itself: that
happens only on a path with a small MTU, and loopback's is 65536, so the frag pair is measured in
a child process in a network namespace of its own whose `lo` has a 1500-byte MTU (needs
CAP_SYS_ADMIN; the host's `lo` is untouched). Failing that, the baseline's datagrams go out
unfragmented, and the report says so: the kernel's own FragCreates counter tells which happened.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress

from emu.bench.result import BenchResult, emit
from emu.cli import CONTEXT
from emu.traffic.profiles import IPV4_MAX_PAYLOAD

GOAL = 0.5  # the goal: the injector keeps at least half the pace of the plainest sender
FRAG_SIZE = 4000  # UDP payload of a frag datagram: 3 fragments at a 1500-byte MTU (1480 + 1480 + 1048)
FRAG_MTU = 1500
FRAG_SPOOF = "127.32.0.0/16"  # outside the default 127.64.0.0/10: no leftover queue of another run meets ours
CLONE_NEWNET = 0x40000000  # linux/sched.h
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFMTU, IFF_UP = 0x8913, 0x8914, 0x8922, 0x1  # linux/sockios.h, linux/if.h


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


# ---- the frag pair, in a network namespace of its own ---------------------------------------------
def _ip_counters() -> dict[str, int]:
    """The kernel's IP MIB of this process's network namespace (/proc/net/snmp, "Ip:" lines)."""
    with open("/proc/net/snmp") as f:
        head, values = (line.split()[1:] for line in f if line.startswith("Ip:"))
    return dict(zip(head, map(int, values)))


def _private_lo(mtu: int) -> str | None:
    """Move this process into a new network namespace and bring its `lo` up with `mtu`.
    Returns None on success, else why not (this process then stays where it was)."""
    import ctypes
    import fcntl
    import os
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        return f"unshare(CLONE_NEWNET): {os.strerror(err)}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # struct ifreq: 16-byte name, then a union
        fcntl.ioctl(s, SIOCSIFMTU, struct.pack("16si20x", b"lo", mtu))
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
    return None


def frag_pair(count: int, repeat: int) -> dict[str, Any]:
    """Best of `repeat`, alternating: sendto() of FRAG_SIZE datagrams (the kernel fragments them
    when the MTU is small) and the injector's frag profile (fragments built by us). Runs in the
    calling process's namespace; `frag_child` puts it in a private one first."""
    sink = _sink()
    port = sink.getsockname()[1]
    base = inj = inj_pps = 0.0
    created = 0
    try:
        for _ in range(repeat):
            before = _ip_counters()["FragCreates"]
            base = max(base, sendto_loop(port, FRAG_SIZE, count))
            created = max(created, _ip_counters()["FragCreates"] - before)
            rate, pps = injector(port, FRAG_SIZE, count, profile="frag", spoof=FRAG_SPOOF)
            if pps > inj_pps:
                inj, inj_pps = rate, pps
    finally:
        sink.close()
    return {"baseline_datagrams_per_s": base, "baseline_fragments_per_datagram": created / count,
            "datagrams_per_s": inj, "fragments_per_s": inj_pps}


def frag_child() -> None:
    """`python -c 'from emu.bench.inject import frag_child; frag_child()'`: {count, repeat} as JSON
    on stdin; the frag pair's figures as JSON on stdout."""
    args = json.loads(sys.stdin.read())
    why = _private_lo(FRAG_MTU)
    try:
        out = frag_pair(args["count"], args["repeat"])
    except click.ClickException as exc:
        out = {"error": exc.message}
    out["netns"] = why is None
    if why is not None:
        out["netns_error"] = why
    json.dump(out, sys.stdout)


def _measure_frag(count: int, repeat: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", "from emu.bench.inject import frag_child; frag_child()"],
                          input=json.dumps({"count": count, "repeat": repeat}), capture_output=True, text=True, timeout=600)
    try:
        out: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        raise click.ClickException(f"frag measurement failed (exit {done.returncode}): {done.stderr[-2000:]}") from None
    if "error" in out:
        raise click.ClickException(out["error"])
    return out


@click.command(context_settings=CONTEXT)
@click.option("--count", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="Datagrams per udp-flood measurement (frag: a sixth of it).")
@click.option("--size", type=click.IntRange(1, IPV4_MAX_PAYLOAD), default=64, show_default=True,
              help=f"UDP payload bytes of the udp-flood runs and their baseline (1..{IPV4_MAX_PAYLOAD}); frag always uses {FRAG_SIZE}.")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True,
              help="Measurements of each; the best counts (the machine is shared).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_inject(count: int, size: int, repeat: int, as_json: bool) -> None:
    """Injector packets/s vs a plain UDP sendto loop, measured in the same run.

    \b
    udp-flood: datagrams/s against a plain sendto() loop of --size datagrams:
      spoofed sources on the raw socket (needs root), and --no-spoof (ordinary socket).
    frag (needs root): 4000-byte datagrams as 3 IP fragments each, against sendto() of the
      same 4000-byte datagrams that the kernel fragments itself. That needs a small MTU, so
      the pair runs in a private network namespace whose lo has a 1500-byte MTU (the host's
      lo is untouched); reported both as datagrams/s and as IP fragments/s.
    All go to a bound, unread UDP socket on 127.0.0.1. Goal: ratio >= 0.5.
    """
    from emu.traffic.rawsend import have_cap_net_raw

    raw = have_cap_net_raw()
    frag_count = max(1, count // 6)
    sink = _sink()
    port = sink.getsockname()[1]
    cases: dict[str, Any] = {"no-spoof": lambda: injector(port, size, count, spoof=None)}
    if raw:
        cases = {"udp-flood": lambda: injector(port, size, count), **cases}
    best: dict[str, tuple[float, float]] = {}
    base = 0.0
    frag: dict[str, Any] = {}
    err = Console(stderr=True)
    try:
        with Progress(console=err, transient=True, disable=as_json or not err.is_terminal) as progress:
            task = progress.add_task("bench inject", total=repeat * (1 + len(cases)) + (1 if raw else 0))
            for _ in range(repeat):
                base = max(base, sendto_loop(port, size, count))
                progress.advance(task)
                for name, fn in cases.items():
                    r = fn()
                    if r[1] > best.get(name, (0.0, 0.0))[1]:
                        best[name] = r
                    progress.advance(task)
            if raw:
                progress.update(task, description="bench inject: frag")
                frag = _measure_frag(frag_count, repeat)
                progress.advance(task)
    finally:
        sink.close()
    results = []
    common = {"count": count, "size": size, "repeat": repeat, "goal_ratio": GOAL}
    plain = f"plain sendto loop, {size} B datagrams"
    if raw:
        results.append(BenchResult("inject udp-flood (raw, spoofed)", "pkt/s", best["udp-flood"][1], base, plain, extra=common))
    results.append(BenchResult("inject udp-flood --no-spoof (socket)", "pkt/s", best["no-spoof"][1], base, plain, extra=common))
    if raw:
        per = frag["baseline_fragments_per_datagram"]
        how = f"kernel-fragmented into {per:.0f}, lo MTU {FRAG_MTU}, own netns" if frag["netns"] and per > 1 else (
            f"NOT fragmented by the kernel ({frag.get('netns_error') or 'lo MTU 65536'})")
        fextra = {**common, "count": frag_count, "size": FRAG_SIZE, "netns": frag["netns"], "baseline_fragments_per_datagram": per,
                  "datagrams_per_s": frag["datagrams_per_s"], "fragments_per_s": frag["fragments_per_s"],
                  "baseline_datagrams_per_s": frag["baseline_datagrams_per_s"]}
        results.append(BenchResult(f"inject frag, {FRAG_SIZE} B datagrams", "datagrams/s", frag["datagrams_per_s"],
                                   frag["baseline_datagrams_per_s"], f"sendto of {FRAG_SIZE} B datagrams, {how}", extra=fextra))
        results.append(BenchResult(f"inject frag, IP packets ({FRAG_SIZE} B datagrams)", "packets/s", frag["fragments_per_s"],
                                   frag["baseline_datagrams_per_s"] * max(per, 1.0), f"sendto of {FRAG_SIZE} B datagrams, {how}",
                                   extra=fextra))
    emit(results, as_json)
    for r in results:
        if r.ratio < GOAL and not as_json:
            err.print(f"[yellow]below the goal:[/] {r.name} ratio {r.ratio:.2f} < {GOAL} (a busy machine? try --repeat 5)")
    if raw and not frag["netns"] and not as_json:
        err.print(f"note: no private network namespace ({frag.get('netns_error')}), so the frag baseline went out unfragmented")
    if not raw and not as_json:
        err.print("note: no CAP_NET_RAW, so only the unprivileged fallback was measured; run with sudo for the raw socket")
