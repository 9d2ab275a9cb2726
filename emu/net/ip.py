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

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emu.net.netmem import NetMem
    from emu.net.netstat import NetStat


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
    def __init__(self, mem: NetMem, stat: NetStat, gc_thresh: int, max_size: int,
                 gc_min_interval: float = 0.5, gc_timeout: float = 300.0) -> None:
        if max_size < 1 or gc_thresh < 0:
            raise ValueError("ip_rt_max_size must be >= 1 and gc_thresh >= 0")
        self.mem = mem
        self.stat = stat
        self.gc_thresh = gc_thresh
        self.max_size = max_size
        self.gc_min_interval = gc_min_interval
        self.gc_timeout = gc_timeout
        self.table: dict[tuple[str, str], RtEntry] = {}
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
        got = self.mem.dst_alloc()
        if got is None:
            return None
        obj, charged = got
        e = RtEntry(saddr, daddr, obj, now, charged)
        table[(saddr, daddr)] = e
        stat.route_entries_created += 1
        return e

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
        self.mem.dst_free(e.obj, e.reserve_charged)

    def reserve_entries(self) -> int:
        return sum(1 for e in self.table.values() if e.reserve_charged)
