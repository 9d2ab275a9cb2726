"""The v12 memory reserve tree (Zijlstra's mm/reserve.c, 2007-2008) and its sizing arithmetic.

Each node has `pages` (what it adds to the emergency pool) and a `limit` (what may be charged
against it, in the node's unit); both propagate up, so the root's pages are the emergency pool
(`zone.pages_emerg`).  Limits of mixed units simply add up at aggregate nodes, as the published
/proc/reserve_info shows.  A charge succeeds only while `usage + charge < limit` (strict) on the
node and on each ancestor of the same unit; callers that fail drop (RX) or wait (`charge_wait`).
Memory is freed before it is uncharged.

mm knows only the tree: `ReserveRoot` is "total reserve", and the subsystems that need a reserve
hang their own nodes under it (emu/net its RX and TX tree, emu/swapdev the swap transports' TX
pages), as the seed's net/ and sunrpc/ code registers theirs.  The alloc wrappers
(`kmem_cache_alloc_reserve`, `kmalloc_reserve`, `alloc_pages_reserve`) charge a node for memory
taken below the watermarks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from emu.mm.gfp import Gfp
from emu.mm.sizes import K
from emu.mm.slab import (
    kmalloc_estimate,
    kmalloc_objs_estimate,
    kmem_estimate,
    roundup_pow_of_two,
)

if TYPE_CHECKING:
    from emu.mm.page_alloc import Page, Zone
    from emu.mm.slab import KmemCache, SlabObj, Slabs

__all__ = [
    "MemReserve",
    "ReserveRoot",
    "ReserveError",
    "kmem_estimate",
    "kmalloc_estimate",
    "kmalloc_objs_estimate",
    "kmem_cache_alloc_reserve",
    "kmem_cache_free_reserve",
    "alloc_pages_reserve",
    "alloc_pages_reserve_wait",
    "free_pages_reserve",
    "kmalloc_reserve",
    "kfree_reserve",
]

class ReserveError(MemoryError):
    """The reserve cannot be set to that size (it does not fit in RAM)."""


# ---- the tree ----------------------------------------------------------------------------------


class MemReserve:
    """struct mem_reserve: a named node with pages, a limit, a usage and a wait queue."""

    def __init__(self, name: str, parent: MemReserve | None = None, unit: str | None = None) -> None:
        self.name = name
        self.parent: MemReserve | None = None
        self.children: list[MemReserve] = []  # newest first, as list_add() keeps them
        self.pages = 0
        self.limit = 0
        self.usage = 0
        self.unit = unit  # "pages", "bytes", "objects"; None for an aggregate of mixed units
        self.inputs: dict[str, Any] = {}  # what the size was computed from (for the table)
        self.nr_charge_fail = 0
        self._waitq: trio.Event | None = None
        # root only, set by ReserveRoot: told of every change of the pool; asked before it grows
        self._on_root_change: Callable[[int], None] | None = None
        self._check_fits: Callable[[int], None] | None = None
        if parent is not None:
            parent.connect(self)

    # -- structure --
    def root(self) -> MemReserve:
        node = self
        while node.parent is not None:
            node = node.parent
        return node

    def _calc(self, pages: int, limit: int) -> None:
        """__calc_reserve(): propagate a pages / limit delta up the (sub)tree."""
        node: MemReserve | None = self
        top = self
        while node is not None:
            node.pages += pages
            node.limit += limit
            top = node
            node = node.parent
        if pages and top._on_root_change is not None:
            top._on_root_change(pages)

    def connect(self, child: MemReserve) -> None:
        """mem_reserve_connect(): hang `child` (and its pages and limit) under this node."""
        if child.parent is not None:
            raise ValueError(f"reserve {child.name!r} is already connected to {child.parent.name!r}")
        self._check_grow(child.pages)
        child.parent = self
        self.children.insert(0, child)
        self._calc(child.pages, child.limit)

    def disconnect(self) -> None:
        """mem_reserve_disconnect(): remove this node (and its pages and limit) from its parent."""
        parent = self.parent
        if parent is None:
            raise ValueError(f"reserve {self.name!r} is not connected")
        parent._calc(-self.pages, -self.limit)
        parent.children.remove(self)
        self.parent = None

    def _check_grow(self, pages: int) -> None:
        root = self.root()
        if pages > 0 and root._check_fits is not None:
            root._check_fits(root.pages + pages)

    def _add(self, pages: int, limit: int) -> None:
        self._check_grow(pages)
        self._calc(pages, limit)

    # -- sizing --
    def set_pages(self, pages: int) -> None:
        """mem_reserve_pages_set(): a pages node; its limit is in pages."""
        if pages < 0:
            raise ValueError(f"negative reserve {pages}")
        self.unit = "pages"
        own_pages = pages - self._own_pages()
        own_limit = pages - self._own_limit()
        self._add(own_pages, own_limit)

    def add_pages(self, pages: int) -> None:
        """mem_reserve_pages_add(): relative change of a pages node."""
        if self._own_pages() + pages < 0:
            raise ValueError(f"reserve {self.name!r} would go negative")
        self.unit = "pages"
        self._add(pages, pages)

    def set_kmalloc(self, nbytes: int, page_size: int = 4096) -> None:
        """mem_reserve_kmalloc_set(): room for `nbytes` of kmalloc; limit in bytes."""
        pages = kmalloc_estimate(nbytes, page_size)
        self.unit = "bytes"
        self._add(pages - self._own_pages(), nbytes - self._own_limit())

    def set_kmem_cache(self, objects: int, size: int, page_size: int = 4096) -> None:
        """mem_reserve_kmem_cache_set(): room for `objects` of a cache; limit in objects."""
        pages = kmem_estimate(objects, size, page_size)
        self.unit = "objects"
        self._add(pages - self._own_pages(), objects - self._own_limit())

    def _own_pages(self) -> int:
        return self.pages - sum(c.pages for c in self.children)

    def _own_limit(self) -> int:
        return self.limit - sum(c.limit for c in self.children)

    # -- charging --
    def charge(self, amount: int) -> bool:
        """Strict admission: usage + amount < limit here and on each ancestor of the same unit."""
        if amount <= 0:
            if amount < 0:
                self.uncharge(-amount)
            return True
        unit = self.unit
        node: MemReserve | None = self
        while node is not None and node.unit == unit:
            if node.usage + amount >= node.limit:
                self.nr_charge_fail += 1
                return False
            node = node.parent
        node = self
        while node is not None and node.unit == unit:
            node.usage += amount
            node = node.parent
        return True

    def uncharge(self, amount: int) -> None:
        """Give back a charge (after freeing the memory) and wake the waiters."""
        unit = self.unit
        node: MemReserve | None = self
        while node is not None and node.unit == unit:
            node.usage = max(0, node.usage - amount)
            ev = node._waitq
            if ev is not None:
                node._waitq = None
                ev.set()
            node = node.parent

    def kmalloc_charge(self, nbytes: int) -> bool:
        """mem_reserve_kmalloc_charge(): charges are rounded up to a power of two."""
        return self.charge(roundup_pow_of_two(nbytes))

    def kmalloc_uncharge(self, nbytes: int) -> None:
        self.uncharge(roundup_pow_of_two(nbytes))

    async def charge_wait(self, amount: int) -> None:
        """Charge, sleeping on the node's wait queue until the charge is admitted."""
        from emu.kernel.sched import waiting

        if amount >= self.limit and amount > 0:
            raise ReserveError(f"charge of {amount} can never fit reserve {self.name!r} (limit {self.limit})")
        while not self.charge(amount):
            # wait on the first node (self or ancestor) that refused
            node: MemReserve | None = self
            while node is not None and node.unit == self.unit and node.usage + amount < node.limit:
                node = node.parent
            target = node if node is not None else self
            if target._waitq is None:
                target._waitq = trio.Event()
            with waiting("D reserve", f"mem_reserve:{target.name}"):
                await target._waitq.wait()

    # -- views --
    def walk(self, parent_id: int = 0, counter: list[int] | None = None) -> list[tuple[int, int, MemReserve]]:
        counter = counter if counter is not None else [0]
        counter[0] += 1
        my_id = counter[0]
        rows = [(my_id, parent_id, self)]
        for child in self.children:
            rows.extend(child.walk(my_id, counter))
        return rows

    def __repr__(self) -> str:
        return f"<MemReserve {self.name!r} {self.pages}p {self.usage}/{self.limit} {self.unit}>"


