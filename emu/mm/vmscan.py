"""Page reclaim: the LRU scan, kswapd, direct reclaim and (pfmemalloc policy) its throttle.

One LRU of anonymous pages with a referenced bit (second chance).  Reclaiming a page: give it a
swap slot (swap cache), unmap it (the pte gets the swap entry), and if dirty start an async write;
the page is freed when the write completes (pgsteal), or at once if it was clean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from emu.mm.gfp import GFP_KERNEL, Gfp
from emu.kernel.policy import Policy
from emu.mm.page_alloc import OutOfMemory, Zone
from emu.kernel.sched import Task, TaskFlags, current, memalloc_noreclaim, task, waiting

if TYPE_CHECKING:
    from emu.mm.vm import Vm

SWAP_CLUSTER_MAX = 32
DEF_PRIORITY = 12
CONGESTION_WAIT = 0.1  # congestion_wait(WRITE, HZ/10)
THROTTLE_NOFS_TIMEOUT = 1.0  # callers without __GFP_FS wait at most HZ


class Vmscan:
    """The reclaimer registered with the zone (direct reclaim), and the scan kswapd also uses."""

    def __init__(self, mm: Vm) -> None:
        self.mm = mm
        self._pfmemalloc_wait: trio.Event | None = None
        self.nr_throttled_now = 0

    # ---- the scan ------------------------------------------------------------------------------

    def reclaim_deficit(self, mark: int) -> int:
        """Pages still to free to get above `mark`, counting writes already in flight."""
        zone = self.mm.zone
        return mark + zone._emerg + 1 - zone.nr_free - self.mm.nr_writeback

    def shrink_list(self, nr_to_scan: int, gfp: Gfp | int, *, kswapd: bool, nr_to_write: int | None = None) -> tuple[int, int, int]:
        """shrink_inactive_list() + shrink_page_list(): returns (freed, writes started, scanned)."""
        mm = self.mm
        lru = mm.lru
        zone = mm.zone
        c = mm.vmstat.counters
        may_io = kswapd or bool(gfp & Gfp.IO)
        may_fs = kswapd or bool(gfp & Gfp.FS)
        fs_block = not may_fs and any(a.fs_backed for a in mm.swap_areas)
        can_write = may_io and not fs_block
        write_budget = mm.max_writeback - mm.nr_writeback
        if nr_to_write is not None:
            write_budget = min(write_budget, nr_to_write)
        to_write: list[Any] = []
        freed = scanned = 0
        for _ in range(min(nr_to_scan, len(lru))):
            page, _ = lru.popitem(last=False)
            page.PG_lru = False
            scanned += 1
            if page.PG_referenced:  # second chance
                page.PG_referenced = False
                lru[page] = None
                page.PG_lru = True
                c["pgactivate"] += 1
                continue
            if page.PG_locked or page.PG_writeback:
                lru[page] = None
                page.PG_lru = True
                continue
            if not page.PG_swapcache:
                if not can_write or len(to_write) >= write_budget:
                    lru[page] = None
                    page.PG_lru = True
                    continue
                entry = mm.get_swap_page()
                if entry is None:  # swap full
                    lru[page] = None
                    page.PG_lru = True
                    continue
                mm.add_to_swap_cache(page, entry)
            proc = page.mapping
            if proc is not None and proc.pte[page.index] is page:
                proc.unmap(page, page.private)
            if page.PG_dirty:
                if not can_write or len(to_write) >= write_budget:
                    lru[page] = None  # unmapped, dirty, in the swap cache: written next time
                    page.PG_lru = True
                    continue
                to_write.append(page)  # isolated from the LRU while under writeback
            else:
                mm.delete_from_swap_cache(page, free_slot=False)
                zone.free_page(page)
                freed += 1
                c["pgsteal"] += 1
        if to_write:
            mm.swap_writepages(to_write)
        c["pgscan_kswapd" if kswapd else "pgscan_direct"] += scanned
        mm.cpu.charge(scanned * mm.cpu.costs.page_scan)
        return freed, len(to_write), scanned

    def reclaimable(self) -> bool:
        """Could a scan make progress at all (swap space, or clean swap-cache pages)?"""
        mm = self.mm
        return mm.nr_swap_free > 0 or bool(mm.swap_cache)

    # ---- direct reclaim --------------------------------------------------------------------------

    async def direct_reclaim(self, zone: Zone, gfp: Gfp, order: int) -> int:
        """try_to_free_pages(): reclaim under PF_MEMALLOC, wait for writeback; pages freed."""
        mm = self.mm
        if zone.policy is Policy.PFMEMALLOC:
            await self.throttle_direct_reclaim(gfp)
            if zone.zone_watermark_ok(order, zone.watermark_min):
                return 0
        mm.vmstat.counters["allocstall"] += 1
        freed0 = zone.nr_freed
        with memalloc_noreclaim(), waiting("D reclaim", "try_to_free_pages"):
            started = 0
            if mm.nr_writeback >= mm.max_writeback:  # the device is congested: just wait
                with waiting("D reclaim", "congestion_wait"), trio.move_on_after(CONGESTION_WAIT):
                    await mm.wait_writeback_progress()
                return zone.nr_freed - freed0
            for priority in range(DEF_PRIORITY, -1, -1):
                want = max(SWAP_CLUSTER_MAX, self.reclaim_deficit(zone.watermark_min))
                nr_scan = max(SWAP_CLUSTER_MAX, len(mm.lru) >> priority)
                _, s, _ = self.shrink_list(nr_scan, gfp, kswapd=False, nr_to_write=want)
                started += s
                if zone.nr_freed - freed0 >= SWAP_CLUSTER_MAX or started >= SWAP_CLUSTER_MAX:
                    break
                if zone.zone_watermark_ok(order, zone.watermark_min):
                    break
                if mm.nr_writeback >= mm.max_writeback:
                    break  # congested now: scanning further cannot start I/O; wait instead
                if not mm.lru:
                    break
            if zone.nr_freed > freed0:
                await trio.lowlevel.checkpoint()  # cond_resched()
                return zone.nr_freed - freed0
            if mm.nr_writeback:
                with waiting("D reclaim", "congestion_wait"), trio.move_on_after(CONGESTION_WAIT):
                    await mm.wait_writeback_progress()
                return zone.nr_freed - freed0
            if not mm.swap_areas or not self.reclaimable():
                mm.vmstat.counters["oom_kill"] += 1
                raise OutOfMemory(
                    f"out of memory: {zone.nr_free} pages free (min {zone.watermark_min}), nothing to "
                    f"reclaim ({'no swap' if not mm.swap_areas else 'swap full'}), no writeback in flight"
                )
            # Nothing this context may do: let kswapd (which may write) or others free memory.
            zone.wakeup_kswapd(order)
            with waiting("D reclaim", "congestion_wait"), trio.move_on_after(CONGESTION_WAIT):
                await zone.wait_free_progress()
            return zone.nr_freed - freed0

    # ---- the pfmemalloc throttle (3.6) ------------------------------------------------------------

    async def throttle_direct_reclaim(self, gfp: Gfp | int) -> None:
        """Sleep on pfmemalloc_wait while free pages are below half the min watermarks.

        Kernel threads are not throttled; callers without __GFP_FS wait at most one second.
        """
        zone = self.mm.zone
        if current().flags & TaskFlags.PF_KTHREAD or zone.pfmemalloc_watermark_ok():
            return
        self.mm.vmstat.counters["pgscan_direct_throttle"] += 1
        zone.wakeup_kswapd()
        with waiting("D pfmemalloc_wait", "throttle_direct_reclaim"):
            if gfp & Gfp.FS:
                await self._wait_pfmemalloc_ok()
            else:
                with trio.move_on_after(THROTTLE_NOFS_TIMEOUT):
                    await self._wait_pfmemalloc_ok()

    async def _wait_pfmemalloc_ok(self) -> None:
        zone = self.mm.zone
        self.nr_throttled_now += 1
        try:
            while not zone.pfmemalloc_watermark_ok():
                if self._pfmemalloc_wait is None:
                    self._pfmemalloc_wait = trio.Event()
                await self._pfmemalloc_wait.wait()
        finally:
            self.nr_throttled_now -= 1

    def wake_throttled(self) -> None:
        """kswapd's wake_up(&pgdat->pfmemalloc_wait) once the watermark is fine again."""
        ev = self._pfmemalloc_wait
        if ev is not None and self.mm.zone.pfmemalloc_watermark_ok():
            self._pfmemalloc_wait = None
            ev.set()


