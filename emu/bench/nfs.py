"""`netswap bench nfs`: a big file copied into and out of netswap's NFS server, over TCP and over
UDP, against nfs-ganesha on the same machine in the same run.

Figures: MB/s of each copy; baselines: the same copy with nfs-ganesha (VFS FSAL). Beside them,
each server's own CPU time per copy (its process's utime + stime, all threads). Over TCP the
copies are libnfs's `nfs-cp local -> nfs://server` (1 MiB WRITEs, UNSTABLE, then COMMIT) and back
`nfs-cat nfs://server > /dev/null` (1 MiB READs). The copy out is timed into /dev/null because
a local file made that row the client's: on a VM, nfs-cp's page cache for its copy cost 0.1 to
0.8 s per 256 MiB at random, where the servers send it in about 0.1 s; an untimed nfs-cp back to
a local file then checks the bytes. libnfs's tools speak NFS over TCP only, so over UDP the client is netswap's own
(nfs/client.py, the emulated host's), one 32 KiB call at a time as nfs-cp sends one at a time:
UNSTABLE WRITEs and one COMMIT at the end, and READs. Each round runs every copy, the servers in
alternating order (each server's copies back to back), after an unmeasured warm-up round; the
median counts. Every copy is checked byte for byte, then removed through NFS (untimed). The
figures are latency-bound (one call in flight), so on a busy machine they vary a lot from round
to round: compare the ratios, measured side by side.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import trio

from emu.bench.result import BenchResult, emit, emit_cpu, round_ratios
from emu.peers.nfs import H, Served, TestbedError, ganesha, libnfs, netswap_server, real_fs_dir
from emu.util.procs import cpu_seconds
from emu.util.units import parse_size

MB = 1_000_000


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def _udp_cp_in(srv: Served, src: Path, name: str) -> None:
    """Our client over UDP: the file into the server (UNSTABLE WRITEs in wsize pieces, one at a
    time, then one COMMIT: all the data is kept until then, as nfs-cp does)."""
    from nfs.client import NfsClient
    from nfs.nfs3 import CreateMode, StableHow

    size = src.stat().st_size
    async with NfsClient.udp(H, srv.nfs_port, srv.mount_port, max_uncommitted=size + 1) as c:
        root = await c.mount(srv.export_path)
        fh, _ = await c.create(root, name, mode=0o644, how=CreateMode.GUARDED)
        with open(src, "rb") as f:
            off = 0
            while chunk := f.read(c.wsize):
                await c.write(fh, off, chunk, StableHow.UNSTABLE)
                off += len(chunk)
        await c.commit(fh)
        await c.umount()


async def _udp_cp_out(srv: Served, name: str, dst: Path) -> None:
    """Our client over UDP: the file out of the server, READs of rsize one at a time."""
    from nfs.client import NfsClient

    async with NfsClient.udp(H, srv.nfs_port, srv.mount_port) as c:
        root = await c.mount(srv.export_path)
        fh, _ = await c.lookup(root, name)
        with open(dst, "wb") as f:
            off = 0
            while True:
                res = await c.read_once(fh, off, c.rsize)
                f.write(res.data)  # type: ignore[arg-type]
                off += len(res.data)
                if res.eof or not res.data:
                    break
        await c.umount()


async def _nfs_rm(srv: Served, name: str) -> None:
    """REMOVE through NFS (our client, over TCP), as a client removes a file."""
    from nfs.client import NfsClient

    async with NfsClient.tcp(H, srv.nfs_port, srv.mount_port) as c:
        root = await c.mount(srv.export_path)
        await c.remove(root, name)
        await c.umount()


def _run(what: str, fn: Any, *args: Any) -> float:
    """One of our client's jobs (`_udp_cp_in`, ...) in a trio run of its own; its seconds."""
    t0 = time.perf_counter()
    try:
        trio.run(fn, *args)
    except Exception as e:
        raise click.ClickException(f"{what} failed: {e}") from None
    return time.perf_counter() - t0


