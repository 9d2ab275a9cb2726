"""Slab caches, kmalloc, and the SLAB geometry the reserve sizing relies on.

The invariant: an object carved from a pfmemalloc (reserve) slab is never handed to a
caller that is not entitled to the reserve.  Such a caller is served from a normal slab, from a new
slab grown from a normal page, or fails.  Slabs are kept on two partial lists (SLUB-style), so the
check costs nothing on the normal path.

Empty normal slabs are kept for reuse up to the cache's `free_limit` objects: what SLAB keeps
for reuse in its free list (`free_limit`, `(1 + nr_cpus) * batchcount + objects per slab`).
SLAB's per-CPU array cache is modelled for the length of one NAPI poll (`Zone.begin_poll`): an
object the receive path frees (a dropped frame's skb) is handed to the next allocation of the same
poll, LIFO, and goes back to its slab when the poll ends; outside polls objects go straight back
to their slab, which keeps the accounting exact.  So a cache that empties and refills, as the receive
stage's skb caches do on every poll, does not go back to the page allocator each time.
They are kept only while the zone has plenty (above its high watermark) and the zone drains them
at the first allocation that misses its fast path (`Zone.drain_free_slabs`), so every watermark
decision sees the same free pages as without the cache; `kmem_cache_shrink` (`shrink`) drains one
cache.  Reserve (pfmemalloc) slabs are never kept.
"""

from __future__ import annotations

import bisect
import contextvars
from typing import Any

from emu.mm.gfp import Gfp
from emu.mm.page_alloc import Page, Zone
from emu.mm.sizes import CACHE_LINE, KMALLOC_MAX_CACHE_SIZE, KMALLOC_SIZES, SLAB_BUFCTL, SLAB_HEADER

# ---- SLAB geometry (mm/slab.c, 2.6.2x) and the v12 estimates ---------------------------------


def ilog2(n: int) -> int:
    return n.bit_length() - 1


def roundup_pow_of_two(n: int) -> int:
    if n <= 0:
        raise ValueError(f"roundup_pow_of_two({n})")
    return 1 << (n - 1).bit_length()


