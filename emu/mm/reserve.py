"""The v12 memory reserve tree (Zijlstra's mm/reserve.c, 2007-2008) and its sizing arithmetic.

Each node has `pages` (what it adds to the emergency pool) and a `limit` (what may be charged
against it, in the node's unit); both propagate up, so the root's pages are the emergency pool
(`zone.pages_emerg`).  Limits of mixed units simply add up at aggregate nodes, as the published
/proc/reserve_info shows.  A charge succeeds only while `usage + charge < limit` (strict) on the
node and on each ancestor of the same unit; callers that fail drop (RX) or wait (`charge_wait`).
Memory is freed before it is uncharged.

The published sample (mm/reserve.c, 2008), which `ReserveTree(ram_bytes=128 MiB)` with one NFS
swapper reproduces to the kilobyte:

    1:0 "total reserve" 6232K 0/278581
    2:1 "total network reserve" 6232K 0/278581
    3:2 "network TX reserve" 212K 0/53
    4:3 "protocol TX pages" 212K 0/53
    5:2 "network RX reserve" 6020K 0/278528
    6:5 "IPv4 route cache" 5508K 0/16384
    7:5 "SKB data reserve" 512K 0/262144
    8:7 "IPv4 fragment cache" 512K 0/262144
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from emu.mm.sizes import DST_ENTRY, RPC_MAX_SLOT_TABLE, RPC_RQST, K
from emu.mm.slab import (
    ilog2,
    kmalloc_estimate,
    kmalloc_objs_estimate,
    kmem_estimate,
    roundup_pow_of_two,
)

if TYPE_CHECKING:
    from emu.mm.page_alloc import Zone

__all__ = [
    "MemReserve",
    "ReserveTree",
    "ReserveError",
    "RouteHash",
    "route_hash_defaults",
    "kmem_estimate",
    "kmalloc_estimate",
    "kmalloc_objs_estimate",
    "tx_reserve_pages",
    "rpc_reserve_pages",
    "IPFRAG_HIGH_THRESH",
    "IPFRAG_LOW_THRESH",
    "IPFRAG_TIME",
    "RMEM_DEFAULT",
    "alloc_pages_reserve",
    "alloc_pages_reserve_wait",
    "free_pages_reserve",
    "kmalloc_reserve",
    "kfree_reserve",
]

IPFRAG_HIGH_THRESH = 256 * 1024
IPFRAG_LOW_THRESH = 192 * 1024
IPFRAG_TIME = 30.0  # seconds
RMEM_DEFAULT = 212992
MAX_PACKET = 65536  # "max packet 64k, double it"


class ReserveError(MemoryError):
    """The reserve cannot be set to that size (it does not fit in RAM)."""


# ---- sizing (pure) -----------------------------------------------------------------------------


def tx_reserve_pages(page_size: int = 4096) -> int:
    """TX_RESERVE_PAGES: DIV_ROUND_UP(2 * 64 KiB, PAGE_SIZE)."""
    return -(-2 * MAX_PACKET // page_size)


def rpc_reserve_pages(page_size: int = 4096, slot_table: int = RPC_MAX_SLOT_TABLE, rqst_size: int = RPC_RQST) -> int:
    """RPC_RESERVE_PAGES: kmalloc estimate of the slot table's rpc_rqst objects + TX_RESERVE_PAGES."""
    return kmalloc_objs_estimate(slot_table, rqst_size, page_size) + tx_reserve_pages(page_size)


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
        self._on_root_change: Any = None  # root only: callback(delta_pages)
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
        check = getattr(root, "_check_fits", None)
        if pages > 0 and check is not None:
            check(root.pages + pages)

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
        from emu.mm.sched import waiting

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