def _cat(url: str) -> float:
    """`nfs-cat URL > /dev/null`: the copy out of a server, timed without a local file to write."""
    t0 = time.perf_counter()
    r = libnfs("nfs-cat", url, timeout=600, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise click.ClickException(f"nfs-cat {url} failed: {r.stderr.strip()}")
    return elapsed


def _cp(src: str, dst: str) -> float:
    t0 = time.perf_counter()
    r = libnfs("nfs-cp", src, dst, timeout=600)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise click.ClickException(f"nfs-cp {src} {dst} failed: {r.stderr.strip() or r.stdout.strip()}")
    return elapsed


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--size", default="256M", show_default=True, help="File size to copy over TCP (e.g. 64M, 1G).")
@click.option("--udp-size", default="32M", show_default=True,
              help="File size to copy over UDP (32 KiB calls: 32 times as many as over TCP); 0: no UDP rows.")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1, 20),
              help="Rounds of every copy (in and out, each transport; servers in alternating order); the median counts.")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="One unmeasured round first (page cache and both servers warm).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Where the files and exports go (default: a temporary directory).")
@click.option("--goal", default=1.0, show_default=True, type=float,
              help="Ratio our/ganesha each row should meet (a row below it is warned about).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of {figure, baseline, ratio, ...}.")
