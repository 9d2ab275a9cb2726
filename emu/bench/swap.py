"""`netswap bench swap`: the emulated host's swap throughput against the same client unemulated.

Figure: an emulated host (policy pfmemalloc, no background traffic) with a process that writes
N pages (more than its RAM: reclaim swaps pages out, one WRITE per page as in the demo, or with
`--swap-cluster N` contiguous slots together and swap-in readahead of up to 2^page_cluster = 8
pages) and then reads them all back (faults swap them in, each verified). Swap-out and swap-in pages/s come from pswpout and
pswpin over each phase (swap-out timed from the first swap write, not from the faults that only
fill free RAM before reclaim starts).

Baseline, in the same run, to the same server: the same swap storage class (same NFS client or
iSCSI initiator, same RPC slot table / device queue of 16) over plain loopback sockets, replaying
the exact requests the emulated host made in each phase (recorded by `Inflight.trace`: same slots,
same pages per request, in the same order): reads one at a time (a fault waits for its page), writes
up to 16 in flight alongside them. The swap-in phase's requests include the swap-outs of the dirty
pages its faults displace, so the baseline does that I/O too.

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
from emu.kernel.policy import Policy

RSS_SLACK = 64 << 20
QUEUE_DEPTH = 16  # the NFS transport's RPC slot table, the iSCSI LUN's queue depth


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _scenario(backend: str, ram: int, pages: int, swap_cluster: int = 1) -> scen.Scenario:
    sc = scen.default().replace(backend=backend, policy=Policy.PFMEMALLOC)
    sc.host.ram = ram
    sc.host.min_free_kbytes = 0
    sc.host.swap_cluster = swap_cluster
    sc.host.swap = max(sc.host.swap, (pages + 64) * sc.host.page_size)
    sc.traffic.profile = "none"
    sc.traffic.apps = 0
    return sc


def emulated(sc: scen.Scenario, server: Any, pages: int) -> dict[str, Any]:
    """The emulated host, as `netswap run` runs it: its own trio.run under its emulated clock
    (the figures are wall-clock pages/s: what the emulation costs, not what it models)."""
    from emu.kernel.clock import EmuClock, deterministic_scheduling

    clock = EmuClock()
    with deterministic_scheduling():
        return trio.run(_emulated, sc, server, pages, clock, clock=clock)


async def _emulated(sc: scen.Scenario, server: Any, pages: int, clock: Any) -> dict[str, Any]:
    from emu.host.kernel import Kernel
    from emu.kernel.sched import task
    from emu.mm.process import Process
    from emu.swapdev import make_swap

    kernel = Kernel(sc.host, sc.policy, sc.costs, clock)
    storage = make_swap(sc.backend, server, kernel.net)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as n:
        await kernel.start(n)
        await n.start(storage.run)
        await kernel.mm.swapon(storage, sc.host.swap // sc.host.page_size)
        vm = kernel.vmstat.counters
        mm = kernel.mm
        trace: list[tuple[str, int, int]] = []
        storage.inflight.trace = trace  # every request, replayed by the baseline
        with task("bench"):
            proc = Process(mm, "bench", pages)
            # The swap-out phase is timed from its first swap write (pswpout moves), as the
            # baseline is timed from its first WRITE: the page faults that merely fill free RAM
            # before reclaim starts are not swap-out (they are reported as out_fill_s).
            ts, o0 = time.perf_counter(), vm["pswpout"]
            t0 = None
            for p in range(pages):
                tp = time.perf_counter()
                await proc.touch(p, write=True)
                await trio.lowlevel.checkpoint()
                if t0 is None and vm["pswpout"] != o0:
                    t0 = tp
            while mm.nr_writeback:
                await mm.wait_writeback_progress()
            t1 = time.perf_counter()
            if t0 is None:
                t0 = ts
            out["out_pages"], out["out_s"], out["out_fill_s"] = vm["pswpout"] - o0, t1 - t0, t0 - ts
            out["out_trace"] = trace[:]
            del trace[:]
            i0, o1 = vm["pswpin"], vm["pswpout"]
            for p in range(pages):
                await proc.touch(p, write=False)
                await trio.lowlevel.checkpoint()
            while mm.nr_writeback:  # the phase's own swap-outs (the pages it displaced)
                await mm.wait_writeback_progress()
            out["in_pages"], out["in_s"] = vm["pswpin"] - i0, time.perf_counter() - t1
            out["in_phase_out_pages"] = vm["pswpout"] - o1
            out["in_trace"] = trace[:]
            storage.inflight.trace = None
        out["mismatches"] = mm.nr_verify_errors
        out["hwm"] = _vm_hwm()
        await storage.close()
        n.cancel_scope.cancel()  # unwinds the client (and its session) with everything else
    return out


async def replay(st: Any, trace: list[tuple[str, int, int]], page_size: int = 4096,
                 max_writes: int = QUEUE_DEPTH) -> None:
    """Make the requests of `trace` in its order: reads one at a time (a fault waits for its
    page), writes up to `max_writes` in flight at once alongside them (reclaim does not wait for
    them; the transport's slot table / the device queue bounds them at 16). A read of a slot
    written earlier in the same trace waits for that write, as a fault on a page under writeback
    finds it in the swap cache rather than on the storage. Every page read is checked against
    the slot stamp it was written with."""
    reads = [(slot, n) for op, slot, n in trace if op == "read"]
    writes = [(slot, n) for op, slot, n in trace if op == "write"]
    pending: dict[int, trio.Event] = {}
    for slot, n in writes:
        for s in range(slot, slot + n):
            pending[s] = trio.Event()
    witer = iter(writes)

    async def writer() -> None:
        buf = bytearray(page_size * 64)
        for slot, n in witer:
            views = [memoryview(buf)[i * page_size:(i + 1) * page_size] for i in range(n)]
            for i in range(n):  # each page stamped with its slot, checked when read back
                buf[i * page_size:i * page_size + 8] = (slot + i).to_bytes(8, "little")
            await st.swap_rw("write", slot, views)
            for s in range(slot, slot + n):
                pending[s].set()

    async def reader() -> None:
        buf = bytearray(page_size * 64)
        for slot, n in reads:
            for s in range(slot, slot + n):
                ev = pending.get(s)
                if ev is not None:
                    await ev.wait()
            views = [memoryview(buf)[i * page_size:(i + 1) * page_size] for i in range(n)]
            await st.swap_rw("read", slot, views)
            for i in range(n):
                got = int.from_bytes(buf[i * page_size:i * page_size + 8], "little")
                if got != slot + i:
                    raise RuntimeError(f"baseline read back the wrong data at slot {slot + i}: stamp {got}")

    async with trio.open_nursery() as w:
        for _ in range(min(max_writes, len(writes))):
            w.start_soon(writer)
        if reads:
            w.start_soon(reader)


async def baseline(backend: str, server: Any, out_trace: list[tuple[str, int, int]],
                   in_trace: list[tuple[str, int, int]], nr_slots: int) -> dict[str, float]:
    """The same storage class over plain sockets: the same requests, the same concurrency."""
    if backend == "iscsi":
        from emu.swapdev.iscsi import IscsiSwapLun

        st: Any = IscsiSwapLun(None, server, via_host=False)
    else:
        from emu.swapdev.endpoint import nfs_transport
        from emu.swapdev.nfs import NfsSwapFile

        st = NfsSwapFile(None, server, nfs_transport(backend), via_host=False)
    res: dict[str, float] = {}
    async with trio.open_nursery() as n:
        await n.start(st.run)
        await st.swap_activate(nr_slots, 4096)
        t0 = time.perf_counter()
        await replay(st, out_trace)
        t1 = time.perf_counter()
        await replay(st, in_trace)
        t2 = time.perf_counter()
        res.update(out_s=t1 - t0, in_s=t2 - t1)
        n.cancel_scope.cancel()
    return res


def _ops(trace: list[tuple[str, int, int]]) -> dict[str, int]:
    """Requests and pages per op of a phase (both sides made exactly these)."""
    c: dict[str, int] = {}
    for op, _slot, n in trace:
        c[op] = c.get(op, 0) + 1
        c[f"{op}_pages"] = c.get(f"{op}_pages", 0) + n
    return c


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--backend", type=click.Choice(scen.BACKENDS), default="nfs-udp", show_default=True, help="Swap storage to measure.")
@click.option("--ram", default="12M", show_default=True, metavar="SIZE", help="Emulated RAM.")
@click.option("--pages", type=click.IntRange(min=256), default=8192, show_default=True, help="Pages the process writes and reads back (more than RAM).")
@click.option("--swap-cluster", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Pages per swap I/O: contiguous slots written together, and the swap-in readahead "
                   "window (2^page_cluster = 8 at most); 1 = one page per request, as the demo.")
@click.option("--server", metavar="URL", help="Measure against this server instead of starting ours.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_swap(backend: str, ram: str, pages: int, swap_cluster: int, server: str | None, as_json: bool) -> None:
    """Emulated host swap throughput vs the same client unemulated.

    Prints swap-out and swap-in pages/s of the emulated host, of the same client writing and
    reading the same number of pages to the same server over plain sockets, their ratios, and
    the peak resident memory of this process against emulated RAM + 64 MiB.
    """
    from rich.console import Console

    from emu.host.servers import local_server
    from emu.swapdev.endpoint import ServerURLError, server_for_backend
    from emu.util.units import parse_size

    console = Console(stderr=True)
    try:
        ram_b = parse_size(ram)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--ram") from None
    if pages * 4096 <= ram_b:
        raise click.BadParameter(f"{pages} pages fit in RAM ({ram}): nothing would swap", param_hint="--pages")
    sc = _scenario(backend, ram_b, pages, swap_cluster)
    nr_slots = sc.host.swap // 4096

    def measure(srv: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        console.print(f"[bold]bench swap[/]: {backend}, {pages} pages through a {ram} emulated host ...")
        emu_r = emulated(sc, srv, pages)
        console.print("baseline: the same client over plain sockets ...")
        base_r = trio.run(baseline, backend, srv, emu_r["out_trace"], emu_r["in_trace"], nr_slots)
        return emu_r, base_r

    if server:
        try:
            srv = server_for_backend(backend, server)
        except ServerURLError as e:
            raise click.BadParameter(str(e), param_hint="--server") from None
        emu_r, base_r = measure(srv)
    else:
        with local_server(backend, sc.host.swap) as sp:
            emu_r, base_r = measure(sp.server)

    limit = ram_b + RSS_SLACK
    extra = {"backend": backend, "ram": ram_b, "pages": pages, "swap_cluster": swap_cluster, "vm_hwm": int(emu_r["hwm"]),
             "rss_limit": limit, "rss_ok": emu_r["hwm"] <= limit, "mismatches": int(emu_r["mismatches"])}
    results = [
        BenchResult("swap-out", "pages/s", emu_r["out_pages"] / emu_r["out_s"], emu_r["out_pages"] / base_r["out_s"],
                    "same client, plain sockets", extra={**extra, "pages_out": int(emu_r["out_pages"]), "fill_s": round(emu_r["out_fill_s"], 3),
                                                                "requests": _ops(emu_r["out_trace"])}),
        BenchResult("swap-in", "pages/s", emu_r["in_pages"] / emu_r["in_s"], emu_r["in_pages"] / base_r["in_s"],
                    "same client, plain sockets", extra={**extra, "pages_in": int(emu_r["in_pages"]),
                                                                "pages_out_meanwhile": int(emu_r["in_phase_out_pages"]),
                                                                "requests": _ops(emu_r["in_trace"])}),
    ]
    emit(results, as_json, console=Console())
    if not as_json:
        ok = "[green]under[/]" if extra["rss_ok"] else "[red]OVER[/]"
        console.print(f"peak RSS (VmHWM) {extra['vm_hwm'] / 2**20:.1f} MiB: {ok} emulated RAM + 64 MiB "
                      f"= {limit / 2**20:.0f} MiB; integrity mismatches {extra['mismatches']}")
    if extra["mismatches"] or not extra["rss_ok"]:
        sys.exit(1)
