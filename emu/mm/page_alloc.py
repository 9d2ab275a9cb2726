"""Page frames in one zone, watermarks, and the allocator's decision.

`alloc_pages` never sleeps: fast path at `low`, wake kswapd, slow path at `min` with the
__GFP_HIGH / ALLOC_HARDER discounts, then ALLOC_NO_WATERMARKS if the context is entitled under
the policy.  `alloc_pages_wait` adds direct reclaim for callers that may sleep.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

import trio

from emu.mm.gfp import Gfp, gfp_name
from emu.kernel.policy import Policy
from emu.kernel.sched import Task, TaskFlags, current, waiting
from emu.mm.vmstat import VmStat

_PF_MEMALLOC = TaskFlags.PF_MEMALLOC


class OutOfMemory(MemoryError):
    """An allocation that may not fail could not be satisfied and reclaim cannot help."""


class AllocFlags(enum.IntFlag):
    """mm/internal.h ALLOC_* (2.6.22 values)."""

    NO_WATERMARKS = 0x01
    WMARK_MIN = 0x02
    WMARK_LOW = 0x04
    WMARK_HIGH = 0x08
    HARDER = 0x10
    HIGH = 0x20
    CPUSET = 0x40


# The gfp bits that grant the reserve: v12's __GFP_EMERGENCY (renamed __GFP_MEMALLOC later in the
# series, so both count there); 3.6 has only __GFP_MEMALLOC.
_V12_RESERVE_GFP = int(Gfp.MEMALLOC | Gfp.EMERGENCY)
_PFMEMALLOC_RESERVE_GFP = int(Gfp.MEMALLOC)
_GFP_HIGH = int(Gfp.HIGH)
_GFP_WAIT = int(Gfp.WAIT)
_GFP_NOMEMALLOC = int(Gfp.NOMEMALLOC)
_PF_MEMALLOC_INT = int(TaskFlags.PF_MEMALLOC)
_AF_NO_WATERMARKS = int(AllocFlags.NO_WATERMARKS)
_AF_HIGH = int(AllocFlags.HIGH)
_AF_HARDER = int(AllocFlags.HARDER)
# The decision depends on nothing but these few inputs: memoize it (it sits on hot paths).
_af_cache: dict[tuple[int, int, bool, bool, Policy], AllocFlags] = {}


def gfp_to_alloc_flags(gfp: Gfp | int, task: Task, policy: Policy) -> AllocFlags:
    """The slow path's alloc_flags for `gfp` in `task`'s context under `policy`.

    - none (2.6.22): PF_MEMALLOC or TIF_MEMDIE, not in interrupt/softirq, and not __GFP_NOMEMALLOC.
    - v12: as none, plus PF_MEMALLOC in softirq, plus __GFP_EMERGENCY (renamed __GFP_MEMALLOC
      later in the series; both spellings are honoured); __GFP_NOMEMALLOC still overrides.
    - pfmemalloc (3.6): __GFP_MEMALLOC; PF_MEMALLOC in softirq; PF_MEMALLOC or TIF_MEMDIE outside
      interrupt; __GFP_NOMEMALLOC overrides all.
    The reserve policies (v12, pfmemalloc) grant exactly the same contexts; they differ in how
    the reserve is sized (pages_emerg vs the min watermark) and in the RX path.
    """
    key = (int(gfp), int(task.flags), task.tif_memdie, task.in_softirq, policy)
    flags = _af_cache.get(key)
    if flags is None:
        flags = _af_cache[key] = _gfp_to_alloc_flags(*key)
    return flags


def _gfp_to_alloc_flags(gfp: int, tflags: int, memdie: bool, in_softirq: bool, policy: Policy) -> AllocFlags:
    flags = AllocFlags.WMARK_MIN
    if gfp & _GFP_HIGH:
        flags |= AllocFlags.HIGH
    if not gfp & _GFP_WAIT:
        flags |= AllocFlags.HARDER  # atomic callers may dig a bit deeper
    else:
        flags |= AllocFlags.CPUSET
    if gfp & _GFP_NOMEMALLOC:
        return flags
    pf_memalloc = bool(tflags & _PF_MEMALLOC_INT)
    if policy is Policy.NONE:
        if (pf_memalloc or memdie) and not in_softirq:
            flags |= AllocFlags.NO_WATERMARKS
    else:
        reserve_gfp = _V12_RESERVE_GFP if policy is Policy.V12 else _PFMEMALLOC_RESERVE_GFP
        if gfp & reserve_gfp or pf_memalloc or (memdie and not in_softirq):
            flags |= AllocFlags.NO_WATERMARKS
    return flags


def default_min_free_kbytes(lowmem_kbytes: int) -> int:
    """init_per_zone_pages_min(): int_sqrt(lowmem_kbytes * 16), clamped to [128, 65536]."""
    return max(128, min(65536, math.isqrt(lowmem_kbytes * 16)))


class Page:
    """One page frame: real bytes plus the page flags the emulator uses."""

    __slots__ = (
        "pfn",
        "data",
        "pfmemalloc",
        "PG_buddy",
        "PG_lru",
        "PG_active",
        "PG_referenced",
        "PG_swapcache",
        "PG_writeback",
        "PG_dirty",
        "PG_slab",
        "PG_uptodate",
        "PG_locked",
        "PG_readahead",
        "mapping",
        "index",
        "private",
        "owner",
    )

    def __init__(self, pfn: int, page_size: int) -> None:
        self.pfn = pfn
        self.data = bytearray(page_size)
        self.pfmemalloc = False
        self.PG_buddy = True  # on the free list
        self._clear()

    def _clear(self) -> None:
        self.PG_lru = False
        self.PG_active = False
        self.PG_referenced = False
        self.PG_swapcache = False
        self.PG_writeback = False
        self.PG_dirty = False
        self.PG_slab = False
        self.PG_uptodate = False
        self.PG_locked = False
        self.PG_readahead = False  # read ahead into the swap cache, owner not yet verified
        self.mapping: Any = None  # the anon address space (rmap) or slab cache
        self.index = 0  # page number inside `mapping`
        self.private: Any = None  # swap entry while PG_swapcache
        self.owner = ""  # for reports: "anon", "slab:skbuff_head_cache", "skb", ...

    def flags_str(self) -> str:
        names = [n for n in self.__slots__ if n.startswith("PG_") and getattr(self, n)]
        return "|".join(n[3:] for n in names) or "-"

    def __repr__(self) -> str:
        pf = " pfmemalloc" if self.pfmemalloc else ""
        return f"<Page pfn={self.pfn} {self.flags_str()} {self.owner or ''}{pf}>"


class Reclaimer(Protocol):
    """What vmscan registers with the zone (avoids a page_alloc -> vmscan import cycle)."""

    async def direct_reclaim(self, zone: Zone, gfp: Gfp, order: int) -> int: ...


class Zone:
    """The host's single zone (ZONE_NORMAL) of `ram_bytes` of real page frames."""

    def __init__(
        self,
        ram_bytes: int,
        page_size: int = 4096,
        policy: Policy | str = Policy.NONE,
        min_free_kbytes: int | None = None,
        vmstat: VmStat | None = None,
    ) -> None:
        if page_size < 512 or page_size & (page_size - 1):
            raise ValueError(f"page size must be a power of two >= 512, not {page_size}")
        if ram_bytes <= 0:
            raise ValueError(f"RAM must be positive, not {ram_bytes}")
        nr_pages = ram_bytes // page_size
        if nr_pages < 16:
            raise ValueError(f"RAM of {ram_bytes} bytes is fewer than 16 pages of {page_size}")
        self.page_size = page_size
        self.nr_pages = nr_pages
        self.policy = Policy(policy)
        self.vmstat = vmstat if vmstat is not None else VmStat()
        self.mem_map = [Page(pfn, page_size) for pfn in range(nr_pages)]
        self._free: list[Page] = list(reversed(self.mem_map))
        self.state: Counter[str] = Counter()  # nr_anon_pages, nr_slab, nr_writeback, ...
        lowmem_kbytes = nr_pages * page_size // 1024
        if min_free_kbytes is None:
            min_free_kbytes = default_min_free_kbytes(lowmem_kbytes)
        if min_free_kbytes < 0:
            raise ValueError(f"min_free_kbytes must be >= 0, not {min_free_kbytes}")
        self._pages_emerg = 0
        self.setup_per_zone_pages_min(min_free_kbytes)
        # "some page was freed": watchdog, reclaim and PF_MEMALLOC waiters sleep on this.
        self._free_event = trio.Event()
        self._free_waited = False
        self.nr_freed = 0
        self.nr_pfmemalloc = 0  # pages handed out from the reserve and not yet freed
        self.reclaimer: Reclaimer | None = None
        self.kswapd: Any = None  # the Kswapd object (vmscan), if running
        self.kswapd_wait: trio.Event | None = None  # set by kswapd while it sleeps
        # Empty slabs the slab caches keep for reuse (slab.py): not free, but released at the
        # first allocation that misses the fast path, so watermark decisions are unchanged.
        self.nr_slab_free = 0  # pages in them
        self.slab_free_caches: list[Any] = []  # the caches holding some
        # Inside a NAPI poll: the caches whose array cache holds objects the poll freed.
        self.poll_ac: list[Any] | None = None

    # ---- watermarks -------------------------------------------------------------------------

    def setup_per_zone_pages_min(self, min_free_kbytes: int) -> None:
        """Classic (pre-4.6) watermarks: min = min_free_kbytes; low = min*5/4; high = min*3/2."""
        pages_min = min_free_kbytes * 1024 // self.page_size
        if pages_min >= self.nr_pages:
            raise ValueError(
                f"min_free_kbytes {min_free_kbytes} is not smaller than RAM "
                f"({self.nr_pages * self.page_size // 1024} KiB)"
            )
        self.min_free_kbytes = min_free_kbytes
        self.watermark_min = pages_min
        self.watermark_low = pages_min + pages_min // 4
        self.watermark_high = pages_min + pages_min // 2
        self._update_fast_mark()

    @property
    def pages_emerg(self) -> int:
        """v12's emergency pool: added to every watermark, so only ALLOC_NO_WATERMARKS gets it."""
        return self._pages_emerg

    @pages_emerg.setter
    def pages_emerg(self, pages: int) -> None:
        if pages < 0 or pages >= self.nr_pages:
            raise ValueError(f"pages_emerg {pages} out of range for {self.nr_pages} pages")
        self._pages_emerg = pages
        self._update_fast_mark()

    def _update_fast_mark(self) -> None:
        self._emerg = self._pages_emerg if self.policy is Policy.V12 else 0
        self._fast_mark = self.watermark_low + self._emerg
        self._plenty_mark = self.watermark_high + self._emerg

    @property
    def nr_free(self) -> int:
        return len(self._free)

    def zone_watermark_ok(self, order: int, mark: int, alloc_flags: AllocFlags | int = 0) -> bool:
        """zone_watermark_ok(): free - 2^order + 1 > mark (after the HIGH / HARDER discounts)."""
        return len(self._free) - (1 << order) + 1 > self.watermark_floor(mark, alloc_flags)

    def watermark_floor(self, mark: int, alloc_flags: AllocFlags | int = 0) -> int:
        """The mark after the __GFP_HIGH / ALLOC_HARDER discounts (plus v12's pages_emerg): an
        order-0 allocation succeeds while free > floor, so it can leave exactly `floor` free."""
        af = int(alloc_flags)
        if af & _AF_HIGH:
            mark -= mark // 2
        if af & _AF_HARDER:
            mark -= mark // 4
        return mark + self._emerg

    def atomic_floor(self) -> int:
        """The fewest free pages a GFP_ATOMIC allocation can leave: the min watermark less the
        __GFP_HIGH and ALLOC_HARDER discounts (plus v12's pages_emerg)."""
        return self.watermark_floor(self.watermark_min, _AF_HIGH | _AF_HARDER)

    def pfmemalloc_watermark_ok(self) -> bool:
        """3.6: free pages above half the sum of the min watermarks (the throttle's test)."""
        return len(self._free) > self.watermark_min // 2

    def free_slab_keep_ok(self) -> bool:
        """May a slab cache keep an empty slab?  Only while memory is plentiful (above high)."""
        return len(self._free) > self._plenty_mark

    def drain_free_slabs(self) -> int:
        """Release every empty slab the caches keep (a shrink of all caches); returns pages."""
        caches = self.slab_free_caches
        self.slab_free_caches = []
        pages = 0
        for c in caches:
            c._drain_listed = False
            pages += c.shrink()
        return pages

    def begin_poll(self) -> None:
        """A NAPI poll starts: slab frees go to the per-CPU array caches until `end_poll`."""
        self.poll_ac = []

    def end_poll(self) -> None:
        polled = self.poll_ac
        self.poll_ac = None
        if polled:
            for cache in polled:
                cache.flush_ac()

    def entitled(self, gfp: Gfp | int, task: Task | None = None) -> bool:
        """Would this context get ALLOC_NO_WATERMARKS (the reserve) for `gfp`?"""
        t = task if task is not None else current()
        return bool(int(gfp_to_alloc_flags(gfp, t, self.policy)) & _AF_NO_WATERMARKS)

    # ---- allocation -------------------------------------------------------------------------

    def _take(self, nr: int, pfmemalloc: bool) -> list[Page]:
        free = self._free
        if nr == 1:
            page = free.pop()
            page.PG_buddy = False
            page.pfmemalloc = pfmemalloc
            self.vmstat.counters["pgalloc"] += 1
            if pfmemalloc:
                self.vmstat.counters["pgalloc_pfmemalloc"] += 1
                self.nr_pfmemalloc += 1
            return [page]
        pages = free[-nr:]
        del free[-nr:]
        for page in pages:
            page.PG_buddy = False
            page.pfmemalloc = pfmemalloc
        self.vmstat.counters["pgalloc"] += nr
        if pfmemalloc:
            self.vmstat.counters["pgalloc_pfmemalloc"] += nr
            self.nr_pfmemalloc += nr
        return pages

    def fast_path_pages(self) -> int:
        """How many order-0 pages the fast path would give one after the other right now (each
        one above the low watermark: no discount, no kswapd wakeup, no reserve)."""
        return max(0, len(self._free) - self._fast_mark)

    def alloc_pages(self, gfp: Gfp | int, order: int = 0) -> list[Page] | None:
        """__alloc_pages() minus the sleeping part.  Returns 2^order pages or None."""
        nr = 1 << order
        # Fast path: the low watermark, no discounts (ALLOC_WMARK_LOW|ALLOC_CPUSET).
        if len(self._free) - nr + 1 > self._fast_mark:
            return self._take(nr, False)
        return self._alloc_slow(gfp, order, nr)

    def _alloc_slow(self, gfp: Gfp | int, order: int, nr: int) -> list[Page] | None:
        if order < 0 or order > 10:
            raise ValueError(f"order {order} out of range")
        if self.nr_slab_free:
            # kept empty slabs count as free for every decision: release them first
            self.drain_free_slabs()
            if len(self._free) - nr + 1 > self._fast_mark:
                return self._take(nr, False)
        self.wakeup_kswapd(order)
        flags = int(gfp_to_alloc_flags(gfp, current(), self.policy))
        if self.zone_watermark_ok(order, self.watermark_min, flags):
            return self._take(nr, False)
        if flags & _AF_NO_WATERMARKS and len(self._free) >= nr:
            return self._take(nr, True)  # could only be had from the reserve: tag it
        self.vmstat.counters["pgalloc_fail"] += 1
        return None

    async def alloc_pages_wait(self, gfp: Gfp | int, order: int = 0) -> list[Page]:
        """As alloc_pages, then (for __GFP_WAIT callers) direct reclaim and retry, forever.

        A PF_MEMALLOC task must not recurse into reclaim: it waits for someone else to free a
        page (this is where a swap-over-network writer hangs in the deadlock).  Raises
        OutOfMemory for callers that cannot sleep, or when there is nothing to reclaim with.
        """
        pages = self.alloc_pages(gfp, order)
        if pages is not None:
            return pages
        if not int(gfp) & _GFP_WAIT:
            raise OutOfMemory(f"order-{order} {gfp_name(Gfp(gfp))} allocation failed (cannot sleep)")
        task = current()
        while True:
            if int(task.flags) & _PF_MEMALLOC_INT:
                with waiting("D alloc", "__alloc_pages"):
                    await self.wait_free_progress()
            elif self.reclaimer is None:
                raise OutOfMemory(f"order-{order} {gfp_name(Gfp(gfp))} allocation failed: no reclaim (no swap)")
            else:
                await self.reclaimer.direct_reclaim(self, Gfp(gfp), order)
            pages = self.alloc_pages(gfp, order)
            if pages is not None:
                return pages

    def free_pages(self, pages: Iterable[Page]) -> None:
        """Return pages to the free list; wakes waiters for free progress."""
        free = self._free
        n = 0
        for page in pages:
            if page.PG_buddy:
                raise RuntimeError(f"double free of {page!r}")
            page._clear()
            if page.pfmemalloc:
                page.pfmemalloc = False
                self.nr_pfmemalloc -= 1
            page.PG_buddy = True
            free.append(page)
            n += 1
        self.vmstat.counters["pgfree"] += n
        self.nr_freed += n
        if self._free_waited:
            self._free_waited = False
            self._free_event.set()
            self._free_event = trio.Event()

    def free_page(self, page: Page) -> None:
        self.free_pages((page,))

    async def wait_free_progress(self) -> None:
        """Sleep until some page is freed (or `kick_free_progress` is called)."""
        self._free_waited = True
        await self._free_event.wait()

    def kick_free_progress(self) -> None:
        """Wake free-progress waiters without freeing (writeback completed, reserve shrank...)."""
        self._free_waited = False
        self._free_event.set()
        self._free_event = trio.Event()

    # ---- reclaim hooks ----------------------------------------------------------------------

    def register_reclaimer(self, obj: Reclaimer) -> None:
        self.reclaimer = obj

    def wakeup_kswapd(self, order: int = 0) -> None:
        """Wake kswapd if the zone is below its low watermark and kswapd sleeps."""
        ev = self.kswapd_wait
        if ev is None or self.zone_watermark_ok(order, self.watermark_low):
            return
        self.kswapd_wait = None
        self.vmstat.counters["kswapd_wakeup"] += 1
        ev.set()

    # ---- views ------------------------------------------------------------------------------

    def mod_state(self, item: str, delta: int) -> None:
        self.state[item] += delta

    def page_state(self) -> dict[str, int]:
        return dict(self.state)

    def zoneinfo(self) -> str:
        """/proc/zoneinfo, the part an engineer reads during a deadlock."""
        lines = [
            "Node 0, zone   Normal",
            f"  pages free     {self.nr_free}",
            f"        min      {self.watermark_min}",
            f"        low      {self.watermark_low}",
            f"        high     {self.watermark_high}",
            f"        emerg    {self.pages_emerg}",
            f"        present  {self.nr_pages}",
            f"  policy         {self.policy}",
        ]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return (
            f"<Zone {self.nr_pages} pages free={self.nr_free} min/low/high="
            f"{self.watermark_min}/{self.watermark_low}/{self.watermark_high} emerg={self.pages_emerg} {self.policy}>"
        )
