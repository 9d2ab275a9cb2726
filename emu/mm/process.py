"""Emulated processes: anonymous address spaces whose pages fault in, swap out and come back.

Every anonymous page's content is deterministic from (pid, page number, version): version 0 is
the zero page, each write makes a new version.  A page read back from swap is compared with what it
must hold; mismatches are counted (`mm.nr_verify_errors`) and recorded, never ignored.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from typing import TYPE_CHECKING, cast

from emu.mm.page_alloc import Page
from emu.mm.sizes import K
from emu.kernel.sched import waiting

if TYPE_CHECKING:
    from emu.mm.vm import Vm

_pids = itertools.count(100)
_HDR = struct.Struct("<IIQ")  # pid, page number, version: 16 bytes


def page_content(pid: int, page_no: int, version: int, page_size: int) -> bytes:
    """What page `page_no` of process `pid` holds after its `version`-th write."""
    if version == 0:
        return bytes(page_size)
    return _HDR.pack(pid, page_no, version) * (page_size // _HDR.size)


class SegmentationFault(Exception):
    """Touching a page outside the process's address space."""


class Process:
    """An emulated process with `nr_pages` of anonymous memory (its pte array).

    pte[page_no] is None (never touched), a Page (present) or an int swap entry (swapped out).
    """

    def __init__(self, mm: Vm, name: str, nr_pages: int | None = None) -> None:
        self.mm = mm
        self.name = name
        self.pid = next(_pids)
        self.page_size = mm.zone.page_size
        self.nr_pages = nr_pages if nr_pages is not None else mm.zone.nr_pages * 4
        if self.nr_pages <= 0:
            raise ValueError(f"process size must be positive, not {self.nr_pages}")
        self.pte: list[Page | int | None] = [None] * self.nr_pages
        self.version = [0] * self.nr_pages
        self._custom: dict[int, int] = {}  # page_no -> crc32 of content given to fill()
        self.rss = 0
        self.nr_swapents = 0
        self.min_flt = 0
        self.maj_flt = 0
        self.exited = False
        mm.processes.append(self)

    # ---- the access paths ---------------------------------------------------------------------

    async def touch(self, page_no: int, write: bool = True) -> None:
        """Access one page; a write makes a new version of its content."""
        try:
            pte = self.pte[page_no]
        except (IndexError, TypeError):
            raise SegmentationFault(f"{self.name}: page {page_no} outside 0..{self.nr_pages - 1}") from None
        if page_no < 0:
            raise SegmentationFault(f"{self.name}: page {page_no} outside 0..{self.nr_pages - 1}")
        if pte.__class__ is Page:
            pte.PG_referenced = True  # the hardware accessed bit
            if write:
                if (pte.PG_writeback or pte.PG_swapcache) and not await self._prepare_write(page_no, pte):
                    await self._fault(page_no, True, None)  # the pte changed while we slept
                    return
                self._write(page_no, pte, None)
            return
        await self._fault(page_no, write, None)

    async def fill(self, page_no: int, content: bytes | None = None) -> None:
        """Write the page: the next deterministic version, or exactly `content` (page-sized)."""
        if content is not None and len(content) != self.page_size:
            raise ValueError(f"content must be {self.page_size} bytes, not {len(content)}")
        if not 0 <= page_no < self.nr_pages:
            raise SegmentationFault(f"{self.name}: page {page_no} outside 0..{self.nr_pages - 1}")
        pte = self.pte[page_no]
        if pte.__class__ is Page:
            pte.PG_referenced = True
            if (pte.PG_writeback or pte.PG_swapcache) and not await self._prepare_write(page_no, pte):
                await self._fault(page_no, True, content)  # the pte changed while we slept
                return
            self._write(page_no, pte, content)
            return
        await self._fault(page_no, True, content)

    def expected(self, page_no: int) -> bytes | int:
        """The content (or, for fill()ed pages, its crc32) page `page_no` must have."""
        crc = self._custom.get(page_no)
        if crc is not None:
            return crc
        return page_content(self.pid, page_no, self.version[page_no], self.page_size)

    def verify(self, page_no: int, data: bytes | bytearray) -> bool:
        exp = self.expected(page_no)
        if isinstance(exp, int):
            return zlib.crc32(data) == exp
        return data == exp

    # ---- internals ------------------------------------------------------------------------------

    def _write(self, page_no: int, page: Page, content: bytes | None) -> None:
        v = self.version[page_no] + 1
        self.version[page_no] = v
        if content is None:
            self._custom.pop(page_no, None)
            page.data[:] = _HDR.pack(self.pid, page_no, v) * (self.page_size // _HDR.size)
        else:
            self._custom[page_no] = zlib.crc32(content)
            page.data[:] = content
        page.PG_dirty = True

    async def _prepare_write(self, page_no: int, page: Page) -> bool:
        """A write to a page in the swap cache: wait out its writeback, drop its slot.

        Returns False when, after a sleep, the pte no longer maps `page` (reclaim swapped it out
        again, freed it, or another fault replaced it): the caller must retry the fault rather
        than write into a frame that may be free or reused — the pte_same() recheck of
        do_swap_page()/do_wp_page() after lock_page().
        """
        mm = self.mm
        while page.PG_writeback:
            with waiting("D writeback", "wait_on_page_writeback"):
                await mm.wait_writeback_progress()
            if self.exited or self.pte[page_no] is not page:
                return False
        if self.pte[page_no] is not page:
            return False
        if page.PG_swapcache:
            mm.delete_from_swap_cache(page, free_slot=True)
        return True

    async def _fault(self, page_no: int, write: bool, content: bytes | None) -> None:
        mm = self.mm
        counters = mm.vmstat.counters
        counters["pgfault"] += 1
        cpu = mm.cpu
        cpu.charge(cpu.costs.page_fault)
        while True:
            if self.exited:
                raise SegmentationFault(f"{self.name}[{self.pid}] exited while faulting on page {page_no}")
            pte = self.pte[page_no]
            if pte is None:
                page = await mm.alloc_user_page()
                if self.pte[page_no] is not None:  # somebody faulted it in while we slept
                    mm.zone.free_page(page)
                    continue
                self.min_flt += 1
                cpu.charge(self.page_size * cpu.costs.copy_byte)  # clear_page of the new page
                if write:
                    self._write(page_no, page, content)
                else:
                    page.data[:] = bytes(self.page_size)
                    page.PG_dirty = True  # an anon page never written out must be swapped to drop it
                self._map(page_no, page)
                return
            if pte.__class__ is Page:  # raced with another fault
                page = pte
            else:
                got = await mm.swapin(self, page_no, cast(int, pte))
                if got is None:
                    continue  # the pte changed while we slept: look again
                page = got
            if self.pte[page_no] is not page:
                self._map(page_no, page)
            page.PG_referenced = True
            if write:
                if (page.PG_writeback or page.PG_swapcache) and not await self._prepare_write(page_no, page):
                    continue  # swapped out, freed or replaced while we slept: fault again
                self._write(page_no, page, content)
            return

    def _map(self, page_no: int, page: Page) -> None:
        old = self.pte[page_no]
        if old.__class__ is int:
            self.nr_swapents -= 1
        self.pte[page_no] = page
        page.mapping = self
        page.index = page_no
        page.owner = "anon"
        page.PG_referenced = True
        self.rss += 1
        self.mm.zone.state["nr_anon_pages"] += 1
        if not page.PG_lru and not page.PG_writeback:
            self.mm.lru_add(page)

    def unmap(self, page: Page, entry: int) -> None:
        """try_to_unmap(): replace the pte by the page's swap entry."""
        self.pte[page.index] = entry
        self.rss -= 1
        self.nr_swapents += 1
        self.mm.zone.state["nr_anon_pages"] -= 1

    def exit(self) -> None:
        """exit_mmap(): free every page and swap slot of the process."""
        if self.exited:
            return
        self.exited = True
        mm = self.mm
        for page_no, pte in enumerate(self.pte):
            if pte is None:
                continue
            if pte.__class__ is Page:
                mm.release_page(pte)
                self.rss -= 1
                mm.zone.state["nr_anon_pages"] -= 1
            else:
                mm.release_swap_entry(cast(int, pte))
                self.nr_swapents -= 1
            self.pte[page_no] = None
        if self in mm.processes:
            mm.processes.remove(self)

    def status(self) -> dict[str, int | str]:
        """/proc/<pid>/status-style figures."""
        ps = self.page_size
        return {
            "Name": self.name,
            "Pid": self.pid,
            "VmRSS": K(self.rss, ps),
            "VmSwap": K(self.nr_swapents, ps),
            "min_flt": self.min_flt,
            "maj_flt": self.maj_flt,
        }

    def __repr__(self) -> str:
        return f"<Process {self.name}[{self.pid}] rss={self.rss} swap={self.nr_swapents}>"
