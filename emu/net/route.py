"""The IPv4 input route cache (2.6-era `rt_hash_table` / `ip_dst_cache`).

Every received frame looks its (source, destination) up; a miss allocates a `struct rtable` from
the `ip_dst_cache` slab in the receive stage's context (GFP_ATOMIC, softirq; PF_MEMALLOC while an
emergency skb is processed, so it may then come from the reserve and, under v12, is charged to the
"IPv4 route cache" reserve node).  The cache is bounded by `ip_rt_max_size`; above `gc_thresh`
garbage collection frees entries idle for longer than `ip_rt_gc_min_interval`, oldest first, down
to `gc_thresh`, at most once per interval.  A spoofed-source flood therefore grows it to
`ip_rt_max_size` and no further: beyond that, "dst cache overflow" and the frame is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from emu.mm.gfp import GFP_ATOMIC
from emu.mm.reserve import kmem_cache_alloc_reserve, kmem_cache_free_reserve
from emu.mm.sizes import DST_ENTRY
from emu.mm.slab import ilog2, roundup_pow_of_two

if TYPE_CHECKING:
    from emu.mm.reserve import MemReserve
    from emu.mm.slab import Slabs
    from emu.net.netstat import NetStat


@dataclass(frozen=True)
class RouteHash:
    """ip_rt_init()'s defaults for a machine of `ram_bytes`."""

    ram_bytes: int
    page_size: int
    mempages: int  # RAM in pages, rounded up to whole MiB
    scale: int
    buckets: int
    gc_thresh: int
    max_size: int  # ip_rt_max_size


def route_hash_defaults(ram: int, page_size: int = 4096) -> RouteHash:
    """alloc_large_system_hash("IP route cache") as 2.6.2x sizes it, and what follows from it.

    buckets = roundup_pow_of_two(max(mempages >> (scale - PAGE_SHIFT), PAGE_SIZE / 8)), mempages
    being RAM in pages rounded up to a MiB, scale 15 from 128Ki pages up else 17;
    gc_thresh = buckets; ip_rt_max_size = buckets * 16.
    """
    if ram <= 0:
        raise ValueError(f"RAM must be positive, not {ram}")
    page_shift = ilog2(page_size)
    nr_pages = ram // page_size
    mb_pages = max(1, (1 << 20) // page_size)
    mempages = -(-nr_pages // mb_pages) * mb_pages
    scale = 15 if nr_pages >= 128 * 1024 else 17
    entries = mempages >> (scale - page_shift) if scale > page_shift else mempages << (page_shift - scale)
    buckets = roundup_pow_of_two(max(entries, page_size // 8))
    return RouteHash(ram, page_size, mempages, scale, buckets, buckets, buckets * 16)


class RtEntry:
    """One cached input route (the parts that matter here: key, memory, last use)."""

    __slots__ = ("saddr", "daddr", "obj", "lastuse", "reserve_charged")

    def __init__(self, saddr: str, daddr: str, obj: Any, lastuse: float, reserve_charged: bool) -> None:
        self.saddr = saddr
        self.daddr = daddr
        self.obj = obj
        self.lastuse = lastuse
        self.reserve_charged = reserve_charged


class RouteCache:
    """rt_hash_table with its `ip_dst_cache` slab; `reserve` is v12's "IPv4 route cache" node."""

    def __init__(self, slabs: Slabs, stat: NetStat, gc_thresh: int, max_size: int,
                 gc_min_interval: float = 0.5, gc_timeout: float = 300.0,
                 reserve: MemReserve | None = None) -> None:
        if max_size < 1 or gc_thresh < 0:
            raise ValueError("ip_rt_max_size must be >= 1 and gc_thresh >= 0")
        self.dst_cache = slabs.cache("ip_dst_cache", DST_ENTRY)
        self.reserve = reserve
        self.stat = stat
        self.gc_thresh = gc_thresh
        self.max_size = max_size
        self.gc_min_interval = gc_min_interval
        self.gc_timeout = gc_timeout
        self.table: dict[tuple[str, str], RtEntry] = {}
        self.version = 0  # bumped whenever an entry is added or freed
        self._last_gc = float("-inf")

    def __len__(self) -> int:
        return len(self.table)

    def input(self, saddr: str, daddr: str, now: float) -> RtEntry | None:
        """ip_route_input: the cached route, or a new one, or None (drop: route_nomem)."""
        stat = self.stat
        stat.route_lookups += 1
        e = self.table.get((saddr, daddr))
        if e is not None:
            stat.route_hits += 1
            e.lastuse = now
            return e
        table = self.table
        if len(table) >= self.gc_thresh and now - self._last_gc >= self.gc_min_interval:
            self.garbage_collect(now)
        if len(table) >= self.max_size:
            stat.route_overflow += 1  # "dst cache overflow"
            return None
        got = kmem_cache_alloc_reserve(self.dst_cache, GFP_ATOMIC, self.reserve)
        if got is None:
            return None
        obj, charged = got
        e = RtEntry(saddr, daddr, obj, now, charged)
        table[(saddr, daddr)] = e
        self.version += 1
        stat.route_entries_created += 1
        return e

    def hit(self, saddr: str, daddr: str, now: float) -> bool:
        """ip_route_input's cache hit, uncounted (the receive path sums its hits per poll): True
        and the entry marked used if (saddr, daddr) is cached; False and nothing touched if not."""
        e = self.table.get((saddr, daddr))
        if e is None:
            return False
        e.lastuse = now
        return True

    def hit_all(self, saddrs: Iterable[str], daddr: str, now: float) -> bool:
        """`hit` for every source in `saddrs`, all or nothing: if one is not cached, none is
        marked used and the answer is False."""
        table = self.table
        entries = [table.get((saddr, daddr)) for saddr in saddrs]
        if None in entries:
            return False
        for e in entries:
            e.lastuse = now  # type: ignore[union-attr]
        return True

    def garbage_collect(self, now: float) -> int:
        """rt_garbage_collect: free entries idle > ip_rt_gc_min_interval, oldest first, to gc_thresh."""
        self._last_gc = now
        excess = len(self.table) - self.gc_thresh
        if excess <= 0:
            return 0
        horizon = now - self.gc_min_interval
        idle = sorted((e for e in self.table.values() if e.lastuse < horizon), key=lambda e: e.lastuse)
        freed = 0
        for e in idle[:excess]:
            self._free(e)
            freed += 1
        self.stat.route_gc_freed += freed
        return freed

    def expire(self, now: float) -> int:
        """rt_check_expire: the periodic sweep of entries idle longer than ip_rt_gc_timeout."""
        horizon = now - self.gc_timeout
        old = [e for e in self.table.values() if e.lastuse < horizon]
        for e in old:
            self._free(e)
        self.stat.route_gc_freed += len(old)
        return len(old)

    def flush(self) -> None:
        for e in list(self.table.values()):
            self._free(e)

    def _free(self, e: RtEntry) -> None:
        del self.table[(e.saddr, e.daddr)]
        self.version += 1
        kmem_cache_free_reserve(self.dst_cache, e.obj, self.reserve, e.reserve_charged)

    def reserve_entries(self) -> int:
        return sum(1 for e in self.table.values() if e.reserve_charged)
