"""`netswap bench swap`: the emulated host's swap throughput against the same client unemulated.

Figure: an emulated host (policy pfmemalloc, no background traffic) with a process that writes
N pages (more than its RAM: reclaim swaps pages out, one WRITE per page) and then reads them all
back (faults swap them in, each verified). Swap-out and swap-in pages/s come from pswpout and
pswpin over each phase.

Baseline, in the same run, to the same server: the same swap storage class (same NFS client or
iSCSI initiator, same per-page requests) over plain loopback sockets, writing as many pages with
as many requests in flight as the RPC slot table allows (16) and reading them back one at a time
(a fault waits for its page), as the emulated host does.

Also checked: the process's peak resident memory (VmHWM) against emulated RAM + 64 MiB.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click
import trio

from emu import scenario as scen
from emu.bench.result import BenchResult, emit

RSS_SLACK = 64 << 20


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _scenario(backend: str, ram: int, pages: int) -> scen.Scenario:
    sc = scen.default().replace(backend=backend, policy="pfmemalloc")
    sc.host.ram = ram
    sc.host.min_free_kbytes = 0
    sc.host.swap = max(sc.host.swap, (pages + 64) * sc.host.page_size)
    sc.traffic.profile = "none"
    sc.traffic.apps = 0
    return sc


async def emulated(sc: scen.Scenario, server: Any, pages: int) -> dict[str, float]:
    from emu.host import Host
    from emu.mm.process import Process
    from emu.mm.sched import task

    host = Host(sc, server)
    out: dict[str, float] = {}
    async with trio.open_nursery() as n:
        await host.start_kernel(n)
        await host.swapon(n)
        vm = host.vmstat.counters
        with task("bench"):
            proc = Process(host.mm, "bench", pages)
            t0, o0 = time.perf_counter(), vm["pswpout"]
            for p in range(pages):
                await proc.touch(p, write=True)
                await trio.lowlevel.checkpoint()
            while host.mm.nr_writeback:
                await host.mm.wait_writeback_progress()
            t1 = time.perf_counter()
            out["out_pages"], out["out_s"] = vm["pswpout"] - o0, t1 - t0
            i0 = vm["pswpin"]
            for p in range(pages):
                await proc.touch(p, write=False)
                await trio.lowlevel.checkpoint()
            out["in_pages"], out["in_s"] = vm["pswpin"] - i0, time.perf_counter() - t1
        out["mismatches"] = host.mm.nr_verify_errors
        out["hwm"] = _vm_hwm()
        n.cancel_scope.cancel()  # unwinds the client (and its session) with everything else
    return out


async def baseline(backend: str, server: Any, out_pages: int, in_pages: int, nr_slots: int) -> dict[str, float]:
    """The same storage class over plain sockets: same requests, same concurrency."""
    if backend == "iscsi":
        from emu.swapdev.iscsi import IscsiSwapLun

        st: Any = IscsiSwapLun(None, server, via_host=False)
    else:
        from emu.swapdev.nfs import NfsSwapFile

        st = NfsSwapFile(None, server, "udp" if backend == "nfs-udp" else "tcp", via_host=False)
    page = bytearray(4096)
    res: dict[str, float] = {}
    async with trio.open_nursery() as n:
        await n.start(st.run)
        await st.swap_activate(nr_slots, 4096)
        slots = list(range(1, 1 + out_pages))
        t0 = time.perf_counter()

        async def writer(i: int) -> None:
            buf = bytearray(page)
            for s in slots[i::16]:
                buf[:8] = s.to_bytes(8, "little")
                await st.swap_rw("write", s, [memoryview(buf)])

        async with trio.open_nursery() as w:
            for i in range(16):
                w.start_soon(writer, i)
        t1 = time.perf_counter()
        buf = bytearray(4096)
        for s in slots[:in_pages] if in_pages <= len(slots) else slots:
            await st.swap_rw("read", s, [memoryview(buf)])
            if int.from_bytes(buf[:8], "little") != s:
                raise RuntimeError(f"baseline read back the wrong data at slot {s}")
        t2 = time.perf_counter()
        res.update(out_s=t1 - t0, in_s=t2 - t1)
        n.cancel_scope.cancel()
    return res


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--backend", type=click.Choice(scen.BACKENDS), default="nfs-udp", show_default=True, help="Swap storage to measure.")
@click.option("--ram", default="12M", show_default=True, metavar="SIZE", help="Emulated RAM.")
@click.option("--pages", type=click.IntRange(min=256), default=8192, show_default=True, help="Pages the process writes and reads back (more than RAM).")
@click.option("--server", metavar="URL", help="Measure against this server instead of starting ours.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_swap(backend: str, ram: str, pages: int, server: str | None, as_json: bool) -> None:
    """Emulated host swap throughput vs the same client unemulated.

    Prints swap-out and swap-in pages/s of the emulated host, of the same client writing and
    reading the same number of pages to the same server over plain sockets, their ratios, and
    the peak resident memory of this process against emulated RAM + 64 MiB.
    """
    from rich.console import Console

    from emu.servers import ServerURLError, check_backend_matches, local_server, parse_server_url

    console = Console(stderr=True)
    try:
        ram_b = scen.parse_size(ram)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--ram") from None
    if pages * 4096 <= ram_b:
        raise click.BadParameter(f"{pages} pages fit in RAM ({ram}): nothing would swap", param_hint="--pages")
    sc = _scenario(backend, ram_b, pages)
    nr_slots = sc.host.swap // 4096

    def measure(srv: Any) -> tuple[dict[str, float], dict[str, float]]:
        console.print(f"[bold]bench swap[/]: {backend}, {pages} pages through a {ram} emulated host ...")
        emu_r = trio.run(emulated, sc, srv, pages)
        console.print("baseline: the same client over plain sockets ...")
        base_r = trio.run(baseline, backend, srv, int(emu_r["out_pages"]), int(emu_r["in_pages"]), nr_slots)
        return emu_r, base_r

    if server:
        try:
            srv = parse_server_url(server)
            check_backend_matches(backend, srv)
        except ServerURLError as e:
            raise click.BadParameter(str(e), param_hint="--server") from None
        emu_r, base_r = measure(srv)
    else:
        with local_server(backend, sc.host.swap) as sp:
            emu_r, base_r = measure(sp.server)

    limit = ram_b + RSS_SLACK
    extra = {"backend": backend, "ram": ram_b, "pages": pages, "vm_hwm": int(emu_r["hwm"]),
             "rss_limit": limit, "rss_ok": emu_r["hwm"] <= limit, "mismatches": int(emu_r["mismatches"])}
    results = [
        BenchResult("swap-out", "pages/s", emu_r["out_pages"] / emu_r["out_s"], emu_r["out_pages"] / base_r["out_s"],
                    "same client, plain sockets", extra={**extra, "pages_out": int(emu_r["out_pages"])}),
        BenchResult("swap-in", "pages/s", emu_r["in_pages"] / emu_r["in_s"], emu_r["in_pages"] / base_r["in_s"],
                    "same client, plain sockets", extra={**extra, "pages_in": int(emu_r["in_pages"])}),
    ]
    emit(results, as_json, console=Console())
    if not as_json:
        ok = "[green]under[/]" if extra["rss_ok"] else "[red]OVER[/]"
        console.print(f"peak RSS (VmHWM) {extra['vm_hwm'] / 2**20:.1f} MiB: {ok} emulated RAM + 64 MiB "
                      f"= {limit / 2**20:.0f} MiB; integrity mismatches {extra['mismatches']}")
    if extra["mismatches"] or not extra["rss_ok"]:
        sys.exit(1)