class Kswapd:
    """kswapd0: wakes below `low`, reclaims until `high`, runs with PF_MEMALLOC."""

    def __init__(self, mm: Vm) -> None:
        self.mm = mm
        self.task: Task | None = None
        self.nr_runs = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        mm = self.mm
        zone = mm.zone
        with task("kswapd0", TaskFlags.PF_MEMALLOC | TaskFlags.PF_KSWAPD | TaskFlags.PF_KTHREAD) as t:
            self.task = t
            task_status.started()
            while True:
                if zone.zone_watermark_ok(0, zone.watermark_high) and not mm.vmscan.nr_throttled_now:
                    ev = trio.Event()
                    zone.kswapd_wait = ev
                    with waiting("S", "kswapd"):
                        await ev.wait()
                    continue
                await self.balance_pgdat()
                await trio.lowlevel.checkpoint()  # let the tasks it woke run before looking again

    async def balance_pgdat(self) -> None:
        """Reclaim until the high watermark holds (or nothing more can be done right now)."""
        mm = self.mm
        zone = mm.zone
        vmscan = mm.vmscan
        mm.vmstat.counters["pageoutrun"] += 1
        self.nr_runs += 1
        idle_rounds = 0
        while not zone.zone_watermark_ok(0, zone.watermark_high):
            deficit = vmscan.reclaim_deficit(zone.watermark_high)
            freed = started = 0
            if deficit > 0:
                nr_scan = max(SWAP_CLUSTER_MAX, 2 * deficit)
                freed, started, _ = vmscan.shrink_list(nr_scan, GFP_KERNEL, kswapd=True, nr_to_write=deficit)
            vmscan.wake_throttled()
            if freed:
                idle_rounds = 0
                await trio.lowlevel.checkpoint()
                continue
            if mm.nr_writeback:
                with waiting("D reclaim", "congestion_wait"), trio.move_on_after(CONGESTION_WAIT):
                    await mm.wait_writeback_progress()
                vmscan.wake_throttled()
                continue
            if started == 0:
                idle_rounds += 1
                if idle_rounds > 2:  # nothing reclaimable now: go back to sleep until woken
                    with waiting("S", "kswapd"), trio.move_on_after(CONGESTION_WAIT):
                        await zone.wait_free_progress()
                    return
            await trio.lowlevel.checkpoint()
        vmscan.wake_throttled()
