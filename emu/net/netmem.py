"""The network stack's memory: its slab caches, the policies' reserve rules, the v12 charges.

One place decides, for every allocation the stack makes, which gfp it uses and whether it may
reach the reserve (DESIGN §2):

- RX skbs (softirq, GFP_ATOMIC):
  - none: GFP_ATOMIC only; the receive path never reaches the reserve.
  - v12: GFP_ATOMIC; on failure, if a memalloc (SOCK_VMIO) socket exists and the "SKB data
    reserve" admits roundup_pow_of_two(size), allocate with __GFP_EMERGENCY and mark the skb
    `emergency` (uncharged when freed).
  - pfmemalloc: if a memalloc socket exists, GFP_ATOMIC|__GFP_NOMEMALLOC first, then
    GFP_ATOMIC|__GFP_MEMALLOC; the skb is `pfmemalloc` if its memory came from the reserve.
- Route entries and fragment queues: GFP_ATOMIC in the receive stage's context, so they reach the
  reserve exactly when the current frame is processed under PF_MEMALLOC; under v12 a reserve
  object is charged to its node ("IPv4 route cache" objects, "IPv4 fragment cache" bytes) and the
  allocation fails if the node is full.
- TX skbs: the socket's `sk_allocation`; they may sleep (direct reclaim) like the kernel's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emu.mm.gfp import GFP_ATOMIC, Gfp, Policy
from emu.mm.sizes import DST_ENTRY, IPQ, KMALLOC_MAX_CACHE_SIZE, SKB_HEAD, SKB_SHARED_INFO
from emu.mm.slab import KmemCache, Slab, Slabs, SlabObj, roundup_pow_of_two
from emu.net.skbuff import SkBuff

if TYPE_CHECKING:
    from emu.net.netstat import NetStat
    from emu.net.sock import Sock

_ATOMIC_NOMEMALLOC = GFP_ATOMIC | Gfp.NOMEMALLOC
_ATOMIC_MEMALLOC = GFP_ATOMIC | Gfp.MEMALLOC
_ATOMIC_EMERGENCY = GFP_ATOMIC | Gfp.EMERGENCY


class NetMem:
    def __init__(self, slabs: Slabs, policy: Policy, stat: NetStat, reserve: Any = None) -> None:
        self.slabs = slabs
        self.zone = slabs.zone
        self.policy = Policy(policy)
        self.stat = stat
        self.reserve = reserve if self.policy is Policy.V12 else None
        self.head_cache: KmemCache = slabs.cache("skbuff_head_cache", SKB_HEAD)
        self.dst_cache: KmemCache = slabs.cache("ip_dst_cache", DST_ENTRY)
        self.ipq_cache: KmemCache = slabs.kmalloc_cache(IPQ)
        self.memalloc_socks = 0  # sk_memalloc_socks()
        self._data_cache: dict[int, KmemCache | None | bool] = {}
        # Within one poll: sizes whose ordinary (non-reserve) RX attempt failed, with nr_free then.
        # While nr_free has not grown and no ordinary skb was freed, that attempt would fail the
        # same way (the watermark test is monotonic in nr_free, and only a free of an ordinary
        # object refills an ordinary slab), so reserve policies skip it: one failed attempt per
        # poll and size instead of one per frame (the attempts are the slow path of the mm).
        self.rx_failed: dict[int, int] = {}
        # Live skbs (RX and TX) and their truesize: the accounting the tests check.
        self.skbs_live = 0
        self.skb_truesize_live = 0

    # ---- skbs ---------------------------------------------------------------------------------

    def data_cache(self, size: int) -> KmemCache | None:
        """The kmalloc cache for an skb data buffer of `size` (None: larger than any cache)."""
        c = self._data_cache.get(size, False)
        if c is False:
            n = size + SKB_SHARED_INFO
            c = self._data_cache[size] = self.slabs.kmalloc_cache(n) if n <= KMALLOC_MAX_CACHE_SIZE else None
        return c

    def skb_try(self, size: int, gfp: Gfp, rx: bool) -> SkBuff | None:
        """Both allocations of one skb with `gfp`, or None (nothing left allocated)."""
        head = self.head_cache.alloc_obj(gfp)
        if head is None:
            return None
        cache = self._data_cache.get(size, False)
        if cache is False:
            cache = self.data_cache(size)
        buf = cache.alloc_obj(gfp) if cache is not None else self.slabs.kmalloc(size + SKB_SHARED_INFO, gfp)
        if buf is None:
            self.head_cache.free_obj(head)
            return None
        skb = SkBuff(self, size, head, buf, rx)
        self.skbs_live += 1
        self.skb_truesize_live += skb.truesize
        return skb

    def rx_skb(self, size: int) -> SkBuff | None:
        """__netdev_alloc_skb in the receive stage: the policy's emergency rule (module doc)."""
        stat = self.stat
        if not self.memalloc_socks or self.policy is Policy.NONE:
            # skb_try(size, GFP_ATOMIC, True), inlined: this is every frame's first step
            head = self.head_cache.alloc_obj(GFP_ATOMIC)
            if head is None:
                return None
            cache = self._data_cache.get(size, False)
            if cache is False:
                cache = self.data_cache(size)
            buf = cache.alloc_obj(GFP_ATOMIC) if cache is not None else self.slabs.kmalloc(size + SKB_SHARED_INFO, GFP_ATOMIC)
            if buf is None:
                self.head_cache.free_obj(head)
                return None
            skb = SkBuff(self, size, head, buf, True)
            self.skbs_live += 1
            self.skb_truesize_live += skb.truesize
            stat.skbs += 1
            return skb
        failed = self.rx_failed.get(size)
        if failed is not None and self.zone.nr_free <= failed:
            skb = None  # the ordinary attempt would fail again (see rx_failed)
        else:
            skb = self.skb_try(size, _ATOMIC_NOMEMALLOC if self.policy is Policy.PFMEMALLOC else GFP_ATOMIC, True)
            if skb is None:
                self.rx_failed[size] = self.zone.nr_free
        if self.policy is Policy.PFMEMALLOC:
            if skb is None:
                skb = self.skb_try(size, _ATOMIC_MEMALLOC, True)
                if skb is None:
                    return None
                if skb.buf.pfmemalloc or skb.head.pfmemalloc:
                    skb.pfmemalloc = skb.memalloc = True
                    stat.skbs_emergency += 1
            stat.skbs += 1
            return skb
        # v12
        if skb is None:
            charge = roundup_pow_of_two(size + SKB_SHARED_INFO)
            node = self.reserve.skb_data if self.reserve is not None else None
            if node is not None and not node.charge(charge):
                return None
            skb = self.skb_try(size, _ATOMIC_EMERGENCY, True)
            if skb is None:
                if node is not None:
                    node.uncharge(charge)
                return None
            skb.emergency = skb.memalloc = True
            skb.charged = charge if node is not None else 0
            stat.skbs_emergency += 1
        stat.skbs += 1
        return skb

    def skb_free(self, skb: SkBuff) -> None:
        if skb.freed:
            raise RuntimeError(f"double free of {skb!r}")
        skb.freed = True
        if skb.frag_list:
            for s in skb.frag_list:
                self.skb_free(s)
            skb.frag_list = None
        self.head_cache.free_obj(skb.head)
        buf = skb.buf
        if buf.__class__ is Slab:
            buf.cache.free_obj(buf)
        else:
            self.slabs.kfree(buf)  # a page-backed buffer (above the largest kmalloc cache)
        self.skbs_live -= 1
        self.skb_truesize_live -= skb.own_truesize
        if not skb.memalloc and self.rx_failed:
            self.rx_failed.clear()  # an ordinary object went back to a slab: try normally again
        if skb.charged:
            self.reserve.skb_data.uncharge(skb.charged)  # memory freed first, then uncharged
            skb.charged = 0

    def skb_free_queue(self, q: Any) -> int:
        """kfree_skb() of every skb on a socket's receive queue (a reader consuming it all);
        returns their truesize.  Ordinary skbs are freed in bulk (kmem_cache_free_bulk), with the
        counters summed; the rest one by one."""
        truesize = own = 0
        ordinary = False
        heads: list[Slab] = []
        bufs: list[Slab] = []
        data_cache = None  # the data buffers' cache: a flood's frames share one
        popleft = q.popleft
        while q:
            skb = popleft()
            truesize += skb.truesize
            buf = skb.buf
            if skb.freed or skb.frag_list or skb.charged or buf.__class__ is not Slab:
                self.skb_free(skb)  # the general case (and its double-free check)
                continue
            skb.freed = True
            heads.append(skb.head)
            if buf.cache is not data_cache:
                if data_cache is not None:
                    data_cache.free_bulk(bufs)
                    bufs = []
                data_cache = buf.cache
            bufs.append(buf)
            own += skb.own_truesize
            if not skb.memalloc:
                ordinary = True
        if heads:
            self.head_cache.free_bulk(heads)
            data_cache.free_bulk(bufs)  # type: ignore[union-attr]
            self.skbs_live -= len(heads)
            self.skb_truesize_live -= own
            if ordinary and self.rx_failed:
                self.rx_failed.clear()  # as skb_free: an ordinary object went back to a slab
        return truesize

    async def tx_skbs(self, sizes: list[int], sk: Sock) -> list[SkBuff]:
        """TX skbs for one send with the socket's sk_allocation; may sleep in reclaim."""
        gfp = sk.sk_allocation
        out: list[SkBuff] = []
        stat = self.stat
        try:
            for size in sizes:
                skb = self.skb_try(size, gfp, False)
                if skb is None:
                    head = await self.head_cache.alloc_obj_wait(gfp)
                    try:
                        obj = await self.slabs.kmalloc_wait(size + SKB_SHARED_INFO, gfp)
                    except BaseException:
                        self.head_cache.free_obj(head)
                        raise
                    # a slab object is held by its slab, as skb_try's are; a page-backed one as is
                    buf = obj.slab if obj.slab is not None else obj
                    skb = SkBuff(self, size, head, buf, False)
                    self.skbs_live += 1
                    self.skb_truesize_live += skb.truesize
                if skb.head.pfmemalloc or skb.buf.pfmemalloc:
                    skb.pfmemalloc = skb.memalloc = True
                    stat.tx_skbs_reserve += 1
                stat.tx_skbs += 1
                out.append(skb)
        except BaseException:
            stat.tx_nomem += 1
            for s in out:
                s.free()
            raise
        return out

    # ---- route cache entries and fragment queues ----------------------------------------------

    def dst_alloc(self) -> tuple[SlabObj, bool] | None:
        obj = self.dst_cache.alloc(GFP_ATOMIC)
        if obj is None:
            return None
        if obj.pfmemalloc and self.reserve is not None:
            if not self.reserve.route_cache.charge(1):
                self.dst_cache.free(obj)
                return None
            return obj, True
        return obj, False

    def dst_free(self, obj: SlabObj, charged: bool) -> None:
        self.dst_cache.free(obj)
        if charged:
            self.reserve.route_cache.uncharge(1)

    def ipq_alloc(self) -> tuple[SlabObj, bool] | None:
        obj = self.ipq_cache.alloc(GFP_ATOMIC)
        if obj is None:
            return None
        if obj.pfmemalloc and self.reserve is not None:
            if not self.reserve.frag_cache.charge(IPQ):
                self.ipq_cache.free(obj)
                return None
            return obj, True
        return obj, False

    def ipq_free(self, obj: SlabObj, charged: bool) -> None:
        self.ipq_cache.free(obj)
        if charged:
            self.reserve.frag_cache.uncharge(IPQ)
