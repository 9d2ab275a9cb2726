"""`netswap bench nfs`: libnfs `nfs-cp` of a big file into and out of netswap's NFS server, against
nfs-ganesha on the same machine in the same run.

Figures: MB/s of `nfs-cp local -> nfs://ours` (WRITE UNSTABLE + COMMIT) and `nfs-cp nfs://ours ->
local` (READ); baselines: the same copies with nfs-ganesha (VFS FSAL). Each round runs all four
copies, the servers in alternating order, after an unmeasured warm-up round; the median counts.
Every copy is checked byte for byte. Note: nfs-cp sends one 1 MiB call at a time, so the figures
are latency-bound, and on a busy machine they vary a lot from round to round.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from emu.bench.result import BenchResult, emit
from emu.peers.nfs import Served, TestbedError, ganesha, libnfs, netswap_server, real_fs_dir
from emu.util.units import parse_size

MB = 1_000_000


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cp(src: str, dst: str) -> float:
    t0 = time.perf_counter()
    r = libnfs("nfs-cp", src, dst, timeout=600)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise click.ClickException(f"nfs-cp {src} {dst} failed: {r.stderr.strip() or r.stdout.strip()}")
    return elapsed


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--size", default="256M", show_default=True, help="File size to copy (e.g. 64M, 1G).")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1, 20),
              help="Rounds of the four copies (servers in alternating order); the median counts.")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="One unmeasured round first (page cache and both servers warm).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Where the files and exports go (default: a temporary directory).")
@click.option("--goal", default=0.5, show_default=True, type=float, help="Ratio our/ganesha to meet (warned about).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of {figure, baseline, ratio, ...}.")
def bench_nfs(size: str, rounds: int, warmup: bool, directory: Path | None, goal: float, as_json: bool) -> None:
    """nfs-cp a file into and out of netswap's NFS server and nfs-ganesha; MB/s and ratios.

    Needs root and the Debian peers nfs-ganesha, nfs-ganesha-vfs, rpcbind and libnfs-utils.
    """
    try:
        nbytes = parse_size(size)
        if nbytes <= 0:
            raise ValueError("must be above 0")
    except ValueError as e:
        raise click.BadParameter(f"{size!r}: {e}", param_hint="--size") from None
    if os.geteuid() != 0:
        raise click.ClickException("needs root (nfs-ganesha and rpcbind run as root)")
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix="netswap-bench-nfs-") as d:
        base = Path(d)
        src = base / "source.bin"
        with open(src, "wb") as f:
            left = nbytes
            while left:
                n = min(left, 1 << 22)
                f.write(os.urandom(n))
                left -= n
        digest = _sha256(src)
        times: dict[str, list[float]] = {"ours_in": [], "ganesha_in": [], "ours_out": [], "ganesha_out": []}
        try:
            with contextlib.ExitStack() as stack:
                # Both exports on the same kind of filesystem (tmpfs if we are on overlayfs).
                ours_export = stack.enter_context(real_fs_dir(base / "ours" / "export",
                                                              f"{3 * nbytes // (1 << 20) + 64}m"))
                ours = stack.enter_context(netswap_server(ours_export, base / "ours" / "state"))
                gan = stack.enter_context(ganesha(base / "ganesha", tmpfs_size=f"{3 * nbytes // (1 << 20) + 64}m"))
                servers: dict[str, Served] = {"ours": ours, "ganesha": gan}
                progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=console, transient=True, disable=as_json)
                first = -1 if warmup else 0
                with progress:
                    bar = progress.add_task(f"nfs-cp {size}", total=(rounds - first) * 4)
                    for r in range(first, rounds):
                        order = list(servers.items())
                        if r % 2:
                            order.reverse()
                        for name, srv in order:
                            label = "warm-up" if r < 0 else f"round {r + 1}"
                            progress.update(bar, description=f"{label}: into {name}")
                            remote = srv.url(f"bench-{r + 1}.bin")
                            t_in = _cp(str(src), remote)
                            if _sha256(srv.export / f"bench-{r + 1}.bin") != digest:
                                raise click.ClickException(f"the copy into {name} is not byte-identical")
                            progress.advance(bar)
                            progress.update(bar, description=f"{label}: out of {name}")
                            local = base / f"back-{name}.bin"
                            t_out = _cp(remote, str(local))
                            if _sha256(local) != digest:
                                raise click.ClickException(f"the copy out of {name} is not byte-identical")
                            local.unlink()
                            (srv.export / f"bench-{r + 1}.bin").unlink()
                            progress.advance(bar)
                            if r >= 0:
                                times[f"{name}_in"].append(t_in)
                                times[f"{name}_out"].append(t_out)
        except TestbedError as e:
            raise click.ClickException(str(e)) from None
    med = {k: statistics.median(v) for k, v in times.items()}
    results = []
    for way, what in (("in", "nfs-cp into the server (WRITE + COMMIT)"), ("out", "nfs-cp out of the server (READ)")):
        results.append(BenchResult(
            name=f"{what}, {size}", unit="MB/s", figure=nbytes / med[f"ours_{way}"] / MB,
            baseline=nbytes / med[f"ganesha_{way}"] / MB, baseline_name="nfs-ganesha 4.3 VFS",
            extra={"bytes": nbytes, "rounds": rounds, "seconds_ours": times[f"ours_{way}"],
                   "seconds_ganesha": times[f"ganesha_{way}"], "goal_ratio": goal}))
    emit(results, as_json)
    for res in results:
        if res.ratio < goal:
            console.print(f"[yellow]warning:[/] {res.name}: ratio {res.ratio:.2f} is below the goal {goal}")
