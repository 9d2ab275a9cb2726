"""`Mm`: one emulated host's memory manager, tying zone, slabs, reserve, LRU, swap and kswapd.

Run it (`await nursery.start(mm.run)`) before swapping: swap writes are trio tasks in its nursery,
so many can be in flight while their storage (possibly a slow network) completes them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import trio

from emu.mm.gfp import GFP_HIGHUSER
from emu.mm.page_alloc import Page, Zone
from emu.mm.sched import TaskFlags, task, waiting
from emu.mm.slab import Slabs
from emu.mm.swap import (
    MAX_SWAPFILES,
    SWP_OFFSET_MASK,
    SWP_TYPE_SHIFT,
    SwapArea,
    SwapIOError,
    SwapStorage,
    check_swap_header,
    group_contiguous,
    make_swap_header,
)
from emu.mm.vmscan import Kswapd, Vmscan
from emu.mm.vmstat import VmStat

if TYPE_CHECKING:
    from emu.mm.process import Process
    from emu.mm.reserve import ReserveTree

_IO_FLAGS = TaskFlags.PF_MEMALLOC | TaskFlags.PF_KTHREAD


class Mm:
    """The host's mm: `Mm(zone, slabs, reserve, vmstat)`.

    `max_writeback`: pages that may be under writeback at once (beyond it reclaim waits: the
    device is congested).  `max_io_pages`: largest single swap_rw (contiguous slots).
    """

    def __init__(
        self,
        zone: Zone,
        slabs: Slabs | None = None,
        reserve: ReserveTree | None = None,
        vmstat: VmStat | None = None,
        *,
        max_writeback: int = 256,
        max_io_pages: int = 16,
        kswapd: bool = True,
    ) -> None:
        if max_writeback < 1 or max_io_pages < 1:
            raise ValueError("max_writeback and max_io_pages must be >= 1")
        self.zone = zone
        if vmstat is not None:
            zone.vmstat = vmstat
        self.vmstat = zone.vmstat
        self.slabs = slabs if slabs is not None else Slabs(zone)
        self.reserve = reserve
        self.max_writeback = max_writeback
        self.max_io_pages = max_io_pages
        self.lru: OrderedDict[Page, None] = OrderedDict()
        self.swap_areas: list[SwapArea] = []
        self.swap_cache: dict[int, Page] = {}
        self.processes: list[Process] = []
        self.nr_writeback = 0
        self.nr_verify_errors = 0
        self.verify_errors: list[tuple[str, int, int, int]] = []  # (process, pid, page, version), first 100
        self.nr_swap_io_errors = 0
        self._io_event = trio.Event()
        self._io_waited = False
        self._nursery: trio.Nursery | None = None
        self.vmscan = Vmscan(self)
        zone.register_reclaimer(self.vmscan)
        self.kswapd = Kswapd(self) if kswapd else None

    # ---- running --------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the swap-I/O tasks (and kswapd) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.kswapd is not None:
                await nursery.start(self.kswapd.run)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    @property
    def running(self) -> bool:
        return self._nursery is not None

    # ---- swap areas ------------------------------------------------------------------------------

    async def swapon(self, storage: SwapStorage, nr_pages: int, prio: int = -1) -> SwapArea:
        """sys_swapon(): activate the storage, write and verify the header, add the area."""
        if nr_pages < 2:
            raise ValueError(f"swap area of {nr_pages} pages: needs at least 2")
        if len(self.swap_areas) >= MAX_SWAPFILES:
            raise ValueError("MAX_SWAPFILES reached")
        ps = self.zone.page_size
        await storage.swap_activate(nr_pages, ps)
        header = bytearray(make_swap_header(nr_pages, ps))
        await storage.swap_rw("write", 0, [memoryview(header)])
        back = bytearray(ps)
        await storage.swap_rw("read", 0, [memoryview(back)])
        check_swap_header(back, nr_pages, ps)
        area = SwapArea(storage, nr_pages, type_=len(self.swap_areas), prio=prio)
        self.swap_areas.append(area)
        return area

    async def swapoff(self, area: SwapArea) -> None:
        """sys_swapoff(): read every page back in (verified) and deactivate the storage."""
        for proc in list(self.processes):
            for page_no, pte in enumerate(proc.pte):
                if pte.__class__ is int and pte >> SWP_TYPE_SHIFT == area.type:
                    await proc.touch(page_no, write=False)
                    page = proc.pte[page_no]
                    if page.__class__ is Page and page.PG_swapcache:
                        self.delete_from_swap_cache(page, free_slot=True)
                        page.PG_dirty = True
        while any(p.PG_writeback for p in self.swap_cache.values()):
            await self.wait_writeback_progress()
        await area.storage.swap_deactivate()
        self.swap_areas[area.type] = _DeadArea(area)  # keep type numbers stable

    def get_swap_page(self) -> int | None:
        """Allocate a slot from the highest-priority area that has one."""
        for area in sorted(self.swap_areas, key=lambda a: -a.prio):
            if area.nr_slots and area.nr_free > 0:
                return area.get_swap_page()
        return None

    @property
    def nr_swap_free(self) -> int:
        return sum(a.nr_free for a in self.swap_areas)

    def swap_free(self, entry: int) -> None:
        self.swap_areas[entry >> SWP_TYPE_SHIFT].swap_free(entry)

    # ---- LRU and page life -----------------------------------------------------------------------

    def lru_add(self, page: Page) -> None:
        self.lru[page] = None
        page.PG_lru = True

    def lru_del(self, page: Page) -> None:
        if page.PG_lru:
            del self.lru[page]
            page.PG_lru = False

    def add_to_swap_cache(self, page: Page, entry: int) -> None:
        page.PG_swapcache = True
        page.private = entry
        self.swap_cache[entry] = page
        self.zone.state["nr_swapcache"] += 1

    def delete_from_swap_cache(self, page: Page, free_slot: bool) -> None:
        entry = page.private
        del self.swap_cache[entry]
        page.PG_swapcache = False
        page.private = None
        self.zone.state["nr_swapcache"] -= 1
        if free_slot:
            self.swap_free(entry)

    async def alloc_user_page(self) -> Page:
        pages = self.zone.alloc_pages(GFP_HIGHUSER)
        if pages is None:
            pages = await self.zone.alloc_pages_wait(GFP_HIGHUSER)
        return pages[0]

    def release_page(self, page: Page) -> None:
        """A mapped page goes away (process exit)."""
        if page.PG_writeback or page.PG_locked:
            page.mapping = None  # orphan: the I/O completion frees it
            return
        if page.PG_swapcache:
            self.delete_from_swap_cache(page, free_slot=True)
        self.lru_del(page)
        self.zone.free_page(page)

    def release_swap_entry(self, entry: int) -> None:
        """A swap pte goes away (process exit)."""
        page = self.swap_cache.get(entry)
        if page is None:
            self.swap_free(entry)
            return
        if page.PG_writeback or page.PG_locked:
            page.mapping = None
            return
        self.delete_from_swap_cache(page, free_slot=True)
        self.lru_del(page)
        self.zone.free_page(page)

    # ---- I/O progress ----------------------------------------------------------------------------

    def _io_done(self) -> None:
        if self._io_waited:
            self._io_waited = False
            self._io_event.set()
            self._io_event = trio.Event()

    async def wait_writeback_progress(self) -> None:
        """Sleep until some swap I/O completes (a write ends or a read unlocks its page)."""
        self._io_waited = True
        await self._io_event.wait()

    # ---- swap-in ---------------------------------------------------------------------------------

    async def swapin(self, proc: Process, page_no: int, entry: int) -> Page | None:
        """do_swap_page(): the page from the swap cache, or read from storage and verified.

        Returns None when the pte changed while we slept (the caller looks again).
        """
        page = self.swap_cache.get(entry)
        if page is not None:
            if page.PG_locked:  # another task is reading it in
                with waiting("D pagefault", "__lock_page"):
                    await self.wait_writeback_progress()
                return None
            proc.min_flt += 1
            return page
        page = await self.alloc_user_page()
        if proc.pte[page_no] != entry or entry in self.swap_cache:
            self.zone.free_page(page)
            return None
        area = self.swap_areas[entry >> SWP_TYPE_SHIFT]
        self.add_to_swap_cache(page, entry)
        page.PG_locked = True
        page.mapping = proc
        page.index = page_no
        c = self.vmstat.counters
        c["pgmajfault"] += 1
        c["pswpin"] += 1
        proc.maj_flt += 1
        try:
            with waiting("D pagefault", "swap_readpage"):
                await area.storage.swap_rw("read", entry & SWP_OFFSET_MASK, [memoryview(page.data)])
        except BaseException as exc:
            page.PG_locked = False
            self.delete_from_swap_cache(page, free_slot=False)
            self.zone.free_page(page)
            self._io_done()
            if isinstance(exc, (SwapIOError, OSError)):
                area.nr_read_errors += 1
                self.nr_swap_io_errors += 1
                raise SwapIOError(f"swap read of {proc.name} page {page_no} failed: {exc}") from exc
            raise
        page.PG_locked = False
        page.PG_uptodate = True
        page.PG_dirty = False
        self._io_done()
        if page.mapping is None:  # the process exited while we read
            self.delete_from_swap_cache(page, free_slot=True)
            self.zone.free_page(page)
            return None
        if not proc.verify(page_no, page.data):
            self.nr_verify_errors += 1
            if len(self.verify_errors) < 100:
                self.verify_errors.append((proc.name, proc.pid, page_no, proc.version[page_no]))
        return page

    # ---- swap-out --------------------------------------------------------------------------------

    def swap_writepages(self, pages: list[Page]) -> None:
        """swap_writepage() for a batch: contiguous slots go out as one swap_rw each, async."""
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("swap-out needs the Mm running: `await nursery.start(mm.run)` first")
        by_area: dict[int, list[tuple[int, Page]]] = {}
        for p in pages:
            entry = p.private
            by_area.setdefault(entry >> SWP_TYPE_SHIFT, []).append((entry & SWP_OFFSET_MASK, p))
            p.PG_writeback = True
            p.PG_dirty = False
        n = len(pages)
        self.nr_writeback += n
        self.zone.state["nr_writeback"] += n
        self.vmstat.counters["pswpout"] += n
        for type_, pairs in by_area.items():
            pairs.sort(key=lambda sp: sp[0])
            area = self.swap_areas[type_]
            for slot, run in group_contiguous(pairs, self.max_io_pages):
                nursery.start_soon(self._write_run, area, slot, run)

    async def _write_run(self, area: SwapArea, slot: int, pages: list[Page]) -> None:
        # Swap writes run under PF_MEMALLOC, as rpciod does for swap RPCs (RPC_TASK_SWAPPER).
        err: BaseException | None = None
        with task("kswapio", _IO_FLAGS) as t:
            t.state, t.wchan = "D writeback", f"swap_rw write {area.type}:{slot}+{len(pages)}"
            try:
                await area.storage.swap_rw("write", slot, [memoryview(p.data) for p in pages])
            except (SwapIOError, OSError) as exc:
                err = exc
                area.nr_write_errors += 1
                self.nr_swap_io_errors += 1
            except BaseException:
                for p in pages:
                    self.end_page_writeback(p, True)
                raise
        for p in pages:
            self.end_page_writeback(p, err is not None)
        self._io_done()
        self.vmscan.wake_throttled()

    def end_page_writeback(self, page: Page, error: bool) -> None:
        """Writeback finished: free the page if it is still unmapped and clean (pgsteal)."""
        page.PG_writeback = False
        self.nr_writeback -= 1
        self.zone.state["nr_writeback"] -= 1
        proc = page.mapping
        if proc is None:  # orphaned by exit
            if page.PG_swapcache:
                self.delete_from_swap_cache(page, free_slot=True)
            self.lru_del(page)
            self.zone.free_page(page)
            return
        if error:
            page.PG_dirty = True  # keep the data; reclaim will try again
            self.lru_add(page)
            return
        if proc.pte[page.index] is page or page.PG_dirty:
            self.lru_add(page)  # faulted back in meanwhile
            return
        self.delete_from_swap_cache(page, free_slot=False)  # the pte keeps the slot
        self.lru_del(page)
        self.zone.free_page(page)
        self.vmstat.counters["pgsteal"] += 1

    # ---- views -----------------------------------------------------------------------------------

    def meminfo(self) -> str:
        kb = self.zone.page_size // 1024
        total = sum(a.nr_slots - 1 for a in self.swap_areas)
        free = self.nr_swap_free
        extra = {"SwapTotal": total * kb, "SwapFree": free * kb}
        return self.vmstat.meminfo(self.zone, extra)

    def swaps(self) -> str:
        """/proc/swaps."""
        kb = self.zone.page_size // 1024
        lines = ["Filename\t\t\t\tType\t\tSize\tUsed\tPriority"]
        for a in self.swap_areas:
            name = getattr(a.storage, "path", None) or repr(a.storage)
            lines.append(f"{name:<40}file\t\t{(a.nr_slots - 1) * kb}\t{a.inuse_pages * kb}\t{a.prio}")
        return "\n".join(lines) + "\n"


class _DeadArea(SwapArea):
    """A swapped-off area keeps its type number; it has no free slots."""

    def __init__(self, old: SwapArea) -> None:
        self.__dict__.update(old.__dict__)
        self.nr_slots = 0
        self.inuse_pages = 0

    @property
    def nr_free(self) -> int:
        return 0