def hwcache_align(size: int, cache_line: int = CACHE_LINE) -> int:
    """SLAB_HWCACHE_ALIGN: align to the cache line, or to half of it while the object fits."""
    ralign = cache_line
    while size <= ralign // 2:
        ralign //= 2
    return -(-size // ralign) * ralign


def cache_estimate(order: int, buffer_size: int, page_size: int, off_slab: bool) -> tuple[int, int]:
    """SLAB's cache_estimate(): (objects per slab, bytes left over) for a slab of 2^order pages."""
    slab_size = page_size << order
    if off_slab:
        num = slab_size // buffer_size
        return num, slab_size - num * buffer_size
    num = (slab_size - SLAB_HEADER) // (buffer_size + SLAB_BUFCTL)

    def mgmt(n: int) -> int:
        return -(-(SLAB_HEADER + n * SLAB_BUFCTL) // CACHE_LINE) * CACHE_LINE

    if num > 0 and mgmt(num) + num * buffer_size > slab_size:
        num -= 1
    return num, slab_size - num * buffer_size - (mgmt(num) if num > 0 else 0)


def calculate_slab_order(buffer_size: int, page_size: int, break_order: int = 1) -> tuple[int, int, bool]:
    """(order, objects per slab, off_slab) as kmem_cache_create() picks them."""
    off_slab = buffer_size >= page_size // 8
    best: tuple[int, int] | None = None
    for order in range(0, 6):
        num, left_over = cache_estimate(order, buffer_size, page_size, off_slab)
        if num == 0:
            continue
        if off_slab and num > (buffer_size - SLAB_HEADER) // SLAB_BUFCTL:
            break
        best = (order, num)
        if order >= break_order:
            break
        if left_over * 8 <= (page_size << order):
            break
    if best is None:
        raise ValueError(f"object of {buffer_size} bytes does not fit a slab")
    return best[0], best[1], off_slab


def cache_free_limit(buffer_size: int, num: int, page_size: int = 4096, nr_cpus: int = 1) -> int:
    """Objects SLAB keeps for reuse: the per-cpu array's limit plus free_limit, (1 + nr_cpus) *
    batchcount + num, with enable_cpucache()'s limit by object size (batchcount: half of it)."""
    if buffer_size > 131072:
        limit = 1
    elif buffer_size > page_size:
        limit = 8
    elif buffer_size > 1024:
        limit = 24
    elif buffer_size > 256:
        limit = 54
    else:
        limit = 120
    return nr_cpus * limit + (1 + nr_cpus) * ((limit + 1) // 2) + num


def kmem_estimate(objects: int, size: int, page_size: int = 4096, align: bool = True) -> int:
    """kmem_alloc_estimate(): pages to back `objects` of a cache of `size`-byte objects.

    P = ceil(objects / num) << order, plus 1 + ilog2(P) for the per-cpu/alien queues and slab
    management (0 for no objects).
    """
    if objects < 0:
        raise ValueError(f"negative object count {objects}")
    if objects == 0:
        return 0
    buffer_size = hwcache_align(size) if align else size
    order, num, _ = calculate_slab_order(buffer_size, page_size)
    pages = -(-objects // num) << order
    return pages + 1 + ilog2(pages)


def kmalloc_estimate(nbytes: int, page_size: int = 4096) -> int:
    """kmalloc_estimate_bytes(): ceil(2 * bytes / PAGE_SIZE); the 2 covers power-of-two rounding."""
    if nbytes < 0:
        raise ValueError(f"negative byte count {nbytes}")
    return -(-2 * nbytes // page_size)


def kmalloc_size_class(size: int) -> int:
    """The kmalloc cache (size-N) that serves `size` bytes."""
    if size <= 0 or size > KMALLOC_MAX_CACHE_SIZE:
        raise ValueError(f"no kmalloc cache for {size} bytes")
    return KMALLOC_SIZES[bisect.bisect_left(KMALLOC_SIZES, size)]


def kmalloc_objs_estimate(objects: int, size: int, page_size: int = 4096) -> int:
    """kmalloc_estimate_objs(): the kmem_cache estimate of the size-N cache holding `size`."""
    return kmem_estimate(objects, kmalloc_size_class(size), page_size)


# ---- objects and caches -----------------------------------------------------------------------


class Slab:
    __slots__ = ("cache", "pages", "pfmemalloc", "inuse")

    def __init__(self, cache: KmemCache, pages: list[Page]) -> None:
        self.cache = cache
        self.pages = pages
        self.pfmemalloc = pages[0].pfmemalloc
        self.inuse = 0

    def __repr__(self) -> str:
        return f"<Slab {self.cache.name} pfn={self.pages[0].pfn} inuse={self.inuse}{' pfmemalloc' if self.pfmemalloc else ''}>"


class SlabObj:
    """One allocated object.  `slab` is None for kmalloc objects backed directly by pages."""

    __slots__ = ("cache", "size", "pfmemalloc", "slab", "pages", "owner", "home")

    def __init__(self, cache: KmemCache | None, size: int, slab: Slab | None, pages: list[Page] | None) -> None:
        self.cache = cache
        self.size = size
        self.slab = slab
        self.pages = pages
        self.pfmemalloc = slab.pfmemalloc if slab is not None else bool(pages and pages[0].pfmemalloc)
        self.owner: Any = None
        self.home: Slabs | None = None  # for page-backed objects: whose pages they are

    @property
    def freed(self) -> bool:
        return self.slab is None and self.pages is None

    def __repr__(self) -> str:
        name = self.cache.name if self.cache else "pages"
        return f"<SlabObj {name} {self.size}B{' pfmemalloc' if self.pfmemalloc else ''}>"


class KmemCache:
    """kmem_cache: objects of one size carved from slabs of 2^order pages."""

    def __init__(
        self,
        name: str,
        size: int,
        align: int | None = CACHE_LINE,
        zone: Zone | None = None,
        *,
        break_order: int = 1,
    ) -> None:
        if zone is None:
            raise ValueError("a KmemCache needs the zone it takes pages from")
        if size <= 0:
            raise ValueError(f"object size must be positive, not {size}")
        self.name = name
        self.object_size = size
        self.buffer_size = hwcache_align(size, align) if align else size
        self.zone = zone
        self.order, self.num, self.off_slab = calculate_slab_order(self.buffer_size, zone.page_size, break_order)
        self._partial: list[Slab] = []  # normal slabs with a free object
        self._partial_pf: list[Slab] = []  # pfmemalloc slabs with a free object
        # Empty normal slabs are kept for reuse on the partial list itself, as SLUB keeps empty
        # slabs there up to min_partial: going empty and back into use moves nothing.
        self.nr_empty = 0
        self._drain_listed = False  # on the zone's list of caches to drain
        # kept empty slabs are bounded in objects, as SLAB bounds its free objects
        self.free_limit = cache_free_limit(self.buffer_size, self.num, zone.page_size)
        self.nr_slabs = 0
        self.nr_pfmemalloc_slabs = 0
        self.active_objs = 0
        self.nr_alloc_fail = 0
        # The per-CPU array cache during a NAPI poll (Zone.begin_poll): objects freed by the poll
        # are handed to its next allocations, LIFO, as SLAB's array_cache does, and given back to
        # their slabs when the poll ends.  A pfmemalloc object only goes to an entitled caller
        # (3.6's __ac_get_obj rule).
        self._ac: list[Slab] = []
        self._ac_listed = False  # on the zone's list of caches to flush when the poll ends

    @property
    def size(self) -> int:
        return self.object_size

    def _grow(self, pages: list[Page]) -> Slab:
        slab = Slab(self, pages)
        for p in pages:
            p.PG_slab = True
            p.owner = self.name
            p.mapping = slab
        self.nr_slabs += 1
        if slab.pfmemalloc:
            self.nr_pfmemalloc_slabs += 1
            self._partial_pf.append(slab)
        else:
            self._partial.append(slab)
        self.zone.state["nr_slab"] += len(pages)
        return slab

    def _take(self, slab: Slab, partial: list[Slab]) -> Slab:
        slab.inuse += 1
        if slab.inuse == self.num:
            partial.pop()  # it was the last one on the list
        self.active_objs += 1
        return slab

    def alloc(self, gfp: Gfp | int) -> SlabObj | None:
        """kmem_cache_alloc(): never sleeps; None on failure."""
        slab = self.alloc_obj(gfp)
        return None if slab is None else SlabObj(self, self.object_size, slab, None)

    def alloc_obj(self, gfp: Gfp | int) -> Slab | None:
        """kmem_cache_alloc() for callers whose own object stands for the allocation (an skb is its
        skbuff_head_cache object): takes one object and returns the slab it lives in, without a
        SlabObj handle; give it back with `free_obj(slab)`.  None on failure."""
        ac = self._ac
        if ac:  # inside a NAPI poll: the object the poll freed last (LIFO), as SLAB's array cache
            slab = ac[-1]
            if not slab.pfmemalloc or self.zone.entitled(gfp):
                return ac.pop()
        partial = self._partial
        if partial:  # the common case, inlined: an object on a normal partial slab
            slab = partial[-1]
            inuse = slab.inuse
            if not inuse:  # a kept empty slab goes back into use
                self.nr_empty -= 1
                self.zone.nr_slab_free -= len(slab.pages)
            inuse += 1
            slab.inuse = inuse
            if inuse == self.num:
                partial.pop()
            self.active_objs += 1
            return slab
        zone = self.zone
        if not zone.entitled(gfp):
            pages = zone.alloc_pages(gfp, self.order)
            if pages is None:
                self.nr_alloc_fail += 1
                return None
            slab = self._grow(pages)  # cannot be pfmemalloc: the same context was not entitled
            return self._take(slab, self._partial)
        # Entitled: prefer normal memory, then reserve objects already carved, then new reserve.
        pages = zone.alloc_pages(Gfp(gfp) | Gfp.NOMEMALLOC, self.order)
        if pages is None:
            if self._partial_pf:
                return self._take(self._partial_pf[-1], self._partial_pf)
            pages = zone.alloc_pages(gfp, self.order)
            if pages is None:
                self.nr_alloc_fail += 1
                return None
        slab = self._grow(pages)
        return self._take(slab, self._partial_pf if slab.pfmemalloc else self._partial)

    async def alloc_wait(self, gfp: Gfp | int) -> SlabObj:
        """kmem_cache_alloc() for callers that may sleep (reclaims; OutOfMemory if impossible)."""
        return SlabObj(self, self.object_size, await self.alloc_obj_wait(gfp), None)

    async def alloc_obj_wait(self, gfp: Gfp | int) -> Slab:
        """`alloc_obj` for callers that may sleep."""
        slab = self.alloc_obj(gfp)
        if slab is not None:
            return slab
        pages = await self.zone.alloc_pages_wait(gfp, self.order)
        slab = self._grow(pages)
        return self._take(slab, self._partial_pf if slab.pfmemalloc else self._partial)

    def free(self, obj: SlabObj) -> None:
        """kmem_cache_free(); an empty slab is kept (see the module doc) or goes back to the page
        allocator."""
        slab = obj.slab
        if slab is None or slab.cache is not self:
            raise RuntimeError(f"bad free of {obj!r} to {self.name}")
        obj.slab = None
        self.free_obj(slab)

    def free_obj(self, slab: Slab) -> None:
        """Give back one object of `slab` (taken with `alloc_obj`)."""
        polled = self.zone.poll_ac
        if polled is not None:  # inside a NAPI poll: into the array cache
            if slab.cache is not self or not slab.inuse:
                raise RuntimeError(f"bad free of an object of {slab!r} to {self.name}")
            if not self._ac_listed:
                self._ac_listed = True
                polled.append(self)
            self._ac.append(slab)
            return
        self._free_obj(slab)

    def flush_ac(self) -> None:
        """The poll ended: the array cache's objects go back to their slabs."""
        ac = self._ac
        self._ac = []
        self._ac_listed = False
        for slab in reversed(ac):
            self._free_obj(slab)

    def _free_obj(self, slab: Slab) -> None:
        inuse = slab.inuse
        if inuse < 1 or slab.cache is not self:
            raise RuntimeError(f"bad free of an object of {slab!r} to {self.name}")
        self.active_objs -= 1
        if inuse == 1:
            self._free_empty(slab)
        elif inuse == self.num:
            (self._partial_pf if slab.pfmemalloc else self._partial).append(slab)
        slab.inuse = inuse - 1

    def partial_avail(self, limit: int) -> int:
        """How many objects `alloc_partial` would give now (at most `limit`)."""
        n = 0
        for slab in reversed(self._ac):
            if slab.pfmemalloc or n >= limit:
                break
            n += 1
        num = self.num
        for slab in reversed(self._partial):
            if n >= limit:
                break
            n += num - slab.inuse
        return min(n, limit)

    def pages_for(self, objects: int) -> int:
        """Pages of new slabs needed for `objects` more objects than the partial slabs hold."""
        if objects <= 0:
            return 0
        return -(-objects // self.num) << self.order

    def alloc_fast(self, n: int) -> list[Slab]:
        """`n` ordinary objects as `n` calls of `alloc_obj` would give them: the poll's array
        cache, the partial slabs, then new slabs one at a time, their pages from the zone's fast
        path (the caller checked with `pages_for` and `Zone.fast_path_pages` that it can)."""
        out = self.alloc_partial(n)
        zone = self.zone
        while len(out) < n:
            got = zone.alloc_pages(0, self.order)
            if got is None or got[0].pfmemalloc:
                raise AssertionError("alloc_fast beyond what the fast path gives")
            self._grow(got)
            out += self.alloc_partial(min(self.num, n - len(out)))
        return out

    def alloc_partial(self, n: int) -> list[Slab]:
        """kmem_cache_alloc_bulk(), limited to objects that need no new slab: up to `n` ordinary
        objects, in the order `alloc_obj` would hand them out (the poll's array cache first, then
        the normal partial slabs), taking a slab's free objects at once.  Never touches the page
        allocator, so it changes no watermark decision; the caller allocates the rest one by one."""
        out: list[Slab] = []
        ac = self._ac
        while n and ac and not ac[-1].pfmemalloc:
            out.append(ac.pop())
            n -= 1
        partial = self._partial
        num = self.num
        taken = 0
        while n and partial:
            slab = partial[-1]
            inuse = slab.inuse
            if not inuse:  # a kept empty slab goes back into use
                self.nr_empty -= 1
                self.zone.nr_slab_free -= len(slab.pages)
            take = num - inuse
            if take > n:
                take = n
            slab.inuse = inuse + take
            out += [slab] * take
            taken += take
            n -= take
            if inuse + take == num:
                partial.pop()
        self.active_objs += taken
        return out

    def free_bulk(self, slabs: list[Slab]) -> None:
        """kmem_cache_free_bulk(): `free_obj` for each, in order (the objects of a reader's
        batch); consecutive objects of one slab are given back together."""
        if self.zone.poll_ac is not None:
            for slab in slabs:
                self.free_obj(slab)
            return
        num = self.num
        i = 0
        count = len(slabs)
        while i < count:
            slab = slabs[i]
            j = i + 1
            while j < count and slabs[j] is slab:
                j += 1
            k = j - i
            i = j
            inuse = slab.inuse
            if slab.cache is not self or inuse < k:
                raise RuntimeError(f"bad free of {k} objects of {slab!r} to {self.name}")
            if inuse == num and num > 1:  # it was full: back on its partial list
                (self._partial_pf if slab.pfmemalloc else self._partial).append(slab)
            if inuse > k:
                slab.inuse = inuse - k
                self.active_objs -= k
            else:  # the run empties it: the last object goes the way of a single free
                slab.inuse = 1
                self.active_objs -= k - 1
                self._free_obj(slab)

    def _free_empty(self, slab: Slab) -> None:
        """The last object of `slab` is being freed: keep the slab (on the partial list) or
        release its pages."""
        zone = self.zone
        if (not slab.pfmemalloc and (self.nr_empty + 1) * self.num <= self.free_limit
                and zone.free_slab_keep_ok()):
            if self.num == 1:
                self._partial.append(slab)  # a one-object slab was full, so on no list
            self.nr_empty += 1
            zone.nr_slab_free += len(slab.pages)
            if not self._drain_listed:
                self._drain_listed = True
                zone.slab_free_caches.append(self)
            return
        if self.num > 1:
            (self._partial_pf if slab.pfmemalloc else self._partial).remove(slab)
        self._destroy(slab)

    def _destroy(self, slab: Slab) -> None:
        self.nr_slabs -= 1
        if slab.pfmemalloc:
            self.nr_pfmemalloc_slabs -= 1
        self.zone.state["nr_slab"] -= len(slab.pages)
        self.zone.free_pages(slab.pages)

    def shrink(self) -> int:
        """kmem_cache_shrink(): release the kept empty slabs; returns the pages freed."""
        if not self.nr_empty:
            return 0
        pages = 0
        partial = self._partial
        for slab in [s for s in partial if not s.inuse]:
            partial.remove(slab)
            pages += len(slab.pages)
            self._destroy(slab)
        self.nr_empty = 0
        self.zone.nr_slab_free -= pages
        return pages

    def kept_slabs(self) -> list[Slab]:
        """The empty slabs kept for reuse."""
        return [s for s in self._partial if not s.inuse]

    def slabinfo_line(self) -> str:
        num_objs = self.nr_slabs * self.num
        active_slabs = self.nr_slabs - self.nr_empty
        return (
            f"{self.name:<20} {self.active_objs:>6} {num_objs:>6} {self.buffer_size:>6} {self.num:>4} "
            f"{1 << self.order:>4} : tunables    0    0    0 : slabdata {active_slabs:>6} {self.nr_slabs:>6}      0"
            f" : pfmemalloc {self.nr_pfmemalloc_slabs}"
        )

    def __repr__(self) -> str:
        return f"<KmemCache {self.name} {self.buffer_size}B x{self.num}/{1 << self.order}p>"


class Slabs:
    """The slab caches of one host: the kmalloc size classes plus named caches."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.caches: dict[str, KmemCache] = {}
        self._kmalloc = [self.cache(f"size-{s}", s) for s in KMALLOC_SIZES]
        self.large_pages = 0  # pages held by kmalloc objects above KMALLOC_MAX_CACHE_SIZE
        _current_slabs.set(self)

    def cache(self, name: str, size: int, align: int | None = CACHE_LINE) -> KmemCache:
        """kmem_cache_create(), or the existing cache of that name."""
        c = self.caches.get(name)
        if c is None:
            c = self.caches[name] = KmemCache(name, size, align, self.zone)
        elif c.object_size != size:
            raise ValueError(f"cache {name} exists with object size {c.object_size}, not {size}")
        return c

    def kmalloc_cache(self, size: int) -> KmemCache:
        return self._kmalloc[bisect.bisect_left(KMALLOC_SIZES, size)]

    def _large_order(self, size: int) -> int:
        pages = -(-size // self.zone.page_size)
        return (pages - 1).bit_length()

    def kmalloc(self, size: int, gfp: Gfp | int) -> SlabObj | None:
        if size <= 0:
            raise ValueError(f"kmalloc of {size} bytes")
        if size <= KMALLOC_MAX_CACHE_SIZE:
            obj = self._kmalloc[bisect.bisect_left(KMALLOC_SIZES, size)].alloc(gfp)
            if obj is not None:
                obj.size = size
            return obj
        pages = self.zone.alloc_pages(gfp, self._large_order(size))
        return None if pages is None else self._large(size, pages)

    async def kmalloc_wait(self, size: int, gfp: Gfp | int) -> SlabObj:
        if size <= 0:
            raise ValueError(f"kmalloc of {size} bytes")
        if size <= KMALLOC_MAX_CACHE_SIZE:
            obj = await self._kmalloc[bisect.bisect_left(KMALLOC_SIZES, size)].alloc_wait(gfp)
            obj.size = size
            return obj
        pages = await self.zone.alloc_pages_wait(gfp, self._large_order(size))
        return self._large(size, pages)

    def _large(self, size: int, pages: list[Page]) -> SlabObj:
        for p in pages:
            p.owner = "kmalloc"
        self.large_pages += len(pages)
        obj = SlabObj(None, size, None, pages)
        obj.home = self
        return obj

    def kfree(self, obj: SlabObj) -> None:
        if obj.cache is not None:
            obj.cache.free(obj)
            return
        pages = obj.pages
        if pages is None:
            raise RuntimeError(f"double kfree of {obj!r}")
        obj.pages = None
        self.large_pages -= len(pages)
        self.zone.free_pages(pages)

    def shrink(self) -> int:
        """kmem_cache_shrink() on every cache; returns the pages freed."""
        return sum(c.shrink() for c in self.caches.values())

    def nr_slab_pages(self) -> int:
        return self.zone.state["nr_slab"]

    def slabinfo(self) -> str:
        """/proc/slabinfo (version 2.1 columns, plus the number of pfmemalloc slabs)."""
        head = (
            "slabinfo - version: 2.1\n# name            <active_objs> <num_objs> <objsize> <objperslab> "
            "<pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> "
            "<num_slabs> <sharedavail> : pfmemalloc <slabs>\n"
        )
        rows = sorted(self.caches.values(), key=lambda c: c.name)
        return head + "".join(c.slabinfo_line() + "\n" for c in rows if c.nr_slabs or not c.name.startswith("size-"))


_current_slabs: contextvars.ContextVar[Slabs] = contextvars.ContextVar("slabs")


def _slabs(slabs: Slabs | None) -> Slabs:
    if slabs is not None:
        return slabs
    try:
        return _current_slabs.get()
    except LookupError:
        raise RuntimeError("no Slabs in this context: create the host's Slabs(zone) first") from None


def kmalloc(size: int, gfp: Gfp | int, slabs: Slabs | None = None) -> SlabObj | None:
    """kmalloc() from `slabs`, or the Slabs most recently created in this context."""
    return _slabs(slabs).kmalloc(size, gfp)


async def kmalloc_wait(size: int, gfp: Gfp | int, slabs: Slabs | None = None) -> SlabObj:
    return await _slabs(slabs).kmalloc_wait(size, gfp)


def kfree(obj: SlabObj) -> None:
    """kfree(): the object knows its cache (or, for page-backed objects, its Slabs)."""
    if obj.cache is not None:
        obj.cache.free(obj)
    elif obj.home is not None:
        obj.home.kfree(obj)
    else:
        raise RuntimeError(f"kfree of a foreign object {obj!r}")