class ReserveTree:
    """The standard tree of one host, sized from its inputs (DESIGN §4).

    The network part (`network` and below) hangs under `root` only while at least one memalloc
    socket exists (`connect_network` / `disconnect_network`, refcounted as sk_memalloc_socks).
    With a zone, `zone.pages_emerg` follows the root's pages.
    """

    def __init__(
        self,
        zone: Zone | None = None,
        *,
        ram_bytes: int | None = None,
        page_size: int | None = None,
        route_max_size: int | None = None,
        dst_entry_size: int = DST_ENTRY,
        ipfrag_high_thresh: int = IPFRAG_HIGH_THRESH,
        rpc_slot_table: int = RPC_MAX_SLOT_TABLE,
        rpc_rqst_size: int = RPC_RQST,
    ) -> None:
        if zone is not None:
            page_size = zone.page_size
            ram_bytes = zone.nr_pages * zone.page_size
        if page_size is None:
            page_size = 4096
        if ram_bytes is None:
            raise ValueError("ReserveTree needs a zone or ram_bytes")
        for name, value in (
            ("ram_bytes", ram_bytes),
            ("page_size", page_size),
            ("dst_entry_size", dst_entry_size),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        for name, value in (("ipfrag_high_thresh", ipfrag_high_thresh), ("rpc_slot_table", rpc_slot_table)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value}")
        self.zone = zone
        self.page_size = page_size
        self.ram_bytes = ram_bytes
        self.nr_pages = ram_bytes // page_size
        self.route = route_hash_defaults(ram_bytes, page_size)
        self.route_max_size = self.route.max_size if route_max_size is None else route_max_size
        if self.route_max_size < 0:
            raise ValueError(f"route_max_size must be >= 0, not {self.route_max_size}")
        self.dst_entry_size = dst_entry_size
        self.ipfrag_high_thresh = ipfrag_high_thresh
        self.rpc_slot_table = rpc_slot_table
        self.rpc_rqst_size = rpc_rqst_size
        self.sk_memalloc_socks = 0
        self.nr_nfs_swappers = 0
        self.nr_iscsi_sessions = 0

        self.root = MemReserve("total reserve")
        self.root._on_root_change = self._root_changed
        self.root._check_fits = self._check_fits  # type: ignore[attr-defined]
        # Built in the kernel's init order so that newest-first listing matches /proc/reserve_info.
        self.network = MemReserve("total network reserve")
        self.rx = MemReserve("network RX reserve", self.network)
        self.skb_data = MemReserve("SKB data reserve", self.rx, unit="bytes")
        self.tx = MemReserve("network TX reserve", self.network, unit="pages")
        self.tx_pages = MemReserve("protocol TX pages", self.tx, unit="pages")
        self.frag_cache = MemReserve("IPv4 fragment cache", self.skb_data, unit="bytes")
        self.route_cache = MemReserve("IPv4 route cache", self.rx, unit="objects")

        self.frag_cache.set_kmalloc(ipfrag_high_thresh, page_size)
        self.frag_cache.inputs = {"ipfrag_high_thresh": ipfrag_high_thresh, "page_size": page_size}
        self.route_cache.set_kmem_cache(self.route_max_size, dst_entry_size, page_size)
        self.route_cache.inputs = {
            "route_max_size": self.route_max_size,
            "route_max_size_default": self.route.max_size,
            "dst_entry_size": dst_entry_size,
            "page_size": page_size,
        }
        self.tx_pages.inputs = {"nfs_swappers": 0, "iscsi_sessions": 0}

    # -- zone coupling --
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
        if self.zone is not None:
            self.zone.pages_emerg = self.root.pages
            if delta < 0:
                self.zone.kick_free_progress()
            else:
                self.zone.wakeup_kswapd()

    # -- network and protocol terms --
    @property
    def connected(self) -> bool:
        return self.network.parent is not None

    def connect_network(self) -> None:
        """A memalloc socket appeared (sk_set_memalloc): the first one hangs the network reserve."""
        if self.sk_memalloc_socks == 0:
            self.root.connect(self.network)
        self.sk_memalloc_socks += 1

    def disconnect_network(self) -> None:
        """A memalloc socket went away (sk_clear_memalloc): the last one removes the reserve."""
        if self.sk_memalloc_socks <= 0:
            raise ValueError("disconnect_network() without connect_network()")
        self.sk_memalloc_socks -= 1
        if self.sk_memalloc_socks == 0:
            self.network.disconnect()

    def nfs_swapper_pages(self) -> int:
        return rpc_reserve_pages(self.page_size, self.rpc_slot_table, self.rpc_rqst_size)

    def add_nfs_swapper(self) -> int:
        """An NFS swap transport: RPC_RESERVE_PAGES (rpc_rqst slots + TX_RESERVE_PAGES)."""
        pages = self.nfs_swapper_pages()
        self.tx_pages.add_pages(pages)
        self.nr_nfs_swappers += 1
        self.tx_pages.inputs["nfs_swappers"] = self.nr_nfs_swappers
        return pages

    def remove_nfs_swapper(self) -> None:
        if self.nr_nfs_swappers <= 0:
            raise ValueError("no NFS swapper to remove")
        self.tx_pages.add_pages(-self.nfs_swapper_pages())
        self.nr_nfs_swappers -= 1
        self.tx_pages.inputs["nfs_swappers"] = self.nr_nfs_swappers

    def add_iscsi_session(self) -> int:
        """An iSCSI session used for swap: TX_RESERVE_PAGES."""
        pages = tx_reserve_pages(self.page_size)
        self.tx_pages.add_pages(pages)
        self.nr_iscsi_sessions += 1
        self.tx_pages.inputs["iscsi_sessions"] = self.nr_iscsi_sessions
        return pages

    def remove_iscsi_session(self) -> None:
        if self.nr_iscsi_sessions <= 0:
            raise ValueError("no iSCSI session to remove")
        self.tx_pages.add_pages(-tx_reserve_pages(self.page_size))
        self.nr_iscsi_sessions -= 1
        self.tx_pages.inputs["iscsi_sessions"] = self.nr_iscsi_sessions

    def set_route_max_size(self, max_size: int) -> None:
        """sysctl net.ipv4.route.max_size: resizes the route cache reserve."""
        if max_size < 0:
            raise ValueError(f"route max_size must be >= 0, not {max_size}")
        self.route_cache.set_kmem_cache(max_size, self.dst_entry_size, self.page_size)
        self.route_max_size = max_size
        self.route_cache.inputs["route_max_size"] = max_size

    def set_ipfrag_high_thresh(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"ipfrag_high_thresh must be >= 0, not {nbytes}")
        self.frag_cache.set_kmalloc(nbytes, self.page_size)
        self.ipfrag_high_thresh = nbytes
        self.frag_cache.inputs["ipfrag_high_thresh"] = nbytes

    # -- views --
    def nodes(self) -> list[tuple[int, int, MemReserve]]:
        """(id, parent id, node) in /proc/reserve_info order."""
        return self.root.walk()

    def reserve_info(self) -> str:
        """/proc/reserve_info: `id:parent "name" <pages in K>K usage/limit` per node."""
        return "".join(
            f'{i}:{p} "{n.name}" {K(n.pages, self.page_size)}K {n.usage}/{n.limit}\n' for i, p, n in self.nodes()
        )

    def __repr__(self) -> str:
        return f"<ReserveTree {self.root.pages} pages, {self.sk_memalloc_socks} memalloc socks>"


# ---- allocation from a reserve (mm/reserve.c's alloc wrappers) --------------------------------
#
# Try a normal allocation first (__GFP_NOMEMALLOC); only a context entitled to the reserve may
# then charge the node and take memory below the watermarks.  A caller that may sleep waits on the
# node for the charge; one that may not fails.  `emerg` tells the caller to free with the uncharge.


def alloc_pages_reserve(zone: Zone, gfp: Any, order: int, res: MemReserve | None) -> tuple[list[Any] | None, bool]:
    """__alloc_pages_reserve() without sleeping: (pages or None, charged to `res`)."""
    from emu.mm.gfp import Gfp

    pages = zone.alloc_pages(Gfp(gfp) | Gfp.NOMEMALLOC, order)
    if pages is not None or not zone.entitled(gfp):
        return pages, False
    if res is not None and not res.charge(1 << order):
        return None, False
    pages = zone.alloc_pages(gfp, order)
    if pages is None and res is not None:
        res.uncharge(1 << order)
    return pages, pages is not None and res is not None


async def alloc_pages_reserve_wait(zone: Zone, gfp: Any, order: int, res: MemReserve) -> tuple[list[Any], bool]:
    """As alloc_pages_reserve, waiting on the node for the charge (callers with __GFP_WAIT)."""
    from emu.mm.gfp import Gfp

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


def free_pages_reserve(zone: Zone, pages: list[Any], res: MemReserve | None, emerg: bool) -> None:
    """Free first, then uncharge: memory is present when a later charge succeeds."""
    zone.free_pages(pages)
    if emerg and res is not None:
        res.uncharge(len(pages))


def kmalloc_reserve(slabs: Any, size: int, gfp: Any, res: MemReserve | None) -> tuple[Any, bool]:
    """___kmalloc_reserve() without sleeping: (object or None, charged to `res` in bytes)."""
    from emu.mm.gfp import Gfp

    obj = slabs.kmalloc(size, Gfp(gfp) | Gfp.NOMEMALLOC)
    if obj is not None or not slabs.zone.entitled(gfp):
        return obj, False
    if res is not None and not res.kmalloc_charge(size):
        return None, False
    obj = slabs.kmalloc(size, gfp)
    if obj is None and res is not None:
        res.kmalloc_uncharge(size)
    return obj, obj is not None and res is not None


def kfree_reserve(slabs: Any, obj: Any, res: MemReserve | None, emerg: bool) -> None:
    size = obj.size
    slabs.kfree(obj)
    if emerg and res is not None:
        res.kmalloc_uncharge(size)