class ReserveRoot:
    """mem_reserve_root: the top of one host's reserve tree ("total reserve").

    Subsystems hang their own nodes under `root` (the network stack its RX/TX tree, a swap
    transport its TX pages); mm knows only the tree.  With a zone, `zone.pages_emerg` follows the
    root's pages, and a reserve that would not fit in RAM is refused (`ReserveError`).

    `scale` sets the emergency pool to that factor of what the tree asks for, while every node
    keeps its limit: below 1 the subsystems may charge more than the pool holds, the case the
    seed excludes ("this assumes the amount of memory needed for writeout is smaller than the
    provided reserve"); sweeps of `host.reserve_scale` find where the cure stops being enough.
    """

    def __init__(self, zone: Zone | None = None, *, ram_bytes: int | None = None, page_size: int | None = None,
                 scale: float = 1.0) -> None:
        if zone is not None:
            page_size = zone.page_size
            ram_bytes = zone.nr_pages * zone.page_size
        if page_size is None:
            page_size = 4096
        if ram_bytes is None:
            raise ValueError("ReserveRoot needs a zone or ram_bytes")
        for name, value in (("ram_bytes", ram_bytes), ("page_size", page_size)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        if scale < 0:
            raise ValueError(f"reserve scale must not be negative, not {scale}")
        self.zone = zone
        self.scale = scale
        self.page_size = page_size
        self.ram_bytes = ram_bytes
        self.nr_pages = ram_bytes // page_size
        self.root = MemReserve("total reserve")
        self.root._on_root_change = self._root_changed
        self.root._check_fits = self._check_fits

    def _check_fits(self, new_root_pages: int) -> None:
        if new_root_pages >= self.nr_pages:
            raise ReserveError(
                f"a reserve of {new_root_pages} pages ({new_root_pages * self.page_size // 1024} KiB) "
                f"does not fit in RAM of {self.nr_pages} pages"
            )
        zone = self.zone
        if zone is not None and new_root_pages + zone.watermark_high >= zone.nr_pages:
            raise ReserveError(
                f"a reserve of {new_root_pages} pages plus the high watermark ({zone.watermark_high}) "
                f"does not fit in {zone.nr_pages} pages"
            )

    def _root_changed(self, delta: int) -> None:
        zone = self.zone
        if zone is None:
            return
        old = zone.pages_emerg
        zone.pages_emerg = int(self.root.pages * self.scale)
        if zone.pages_emerg < old:
            zone.kick_free_progress()  # pages freed to the zone's ordinary use
        elif zone.pages_emerg > old:
            zone.wakeup_kswapd()  # the watermarks rose

    @property
    def pages(self) -> int:
        return self.root.pages

    def nodes(self) -> list[tuple[int, int, MemReserve]]:
        """(id, parent id, node) in /proc/reserve_info order."""
        return self.root.walk()

    def find(self, name: str) -> MemReserve | None:
        return next((n for _, _, n in self.nodes() if n.name == name), None)

    def reserve_info(self) -> str:
        """/proc/reserve_info: `id:parent "name" <pages in K>K usage/limit` per node."""
        return "".join(
            f'{i}:{p} "{n.name}" {K(n.pages, self.page_size)}K {n.usage}/{n.limit}\n' for i, p, n in self.nodes()
        )

    def __repr__(self) -> str:
        return f"<ReserveRoot {self.root.pages} pages>"


# ---- allocation from a reserve (mm/reserve.c's alloc wrappers) --------------------------------
#
# Try a normal allocation first (__GFP_NOMEMALLOC); only a context entitled to the reserve may
# then charge the node and take memory below the watermarks.  A caller that may sleep waits on the
# node for the charge; one that may not fails.  `emerg` tells the caller to free with the uncharge.


def alloc_pages_reserve(zone: Zone, gfp: Gfp, order: int, res: MemReserve | None) -> tuple[list[Page] | None, bool]:
    """__alloc_pages_reserve() without sleeping: (pages or None, charged to `res`)."""
    pages = zone.alloc_pages(Gfp(gfp) | Gfp.NOMEMALLOC, order)
    if pages is not None or not zone.entitled(gfp):
        return pages, False
    if res is not None and not res.charge(1 << order):
        return None, False
    pages = zone.alloc_pages(gfp, order)
    if pages is None and res is not None:
        res.uncharge(1 << order)
    return pages, pages is not None and res is not None


async def alloc_pages_reserve_wait(zone: Zone, gfp: Gfp, order: int, res: MemReserve) -> tuple[list[Page], bool]:
    """As alloc_pages_reserve, waiting on the node for the charge (callers with __GFP_WAIT)."""
    pages, emerg = alloc_pages_reserve(zone, gfp, order, res)
    if pages is not None:
        return pages, emerg
    if not zone.entitled(gfp):
        return await zone.alloc_pages_wait(gfp, order), False
    await res.charge_wait(1 << order)
    pages = zone.alloc_pages(Gfp(gfp) | Gfp.NOMEMALLOC, order)
    if pages is not None:  # pressure lifted while we slept
        res.uncharge(1 << order)
        return pages, False
    pages = zone.alloc_pages(gfp, order)
    if pages is None:
        res.uncharge(1 << order)
        return await zone.alloc_pages_wait(gfp, order), False
    return pages, True


def free_pages_reserve(zone: Zone, pages: list[Page], res: MemReserve | None, emerg: bool) -> None:
    """Free first, then uncharge: memory is present when a later charge succeeds."""
    zone.free_pages(pages)
    if emerg and res is not None:
        res.uncharge(len(pages))


def kmalloc_reserve(slabs: Slabs, size: int, gfp: Gfp, res: MemReserve | None) -> tuple[SlabObj | None, bool]:
    """___kmalloc_reserve() without sleeping: (object or None, charged to `res` in bytes)."""
    obj = slabs.kmalloc(size, Gfp(gfp) | Gfp.NOMEMALLOC)
    if obj is not None or not slabs.zone.entitled(gfp):
        return obj, False
    if res is not None and not res.kmalloc_charge(size):
        return None, False
    obj = slabs.kmalloc(size, gfp)
    if obj is None and res is not None:
        res.kmalloc_uncharge(size)
    return obj, obj is not None and res is not None


def kfree_reserve(slabs: Slabs, obj: SlabObj, res: MemReserve | None, emerg: bool) -> None:
    size = obj.size
    slabs.kfree(obj)
    if emerg and res is not None:
        res.kmalloc_uncharge(size)


def kmem_cache_alloc_reserve(cache: KmemCache, gfp: Gfp, res: MemReserve | None,
                             amount: int = 1) -> tuple[SlabObj, bool] | None:
    """kmem_cache_alloc_reserve() without sleeping: an object of `cache` with `gfp`; one carved
    from the reserve is charged `amount` (objects or bytes) to `res`, and refused if `res` is
    full.  Returns (object, charged) or None."""
    obj = cache.alloc(gfp)
    if obj is None:
        return None
    if obj.pfmemalloc and res is not None:
        if not res.charge(amount):
            cache.free(obj)
            return None
        return obj, True
    return obj, False


def kmem_cache_free_reserve(cache: KmemCache, obj: SlabObj, res: MemReserve | None, charged: bool,
                            amount: int = 1) -> None:
    """Free first, then uncharge."""
    cache.free(obj)
    if charged and res is not None:
        res.uncharge(amount)
