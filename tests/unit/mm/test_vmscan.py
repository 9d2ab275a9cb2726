"""Reclaim: kswapd, direct reclaim with writeback waits, GFP_NOIO, OOM, the pfmemalloc throttle."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from emu.mm.gfp import GFP_KERNEL, GFP_NOFS, GFP_NOIO
from emu.mm.page_alloc import OutOfMemory, Page
from emu.mm.process import Process
from emu.kernel.sched import TaskFlags, all_tasks, task
from emu.mm.vmscan import SWAP_CLUSTER_MAX


async def test_kswapd_wakes_below_low_and_reclaims_to_high(make_host, swapfile: str,
                                                           autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=2 << 20, latency=0.01)
    zone, mm = h.zone, h.mm
    kswapd = mm.kswapd.task
    assert kswapd.flags & TaskFlags.PF_MEMALLOC and kswapd.flags & TaskFlags.PF_KSWAPD
    await trio.sleep(1)
    assert kswapd.state == "S" and mm.vmstat["pageoutrun"] == 0
    p = Process(mm, "filler", zone.nr_pages)
    with task("filler"):
        i = 0
        while zone.nr_free > zone.watermark_low:  # fast path only: kswapd stays asleep
            await p.touch(i)
            i += 1
        assert mm.vmstat["kswapd_wakeup"] == 0
        await p.touch(i)  # the first allocation at low wakes it
    assert mm.vmstat["kswapd_wakeup"] == 1
    await trio.sleep(5)
    assert zone.nr_free >= zone.watermark_high  # reclaimed up to high ...
    assert zone.nr_free <= zone.watermark_high + SWAP_CLUSTER_MAX  # ... and not far beyond
    assert mm.vmstat["pgscan_kswapd"] > 0 and mm.vmstat["pswpout"] > 0 and mm.vmstat["pgsteal"] > 0
    assert mm.vmstat["pgscan_direct"] == 0 and mm.vmstat["allocstall"] == 0
    assert kswapd.state == "S"


async def test_direct_reclaim_waits_for_writeback(make_host, swapfile: str,
                                                  autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=2 << 20, latency=0.05, kswapd=False)
    zone, mm = h.zone, h.mm
    p = Process(mm, "hog", 3 * zone.nr_pages)
    states: set[str] = set()

    async def watch() -> None:
        while True:
            states.update(f"{t.comm}:{t.state}:{t.wchan}" for t in all_tasks())
            await trio.sleep(0.01)

    async with trio.open_nursery() as n:
        n.start_soon(watch)
        with task("hog"):
            for i in range(p.nr_pages):
                await p.touch(i)
        n.cancel_scope.cancel()
    assert mm.vmstat["allocstall"] > 0 and mm.vmstat["pgscan_direct"] > 0 and mm.vmstat["pgscan_kswapd"] == 0
    assert "hog:D reclaim:congestion_wait" in states  # waited for writeback to complete
    assert any(s.startswith("kswapio:D writeback:swap_rw write") for s in states)
    assert h.storage.max_inflight > 1  # several swap writes in flight at once
    assert zone.nr_free >= 0 and mm.nr_verify_errors == 0
    # The direct reclaimer ran under PF_MEMALLOC only while reclaiming.
    with task("hog") as t:
        await p.touch(0, write=False)
        assert not t.flags & TaskFlags.PF_MEMALLOC


async def test_noio_reclaim_starts_no_writes(make_host, swapfile: str,
                                             autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=2 << 20, kswapd=False)
    mm = h.mm
    p = Process(mm, "p", 200)
    with task("p"):
        for i in range(200):
            await p.touch(i)
    for page in list(mm.lru):
        page.PG_referenced = False
    freed, started, scanned = mm.vmscan.shrink_list(64, GFP_NOIO, kswapd=False)
    assert (freed, started, scanned) == (0, 0, 64) and mm.nr_writeback == 0
    freed, started, scanned = mm.vmscan.shrink_list(64, GFP_NOFS, kswapd=False)
    assert started == 64  # local swap is not a filesystem: GFP_NOFS may write it
    for a in mm.swap_areas:
        a.fs_backed = True  # a swap file on NFS: GFP_NOFS must not enter it
    freed, started, _ = mm.vmscan.shrink_list(64, GFP_NOFS, kswapd=False)
    assert started == 0
    freed, started, _ = mm.vmscan.shrink_list(64, GFP_KERNEL, kswapd=False)
    assert started == 64


async def test_referenced_pages_get_a_second_chance(make_host, swapfile: str,
                                                    autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=2 << 20, kswapd=False)
    mm = h.mm
    p = Process(mm, "p", 100)
    with task("p"):
        for i in range(100):
            await p.touch(i)
    for page in mm.lru:
        page.PG_referenced = page.index % 2 == 0
    _, started, _ = mm.vmscan.shrink_list(100, GFP_KERNEL, kswapd=False)
    assert started == 50
    assert all(isinstance(p.pte[i], Page) for i in range(0, 100, 2))
    assert all(isinstance(p.pte[i], int) for i in range(1, 100, 2))
    assert mm.vmstat["pgactivate"] == 50


async def test_out_of_memory_without_swap(make_host) -> None:
    h = await make_host(None, ram=1 << 20, kswapd=False)
    p = Process(h.mm, "p", 2 * h.zone.nr_pages)
    with task("p"), pytest.raises(OutOfMemory, match="no swap"):
        for i in range(p.nr_pages):
            await p.touch(i)
    assert h.mm.vmstat["oom_kill"] == 1


def _squeeze(zone, target: int) -> list[Page]:  # type: ignore[no-untyped-def]
    held: list[Page] = []
    with task("hog", TaskFlags.PF_MEMALLOC):
        while zone.nr_free > target:
            held.extend(zone.alloc_pages(GFP_KERNEL) or [])
    return held


async def test_pfmemalloc_throttle(make_host, swapfile: str, autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=2 << 20, policy="pfmemalloc")
    zone, mm = h.zone, h.mm
    vmscan = mm.vmscan
    held = _squeeze(zone, zone.watermark_min // 2)  # pfmemalloc_watermark_ok() is now false
    assert not zone.pfmemalloc_watermark_ok()
    ends: dict[str, float] = {}

    async def reclaimer(name: str, gfp, flags=TaskFlags(0)) -> None:  # type: ignore[no-untyped-def]
        with task(name, flags):
            await vmscan.throttle_direct_reclaim(gfp)
            ends[name] = trio.current_time()

    async with trio.open_nursery() as n:
        n.start_soon(reclaimer, "fs", GFP_KERNEL)
        n.start_soon(reclaimer, "nofs", GFP_NOFS)
        n.start_soon(reclaimer, "kthread", GFP_KERNEL, TaskFlags.PF_KTHREAD)
        await trio.sleep(0.5)
        blocked = {t.comm: (t.state, t.wchan) for t in all_tasks()}
        assert blocked["fs"] == ("D pfmemalloc_wait", "throttle_direct_reclaim")
        await trio.sleep(4.5)
        zone.free_pages(held[:40])  # memory comes back; kswapd wakes the throttled
    assert ends["kthread"] == 0.0  # kernel threads are never throttled
    assert ends["nofs"] == pytest.approx(1.0)  # without __GFP_FS: at most one second
    assert 5.0 <= ends["fs"] <= 5.2  # with __GFP_FS: until the watermark is fine again
    assert mm.vmstat["pgscan_direct_throttle"] == 2


async def test_no_throttle_under_other_policies(make_host, swapfile: str,
                                                autojump_clock: trio.testing.MockClock) -> None:
    for policy in ("none", "v12"):
        h = await make_host(swapfile + policy, ram=2 << 20, policy=policy, kswapd=False)
        _squeeze(h.zone, h.zone.watermark_min // 2)
        with task("p"):
            t0 = trio.current_time()
            # Nothing to reclaim, swap present: one round waits (congestion_wait), never throttled.
            await h.mm.vmscan.direct_reclaim(h.zone, GFP_KERNEL, 0)
            assert trio.current_time() - t0 == pytest.approx(0.1)
        assert h.mm.vmstat["pgscan_direct_throttle"] == 0 and h.mm.vmstat["allocstall"] == 1


async def test_congested_device_makes_direct_reclaim_wait(make_host, swapfile: str,
                                                          autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=2 << 20, latency=2.0, kswapd=False, max_writeback=16)
    zone, mm = h.zone, h.mm
    p = Process(mm, "hog", 2 * zone.nr_pages)
    peak = 0
    async with trio.open_nursery() as n:
        async def hog() -> None:
            with task("hog"):
                for i in range(p.nr_pages):
                    await p.touch(i)
        n.start_soon(hog)
        for _ in range(100):
            await trio.sleep(0.1)
            peak = max(peak, mm.nr_writeback, h.storage.inflight)
    assert 1 < peak <= 16  # never more than max_writeback pages under writeback
    assert mm.nr_verify_errors == 0


async def test_kswapd_yields_to_throttled_tasks_it_woke(make_host, swapfile: str,
                                                       autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=2 << 20, policy="pfmemalloc")
    zone, mm = h.zone, h.mm
    held = _squeeze(zone, zone.watermark_min // 2)
    ended: list[float] = []

    async def reclaimer() -> None:
        with task("fs"):
            await mm.vmscan.throttle_direct_reclaim(GFP_KERNEL)
            ended.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(reclaimer)
        await trio.sleep(1)
        zone.free_pages(held)  # far above high at once: kswapd has nothing to reclaim
    assert ended and ended[0] <= 1.2


class GatedSwap:
    """Local-file swap whose writes wait for a gate: a network swap whose replies never come."""

    fs_backed = False

    def __init__(self, path: str) -> None:
        from emu.mm.swap import LocalFileSwap

        self.inner = LocalFileSwap(path)
        self.gate = trio.Event()
        self.waiting = 0

    async def swap_activate(self, nr_pages: int, page_size: int) -> None:
        await self.inner.swap_activate(nr_pages, page_size)

    async def swap_rw(self, op, slot, bufs):  # type: ignore[no-untyped-def]
        if op == "write" and slot > 0:
            self.waiting += 1
            await self.gate.wait()
            self.waiting -= 1
        await self.inner.swap_rw(op, slot, bufs)

    async def swap_deactivate(self) -> None:
        await self.inner.swap_deactivate()


async def test_stuck_writeback_blocks_reclaim_until_it_completes(make_host, swapfile: str,
                                                                 autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(None, ram=2 << 20)
    zone, mm = h.zone, h.mm
    storage = GatedSwap(swapfile)
    await mm.swapon(storage, 4096)
    procs = [Process(mm, f"w{i}", zone.nr_pages) for i in range(2)]
    done = [0, 0]

    async def worker(i: int) -> None:
        with task(f"w{i}"):
            for pg in range(procs[i].nr_pages):
                await procs[i].touch(pg)
                done[i] += 1

    async with trio.open_nursery() as n:
        for i in range(2):
            n.start_soon(worker, i)
        await trio.sleep(10)
        # Memory is exhausted and no write completes: nothing is freed, everybody waits.
        stuck_at = (list(done), zone.nr_freed)
        await trio.sleep(10)
        assert (list(done), zone.nr_freed) == stuck_at
        assert storage.waiting > 0 and mm.nr_writeback >= storage.waiting  # pages >= I/Os
        states = {t.comm: t.state for t in all_tasks()}
        assert states["w0"].startswith("D") and states["w1"].startswith("D")
        assert zone.nr_free <= zone.watermark_min
        storage.gate.set()  # the replies arrive
    assert done == [zone.nr_pages, zone.nr_pages]
    with task("check"):
        for p in procs:
            for pg in range(p.nr_pages):
                await p.touch(pg, write=False)
    assert mm.nr_verify_errors == 0 and mm.vmstat["pswpin"] > 0
