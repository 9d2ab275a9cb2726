"""`Vm`: the host's virtual-memory core around its one zone: the LRU, the swap areas and the swap
cache (swapper_space), page I/O (swap_writepage and swap_readpage), and kswapd.

Run it (`await nursery.start(vm.run)`) before swapping: swap writes are trio tasks in its nursery,
so many can be in flight while their storage (possibly a slow network) completes them.  (A
process's own address space is `process.Process`.)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import trio

from emu.kernel.cpu import Cpu
from emu.mm.gfp import GFP_HIGHUSER
from emu.mm.page_alloc import Page, Zone
from emu.mm.sizes import K
from emu.kernel.sched import TaskFlags, current, task
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
    from emu.mm.reserve import ReserveRoot

_IO_FLAGS = TaskFlags.PF_MEMALLOC | TaskFlags.PF_KTHREAD


class Vm:
    """The host's VM: `Vm(zone, slabs, reserve, vmstat)`.

    `max_writeback`: pages that may be under writeback at once (beyond it reclaim waits: the
    device is congested).  `max_io_pages`: largest single swap_rw (contiguous slots).
    `page_cluster`: swap readahead of 2^page_cluster pages (vm.page_cluster, default 3).
    """

    def __init__(
        self,
        zone: Zone,
        slabs: Slabs | None = None,
        reserve: ReserveRoot | None = None,
        vmstat: VmStat | None = None,
        *,
        max_writeback: int = 256,
        max_io_pages: int = 16,
        page_cluster: int = 3,
        kswapd: bool = True,
        cpu: Cpu | None = None,
    ) -> None:
        if max_writeback < 1 or max_io_pages < 1:
            raise ValueError("max_writeback and max_io_pages must be >= 1")
        if not 0 <= page_cluster <= 6:
            raise ValueError(f"page_cluster must be 0..6, not {page_cluster}")
        self.zone = zone
        self.cpu = cpu if cpu is not None else Cpu()
        if vmstat is not None:
            zone.vmstat = vmstat
        self.vmstat = zone.vmstat
        self.slabs = slabs if slabs is not None else Slabs(zone)
        self.reserve = reserve
        self.max_writeback = max_writeback
        self.max_io_pages = max_io_pages
        # vm.page_cluster: swap-in reads up to 2^page_cluster contiguous slots in one swap_rw
        # (forward readahead), bounded by max_io_pages; 0 disables readahead.
        self.page_cluster = page_cluster
        self.lru: OrderedDict[Page, None] = OrderedDict()
        self.swap_areas: list[SwapArea] = []
        self._by_prio: list[SwapArea] = []
        self.swap_cache: dict[int, Page] = {}
        self.processes: list[Process] = []
        self.nr_writeback = 0
        self.nr_verify_errors = 0
        self.verify_errors: list[tuple[str, int, int, int]] = []  # (process, pid, page, version), first 100
        self.nr_swap_io_errors = 0
        # Swap entries whose owner went away while their page was locked or under writeback:
        # the I/O completion frees page and slot.
        self._orphans: set[int] = set()
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
        self._by_prio = sorted(self.swap_areas, key=lambda a: -a.prio)
        return area

    async def swapoff(self, area: SwapArea) -> None:
        """sys_swapoff(): read every page back in (verified) and deactivate the storage.

        The area takes no new slots from the start (SWP_WRITEOK cleared); like Linux, this needs
        room in RAM (or in other swap areas) for everything it holds.
        """
        self._by_prio = [a for a in self._by_prio if a is not area]
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
        for area in self._by_prio:
            if area.inuse_pages < area.nr_slots - 1:
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
            self._orphans.add(page.private)  # the I/O completion frees page and slot
            page.mapping = None
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
            self._orphans.add(entry)
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

        Reads ahead the following contiguous in-use slots (up to 2^page_cluster, one swap_rw)
        while memory is plentiful; those pages wait in the swap cache and are verified when their
        owner faults on them.  Returns None when the pte changed while we slept (look again).
        """
        page = self.swap_cache.get(entry)
        if page is not None:
            if page.PG_locked:  # another task is reading it in
                t = current()
                old = t.state, t.wchan
                t.state, t.wchan = "D pagefault", "__lock_page"
                try:
                    await self.wait_writeback_progress()
                finally:
                    t.state, t.wchan = old
                return None
            proc.min_flt += 1
            if page.PG_readahead:
                page.PG_readahead = False
                self.vmstat.counters["swap_ra_hit"] += 1
                self._verify(proc, page_no, page)
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
        pages = [page]
        off = entry & SWP_OFFSET_MASK
        ra = min(1 << self.page_cluster, self.max_io_pages) - 1
        if ra > 0:
            self._readahead(area, entry, off, ra, pages)
        c = self.vmstat.counters
        c["pgmajfault"] += 1
        c["pswpin"] += len(pages)
        proc.maj_flt += 1
        t = current()
        old = t.state, t.wchan
        t.state, t.wchan = "D pagefault", "swap_readpage"
        try:
            await area.storage.swap_rw("read", off, [memoryview(p.data) for p in pages])
        except BaseException as exc:
            orphans = self._orphans
            for p in pages:
                p.PG_locked = False
                e = p.private
                self.delete_from_swap_cache(p, free_slot=e in orphans)
                orphans.discard(e)
                self.zone.free_page(p)
            self._io_done()
            if isinstance(exc, (SwapIOError, OSError)):
                area.nr_read_errors += 1
                self.nr_swap_io_errors += 1
                raise SwapIOError(f"swap read of {proc.name} page {page_no} failed: {exc}") from exc
            raise
        finally:
            t.state, t.wchan = old
        orphans = self._orphans
        for p in pages:
            p.PG_locked = False
            p.PG_uptodate = True
            p.PG_dirty = False
            if orphans and p.private in orphans:  # its owner exited while we read
                orphans.discard(p.private)
                self.delete_from_swap_cache(p, free_slot=True)
                self.zone.free_page(p)
                p.PG_readahead = False
                if p is page:
                    page = None  # type: ignore[assignment]
            elif p is not page:
                p.PG_readahead = True
                self.lru_add(p)  # unmapped and clean: the cheapest pages to reclaim
        self._io_done()
        if page is None:
            return None
        self._verify(proc, page_no, page)
        return page

    def _readahead(self, area: SwapArea, entry: int, off: int, ra: int, pages: list[Page]) -> None:
        zone = self.zone
        if zone.nr_free - ra <= zone.watermark_min + zone._emerg:
            return  # not into the reserves for pages nobody asked for yet
        smap = area.swap_map
        cache = self.swap_cache
        base = entry - off
        for slot in range(off + 1, min(off + 1 + ra, area.nr_slots)):
            e = base + slot
            if smap[slot] != 1 or e in cache:
                break
            got = zone.alloc_pages(GFP_HIGHUSER)
            if got is None:
                break
            p = got[0]
            self.add_to_swap_cache(p, e)
            p.PG_locked = True
            p.mapping = None
            pages.append(p)
        if len(pages) > 1:
            self.vmstat.counters["swap_ra"] += len(pages) - 1

    def _verify(self, proc: Process, page_no: int, page: Page) -> None:
        if not proc.verify(page_no, page.data):
            self.nr_verify_errors += 1
            if len(self.verify_errors) < 100:
                self.verify_errors.append((proc.name, proc.pid, page_no, proc.version[page_no]))

    # ---- swap-out --------------------------------------------------------------------------------

    def swap_writepages(self, pages: list[Page]) -> None:
        """swap_writepage() for a batch: contiguous slots go out as one swap_rw each, async."""
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("swap-out needs the Vm running: `await nursery.start(mm.run)` first")
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
        if self._orphans and page.private in self._orphans:  # its owner exited meanwhile
            self._orphans.discard(page.private)
            self.delete_from_swap_cache(page, free_slot=True)
            self.lru_del(page)
            self.zone.free_page(page)
            return
        if proc is None:  # a read-ahead page, never mapped, somehow written: keep it cached
            self.lru_add(page)
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
        ps = self.zone.page_size
        total = sum(a.nr_slots - 1 for a in self.swap_areas)
        free = self.nr_swap_free
        extra = {"SwapTotal": K(total, ps), "SwapFree": K(free, ps)}
        return self.vmstat.meminfo(self.zone, extra)

    def swaps(self) -> str:
        """/proc/swaps."""
        ps = self.zone.page_size
        lines = ["Filename\t\t\t\tType\t\tSize\tUsed\tPriority"]
        for a in self.swap_areas:
            name = getattr(a.storage, "path", None) or repr(a.storage)
            lines.append(f"{name:<40}file\t\t{K(a.nr_slots - 1, ps)}\t{K(a.inuse_pages, ps)}\t{a.prio}")
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
