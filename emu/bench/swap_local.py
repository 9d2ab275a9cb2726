"""`netswap bench swap-local`: the emulated swap path against plain file I/O of the same pages.

Figure: pages/s through the emulated host: a process writes N pages into a RAM much smaller than N
(page faults, reclaim, asynchronous clustered swap-out through `LocalFileSwap`), then reads them all
back (major faults, swap-in, every page verified).  Baseline, in the same run: pwrite then pread
of the same N pages to the same kind of file, one page per call.  Ratio = figure / baseline.
"""

from __future__ import annotations

import os
import tempfile
import time

import click
import trio
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from emu.bench.result import BenchResult, emit
from emu.util.units import parse_size
from emu.mm.vm import Vm
from emu.mm.page_alloc import Zone
from emu.mm.process import Process, page_content
from emu.kernel.sched import task
from emu.mm.swap import LocalFileSwap


def plain_file_io(path: str, nr_pages: int, page_size: int) -> float:
    """Seconds to pwrite then pread nr_pages pages (content built the same way) one at a time."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, (nr_pages + 1) * page_size)
        buf = bytearray(page_size)
        t0 = time.perf_counter()
        for i in range(nr_pages):
            buf[:] = page_content(1, i, 1, page_size)
            os.pwrite(fd, buf, (i + 1) * page_size)
        bad = 0
        for i in range(nr_pages):
            if os.pread(fd, page_size, (i + 1) * page_size) != page_content(1, i, 1, page_size):
                bad += 1
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    if bad:
        raise RuntimeError(f"plain file I/O read back {bad} wrong pages")
    return elapsed


async def emulated(path: str, nr_pages: int, ram: int, page_size: int, progress: Progress | None) -> tuple[float, dict[str, int]]:
    zone = Zone(ram, page_size)
    mm = Vm(zone)
    async with trio.open_nursery() as nursery:
        await nursery.start(mm.run)
        await mm.swapon(LocalFileSwap(path), nr_pages + zone.nr_pages + 64)
        proc = Process(mm, "bench", nr_pages)
        bar = progress.add_task("emulated swap", total=2 * nr_pages) if progress else None
        with task("bench"):
            t0 = time.perf_counter()
            for i in range(nr_pages):
                await proc.touch(i, write=True)
                if bar is not None and i % 512 == 0:
                    progress.update(bar, completed=i)  # type: ignore[union-attr]
            t1 = time.perf_counter()
            for i in range(nr_pages):
                await proc.touch(i, write=False)
                if bar is not None and i % 512 == 0:
                    progress.update(bar, completed=nr_pages + i)  # type: ignore[union-attr]
            t2 = time.perf_counter()
            elapsed = t2 - t0
        stats = mm.vmstat.snapshot()
        stats["verify_errors"] = mm.nr_verify_errors
        stats["write_pass_s"] = t1 - t0  # type: ignore[assignment]
        stats["read_pass_s"] = t2 - t1  # type: ignore[assignment]
        stats["max_writes_in_flight"] = mm.swap_areas[0].storage.max_inflight  # type: ignore[attr-defined]
        proc.exit()
        nursery.cancel_scope.cancel()
    if mm.nr_verify_errors:
        raise RuntimeError(f"{mm.nr_verify_errors} pages came back from swap with the wrong content")
    return elapsed, stats


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--pages", default=20000, show_default=True, type=click.IntRange(min=1), help="Pages to write and read back.")
@click.option("--ram", default="8M", show_default=True, help="Emulated RAM (much smaller than --pages, so they swap).")
@click.option("--page-size", default=4096, show_default=True, type=int, help="Page size in bytes.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True), default=None,
              help="Directory for the swap files (default: a temporary directory).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {figure, baseline, ratio, ...}.")
def bench_swap_local(pages: int, ram: str, page_size: int, directory: str | None, as_json: bool) -> None:
    """Fault, swap out and swap in N pages through local-file swap, against plain file I/O.

    Figure: pages/s for the emulated round trip (write-fault every page into a small RAM, so most
    are swapped out asynchronously, then read every page back with a verified swap-in). Baseline:
    pwrite + pread of the same pages to a file, measured in the same run.
    """
    try:
        ram_bytes = parse_size(ram)
    except ValueError as e:
        raise click.BadParameter(f"{ram!r}: {e}", param_hint="--ram") from None
    if page_size < 512 or page_size & (page_size - 1):
        raise click.BadParameter(f"{page_size}: must be a power of two >= 512", param_hint="--page-size")
    if ram_bytes // page_size < 64:
        raise click.BadParameter(f"{ram!r}: at least 64 pages", param_hint="--ram")
    if pages <= 2 * (ram_bytes // page_size):
        # Fewer pages than twice RAM would mostly stay resident: the figure would not be swap.
        raise click.BadParameter(
            f"{pages} pages fit in --ram {ram} ({ram_bytes // page_size} pages): use more than "
            f"{2 * (ram_bytes // page_size)} so that most of them swap",
            param_hint="--pages",
        )
    with tempfile.TemporaryDirectory(dir=directory, prefix="netswap-bench-") as d:
        # The baseline runs on the very file the emulated host then swaps to.
        base = plain_file_io(os.path.join(d, "swap"), pages, page_size)
        if as_json:
            elapsed, stats = trio.run(emulated, os.path.join(d, "swap"), pages, ram_bytes, page_size, None)
        else:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          transient=True) as progress:
                elapsed, stats = trio.run(emulated, os.path.join(d, "swap"), pages, ram_bytes, page_size, progress)
    result = BenchResult(
        name=f"swap-local: {pages} pages out and back in ({ram} RAM)",
        unit="pages/s",
        figure=pages / elapsed,
        baseline=pages / base,
        baseline_name="pwrite+pread of the same pages",
        extra={
            "pages": pages,
            "ram": ram_bytes,
            "pswpout": stats["pswpout"],
            "pswpin": stats["pswpin"],
            "pgmajfault": stats["pgmajfault"],
            "allocstall": stats["allocstall"],
            "faults_per_s": stats["pgfault"] / elapsed,
            "write_pass_pages_per_s": pages / stats["write_pass_s"],
            "read_pass_pages_per_s": pages / stats["read_pass_s"],
            "max_writes_in_flight": stats["max_writes_in_flight"],
            "verify_errors": stats["verify_errors"],
        },
    )
    emit([result], as_json)
    if not as_json:
        click.echo(
            f"pswpout {stats['pswpout']}, pswpin {stats['pswpin']}, pgmajfault {stats['pgmajfault']}, "
            f"{stats['pgfault'] / elapsed:,.0f} faults/s (write pass {pages / stats['write_pass_s']:,.0f} pages/s, "
            f"read pass {pages / stats['read_pass_s']:,.0f} pages/s), up to {stats['max_writes_in_flight']} writes "
            f"in flight, 0 verify errors"
        )