def bench_nfs(size: str, udp_size: str, rounds: int, warmup: bool, directory: Path | None, goal: float,
              as_json: bool) -> None:
    """Copy a file into and out of netswap's NFS server and nfs-ganesha, over TCP (libnfs's
    nfs-cp in, nfs-cat out into /dev/null) and UDP (netswap's client); MB/s and a ratio
    ours/ganesha per row, and each server's own CPU time per copy. Every copy is checked.

    Needs root and the Debian peers nfs-ganesha, nfs-ganesha-vfs, rpcbind and libnfs-utils.
    """
    try:
        nbytes = parse_size(size)
        if nbytes <= 0:
            raise ValueError("must be above 0")
    except ValueError as e:
        raise click.BadParameter(f"{size!r}: {e}", param_hint="--size") from None
    try:
        udp_bytes = parse_size(udp_size)
        if udp_bytes < 0:
            raise ValueError("must be 0 or above")
    except ValueError as e:
        raise click.BadParameter(f"{udp_size!r}: {e}", param_hint="--udp-size") from None
    if os.geteuid() != 0:
        raise click.ClickException("needs root (nfs-ganesha and rpcbind run as root)")
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix="netswap-bench-nfs-") as d:
        base = Path(d)
        src = base / "source.bin"
        udp_src = base / "source-udp.bin"
        for path, want in ((src, nbytes), (udp_src, udp_bytes)):
            with open(path, "wb") as f:
                left = want
                while left:
                    n = min(left, 1 << 22)
                    f.write(os.urandom(n))
                    left -= n
        digest = _sha256(src)
        udp_digest = _sha256(udp_src)
        protos = ["tcp", "udp"] if udp_bytes else ["tcp"]
        times: dict[str, list[float]] = {f"{who}_{way}_{proto}": [] for who in ("ours", "ganesha")
                                         for way in ("in", "out") for proto in protos}
        cpu: dict[str, list[float]] = {k: [] for k in times}  # each server's own CPU seconds per copy
        try:
            with contextlib.ExitStack() as stack:
                # Both exports on the same kind of filesystem (tmpfs if we are on overlayfs).
                ours_export = stack.enter_context(real_fs_dir(base / "ours" / "export",
                                                              f"{3 * (nbytes + udp_bytes) // (1 << 20) + 64}m"))
                ours = stack.enter_context(netswap_server(ours_export, base / "ours" / "state"))
                gan = stack.enter_context(ganesha(base / "ganesha", tmpfs_size=f"{3 * (nbytes + udp_bytes) // (1 << 20) + 64}m"))
                servers: dict[str, Served] = {"ours": ours, "ganesha": gan}
                progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=console, transient=True, disable=as_json)
                first = -1 if warmup else 0
                with progress:
                    bar = progress.add_task(f"copies of {size}", total=(rounds - first) * 4 * len(protos))
                    for r in range(first, rounds):
                        order = list(servers.items())
                        if r % 2:
                            order.reverse()
                        # A server's copies run back to back, so each follows the same history
                        # whichever server goes first. With the transports outermost, the first TCP
                        # copy into a server in a round was slow (over 0.45 s for 256 MiB, against
                        # 0.2-0.3: fresh page cache, dearer on a VM after a pause) 27 times in 60
                        # and the second 8 times, and one server went first in 3 of 5 rounds.
                        for name, srv in order:
                            for proto in protos:
                                label = f"{'warm-up' if r < 0 else f'round {r + 1}'} {proto.upper()}"
                                fname = f"bench-{proto}-{r + 1}.bin"
                                local = base / f"back-{name}.bin"
                                expect = digest if proto == "tcp" else udp_digest
                                progress.update(bar, description=f"{label}: into {name}")
                                c0 = cpu_seconds(srv.proc.pid)
                                if proto == "tcp":
                                    t_in = _cp(str(src), srv.url(fname))
                                else:
                                    t_in = _run("copy over UDP", _udp_cp_in, srv, udp_src, fname)
                                c_in = cpu_seconds(srv.proc.pid) - c0
                                if _sha256(srv.export / fname) != expect:
                                    raise click.ClickException(f"the copy into {name} ({proto}) is not byte-identical")
                                progress.advance(bar)
                                progress.update(bar, description=f"{label}: out of {name}")
                                c0 = cpu_seconds(srv.proc.pid)
                                if proto == "tcp":
                                    t_out = _cat(srv.url(fname))
                                    c_out = cpu_seconds(srv.proc.pid) - c0
                                    _cp(srv.url(fname), str(local))  # checked below, not timed
                                else:
                                    t_out = _run("copy over UDP", _udp_cp_out, srv, fname, local)
                                    c_out = cpu_seconds(srv.proc.pid) - c0
                                if _sha256(local) != expect:
                                    raise click.ClickException(f"the copy out of {name} ({proto}) is not byte-identical")
                                local.unlink()
                                # Removed through NFS, as a client removes, so each server frees the
                                # file then, untimed (its last close: 50 ms per 256 MiB on ext4).
                                # Removed locally, ganesha kept it open past the run and ours closed
                                # it 2-4 s later, inside its own next copies.
                                _run(f"REMOVE {fname} from {name}", _nfs_rm, srv, fname)
                                progress.advance(bar)
                                if r >= 0:
                                    times[f"{name}_in_{proto}"].append(t_in)
                                    times[f"{name}_out_{proto}"].append(t_out)
                                    cpu[f"{name}_in_{proto}"].append(c_in)
                                    cpu[f"{name}_out_{proto}"].append(c_out)
        except TestbedError as e:
            raise click.ClickException(str(e)) from None
    med = {k: statistics.median(v) for k, v in times.items()}
    results = []
    for proto in protos:
        n = nbytes if proto == "tcp" else udp_bytes
        tool_in, tool_out, call = (("nfs-cp", "nfs-cat", "1 MiB") if proto == "tcp"
                                   else ("netswap client", "netswap client", "32 KiB"))
        for way, what in (("in", f"into: {tool_in}, {call} WRITEs + COMMIT"), ("out", f"out of: {tool_out}, {call} READs")):
            results.append(BenchResult(
                name=f"{proto.upper()} {what}, {size if proto == 'tcp' else udp_size}", unit="MB/s",
                figure=n / med[f"ours_{way}_{proto}"] / MB, baseline=n / med[f"ganesha_{way}_{proto}"] / MB,
                baseline_name="nfs-ganesha 4.3 VFS",
                rounds=round_ratios(times[f"ours_{way}_{proto}"], times[f"ganesha_{way}_{proto}"], higher_is_better=False),
                extra={"transport": proto, "direction": way, "bytes": n, "rounds": rounds,
                       "seconds_ours": times[f"ours_{way}_{proto}"],
                       "seconds_ganesha": times[f"ganesha_{way}_{proto}"],
                       "server_cpu_s_ours": [round(c, 3) for c in cpu[f"ours_{way}_{proto}"]],
                       "server_cpu_s_ganesha": [round(c, 3) for c in cpu[f"ganesha_{way}_{proto}"]], "goal_ratio": goal}))
    emit(results, as_json, goal=goal)
    if not as_json:
        # What each server itself spent (its process's CPU time, all threads), apart from the
        # client's: the MB/s are latency-bound and swing with the machine's load, this less so.
        emit_cpu([(r.name, [c * 1e3 for c in r.extra["server_cpu_s_ours"]],
                   [c * 1e3 for c in r.extra["server_cpu_s_ganesha"]]) for r in results],
                 "server CPU per copy (median of the rounds; /proc/PID/stat, 10 ms steps)", "copy", "ours",
                 "nfs-ganesha", "ms", ",.0f",
                 "nfs-ganesha/ours above 1: ours spent less. Writeback our write-behind starts (sync_file_range) "
                 "runs in our process and counts; the kernel's flusher threads, which write back "
                 "ganesha's data, are in neither.")
    for res in results:
        if res.ratio < goal:
            console.print(f"[yellow]warning:[/] {res.name}: ratio {res.ratio:.2f} is below the goal {goal}")
