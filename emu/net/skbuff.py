"""Socket buffers: `struct sk_buff`, and their allocator paid for in the host's memory.

An skb is two allocations, as `__alloc_skb` makes them: the head (`struct sk_buff`) from the
`skbuff_head_cache` slab and the data buffer (`size` bytes plus `struct skb_shared_info`) from
kmalloc.  An `SkBuff` stands for its head object: `head` is the slab that object lives in and
`buf` the data buffer's slab (or a page-backed `SlabObj` above the largest kmalloc cache), so no
handle objects are made per frame.  `truesize = size + SKB_HEAD + SKB_SHARED_INFO` is what
socket receive buffers are charged.

The RX rule per policy (`SkbAllocator.rx`, `__netdev_alloc_skb` in the receive path):
- none: GFP_ATOMIC only; the receive path never reaches the reserve.
- v12: GFP_ATOMIC; on failure, if a memalloc (SOCK_VMIO) socket exists and the "SKB data reserve"
  admits roundup_pow_of_two(size), __GFP_EMERGENCY: the skb is `emergency`, uncharged when freed.
- pfmemalloc: if a memalloc socket exists, GFP_ATOMIC|__GFP_NOMEMALLOC first, then
  GFP_ATOMIC|__GFP_MEMALLOC: the skb is `pfmemalloc` if its memory came from the reserve.
TX skbs use the socket's `sk_allocation` and may sleep in reclaim (`tx`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emu.mm.gfp import GFP_ATOMIC, Gfp
from emu.kernel.policy import Policy
from emu.mm.sizes import KMALLOC_MAX_CACHE_SIZE, SKB_HEAD, SKB_SHARED_INFO
from emu.mm.slab import KmemCache, Slab, Slabs, roundup_pow_of_two

if TYPE_CHECKING:
    from emu.mm.reserve import MemReserve

SKB_OVERHEAD = SKB_HEAD + SKB_SHARED_INFO

_ATOMIC_NOMEMALLOC = GFP_ATOMIC | Gfp.NOMEMALLOC
_ATOMIC_MEMALLOC = GFP_ATOMIC | Gfp.MEMALLOC
_ATOMIC_EMERGENCY = GFP_ATOMIC | Gfp.EMERGENCY


class SkBuff:
    """`struct sk_buff` with what the model needs.  `memalloc` is 0, or EMERGENCY (v12) or
    PFMEMALLOC (3.6): the skb's memory came from the reserve.  `charged` (bytes charged to v12's
    SKB data reserve) and `frag_list` (a reassembled datagram's other fragments) are class
    defaults here and only set on `SkBuffX`, so the common skb carries neither."""

    __slots__ = ("len", "truesize", "head", "buf", "memalloc", "data", "saddr", "sport")

    EMERGENCY = 1
    PFMEMALLOC = 2
    charged = 0
    frag_list: list[SkBuff] | None = None

    def __init__(self, size: int, head: Slab, buf: Any, memalloc: int = 0, data: Any = None,
                 saddr: str = "", sport: int = 0, length: int = -1) -> None:
        # `length` (the payload) defaults to `size`; one call fills a received frame's skb
        self.len = size if length < 0 else length
        self.truesize = size + SKB_OVERHEAD
        self.head = head
        self.buf = buf
        self.memalloc = memalloc
        self.data = data
        self.saddr = saddr
        self.sport = sport

    @property
    def emergency(self) -> bool:
        return self.memalloc == SkBuff.EMERGENCY

    @property
    def pfmemalloc(self) -> bool:
        return self.memalloc == SkBuff.PFMEMALLOC

    @property
    def own_truesize(self) -> int:
        """truesize without a reassembled datagram's other fragments."""
        fl = self.frag_list
        return self.truesize - sum(s.truesize for s in fl) if fl else self.truesize

    def __repr__(self) -> str:
        mark = {0: "", 1: " emergency", 2: " pfmemalloc"}[self.memalloc]
        return f"<SkBuff len={self.len} truesize={self.truesize}{mark}>"


class SkBuffX(SkBuff):
    """An skb charged to the v12 reserve or carrying a frag_list."""

    __slots__ = ("charged", "frag_list")

    def __init__(self, size: int, head: Slab, buf: Any, memalloc: int = 0) -> None:
        super().__init__(size, head, buf, memalloc)
        self.charged = 0
        self.frag_list = None


class SkbRun:
    """A run of like RX skbs accepted together (`SkbAllocator.rx_bulk`): ordinary, one size, their
    head objects in `heads` and data buffers in `bufs` (both slab objects, as an SkBuff's), the
    frames they carry in `frames` ((due, data, saddr, sport) each, as the wire read them).

    The skbs are real (their memory is allocated and charged like any other's); only the Python
    object per skb is left out, which a reader that frees the whole queue never needs.  `skb(i)`
    makes the SkBuff of one of them for a reader that takes them one at a time.  `start` is how
    many were already taken from the front."""

    __slots__ = ("size", "payload", "frames", "heads", "bufs", "start")

    memalloc = 0  # never from the reserve (rx_bulk's precondition)

    def __init__(self, size: int, payload: int, frames: list[tuple[float, bytes, str, int]],
                 heads: list[Slab], bufs: list[Slab]) -> None:
        self.size = size
        self.payload = payload
        self.frames = frames
        self.heads = heads
        self.bufs = bufs
        self.start = 0

    def __len__(self) -> int:
        return len(self.heads) - self.start

    @property
    def truesize(self) -> int:
        """The truesize of the skbs still in the run."""
        return len(self) * (self.size + SKB_OVERHEAD)

    def skb(self, i: int) -> SkBuff:
        _, data, saddr, sport = self.frames[i]
        return SkBuff(self.size, self.heads[i], self.bufs[i], 0, data, saddr, sport, self.payload)

    def popleft(self) -> SkBuff:
        skb = self.skb(self.start)
        self.start += 1
        return skb

    def skbs(self) -> list[SkBuff]:
        """The SkBuffs of what is left (the run is then empty)."""
        out = [self.skb(i) for i in range(self.start, len(self.heads))]
        self.start = len(self.heads)
        return out


def attach_frag_list(head: SkBuff, rest: list[SkBuff], payload: Any) -> SkBuffX:
    """ip_frag_reasm: the first fragment becomes the datagram, the others hang off it."""
    skb = head if isinstance(head, SkBuffX) else _promote(head)
    skb.frag_list = rest
    for s in rest:
        skb.truesize += s.truesize
        if s.memalloc and not skb.memalloc:
            skb.memalloc = s.memalloc
    skb.data = payload
    skb.len = len(payload)
    return skb


def _promote(skb: SkBuff) -> SkBuffX:
    x = SkBuffX(skb.len, skb.head, skb.buf, skb.memalloc)
    x.truesize = skb.truesize
    x.data, x.saddr, x.sport = skb.data, skb.saddr, skb.sport
    return x


class SkbAllocator:
    """`__netdev_alloc_skb`, `alloc_skb` and `kfree_skb` of one host (the module docstring)."""

    def __init__(self, slabs: Slabs, policy: Policy, skb_data_reserve: MemReserve | None = None) -> None:
        self.slabs = slabs
        self.zone = slabs.zone
        self.policy = Policy(policy)
        self.skb_data = skb_data_reserve if self.policy is Policy.V12 else None
        self.head_cache: KmemCache = slabs.cache("skbuff_head_cache", SKB_HEAD)
        self.memalloc_socks = 0  # sk_memalloc_socks()
        self._data_caches: dict[int, KmemCache | None] = {}
        # Within one poll: sizes whose ordinary RX attempt failed, with nr_free then.  While
        # nr_free has not grown and no ordinary skb was freed that attempt fails the same way
        # (the watermark test is monotonic in nr_free, and only the free of an ordinary object
        # refills an ordinary slab), so the reserve policies skip it: one failed attempt per poll
        # and size instead of one per frame.
        self.rx_failed: dict[int, int] = {}
        self.live = 0  # skbs allocated now (RX and TX)
        self.live_truesize = 0
        self.rx_allocated = 0
        self.rx_reserve = 0  # RX skbs from the reserve (emergency / pfmemalloc)
        self.tx_allocated = 0
        self.tx_reserve = 0
        self.tx_failed = 0

    def data_cache(self, size: int) -> KmemCache | None:
        """The kmalloc cache for a data buffer of `size` (None: larger than any cache)."""
        try:
            return self._data_caches[size]
        except KeyError:
            n = size + SKB_SHARED_INFO
            c = self._data_caches[size] = self.slabs.kmalloc_cache(n) if n <= KMALLOC_MAX_CACHE_SIZE else None
            return c

    # ---- allocation ----------------------------------------------------------------------------

    def _try(self, size: int, gfp: Gfp) -> SkBuff | None:
        """Both allocations of one skb with `gfp`, or None (nothing left allocated)."""
        head = self.head_cache.alloc_obj(gfp)
        if head is None:
            return None
        cache = self.data_cache(size)
        buf = cache.alloc_obj(gfp) if cache is not None else self.slabs.kmalloc(size + SKB_SHARED_INFO, gfp)
        if buf is None:
            self.head_cache.free_obj(head)
            return None
        return SkBuff(size, head, buf)

    def rx(self, size: int) -> SkBuff | None:
        """An RX skb under the policy's rule; None: no memory (the frame is dropped)."""
        if not self.memalloc_socks or self.policy is Policy.NONE:
            skb = self._try(size, GFP_ATOMIC)
        else:
            failed = self.rx_failed.get(size)
            if failed is not None and self.zone.nr_free <= failed:
                skb = None  # the ordinary attempt would fail again (see rx_failed)
            else:
                skb = self._try(size, _ATOMIC_NOMEMALLOC if self.policy is Policy.PFMEMALLOC else GFP_ATOMIC)
                if skb is None:
                    self.rx_failed[size] = self.zone.nr_free
            if skb is None:
                skb = self._rx_reserve(size)
        if skb is not None:
            self.live += 1
            self.live_truesize += skb.truesize
            self.rx_allocated += 1
        return skb

    def rx_repeated(self, n: int, reserve: bool) -> None:
        """`n` more RX skbs were taken and given back as the last one was (a repeated drop
        counted at once by the receive path): the counts `rx` would have kept."""
        self.rx_allocated += n
        if reserve:
            self.rx_reserve += n

    def rx_bulk(self, size: int, n: int, frames: list[tuple[float, bytes, str, int]], payload: int) -> SkbRun | None:
        """Up to `n` RX skbs of `size` at once (kmem_cache_alloc_bulk), carrying `frames[:n]`
        ((due, data, saddr, sport) each, `payload` bytes): exactly the skbs `n` calls of `rx`
        would give, as long as each would be an ordinary GFP_ATOMIC skb whose objects come from
        what the caches hold or from new slabs the page allocator's fast path gives (above the
        low watermark: no watermark decision, no kswapd wakeup, no reserve).  Fewer (or None) when
        that no longer holds: the caller takes the next one with `rx`."""
        if self.memalloc_socks and self.policy is not Policy.NONE:
            return None
        cache = self.data_cache(size)
        if cache is None:
            return None
        heads = self.head_cache
        h_avail = heads.partial_avail(n)
        d_avail = cache.partial_avail(n)
        q = min(n, h_avail, d_avail)
        spare = self.zone.fast_path_pages()
        if q < n and spare:
            # more objects from new slabs, while the fast path can give their pages
            q = n
            while q > 0 and heads.pages_for(q - h_avail) + cache.pages_for(q - d_avail) > spare:
                q -= max(1, (q - max(h_avail, d_avail)) // 2) if q > max(h_avail, d_avail) else 1
            q = max(q, min(n, h_avail, d_avail))
        if not q:
            return None
        run = SkbRun(size, payload, frames if q == len(frames) else frames[:q], heads.alloc_fast(q), cache.alloc_fast(q))
        self.live += q
        self.live_truesize += q * (size + SKB_OVERHEAD)
        self.rx_allocated += q
        return run

    def _rx_reserve(self, size: int) -> SkBuff | None:
        if self.policy is Policy.PFMEMALLOC:
            skb = self._try(size, _ATOMIC_MEMALLOC)
            if skb is not None and (skb.head.pfmemalloc or _pf(skb.buf)):
                skb.memalloc = SkBuff.PFMEMALLOC
                self.rx_reserve += 1
            return skb
        # v12's __alloc_skb: the ordinary attempt has failed (rx); charge the data to the skb
        # reserve with the tree's kmalloc accounting (kmalloc_reserve's mem_reserve_kmalloc_charge)
        # and take both objects below the watermarks, or neither.
        node = self.skb_data
        if node is not None and not node.kmalloc_charge(size + SKB_SHARED_INFO):
            return None
        got = self._try(size, _ATOMIC_EMERGENCY)
        if got is None:
            if node is not None:
                node.kmalloc_uncharge(size + SKB_SHARED_INFO)
            return None
        skb = _promote(got)
        skb.memalloc = SkBuff.EMERGENCY
        skb.charged = roundup_pow_of_two(size + SKB_SHARED_INFO) if node is not None else 0
        self.rx_reserve += 1
        return skb

    async def tx(self, sizes: list[int], gfp: Gfp) -> list[SkBuff]:
        """TX skbs for one send with the socket's sk_allocation; may sleep in reclaim."""
        out: list[SkBuff] = []
        try:
            for size in sizes:
                skb = self._try(size, gfp)
                if skb is None:
                    head = await self.head_cache.alloc_obj_wait(gfp)
                    try:
                        obj = await self.slabs.kmalloc_wait(size + SKB_SHARED_INFO, gfp)
                    except BaseException:
                        self.head_cache.free_obj(head)
                        raise
                    # a slab object is held by its slab, as _try's are; a page-backed one as is
                    skb = SkBuff(size, head, obj.slab if obj.slab is not None else obj)
                if skb.head.pfmemalloc or _pf(skb.buf):
                    skb.memalloc = SkBuff.PFMEMALLOC
                    self.tx_reserve += 1
                self.live += 1
                self.live_truesize += skb.truesize
                self.tx_allocated += 1
                out.append(skb)
        except BaseException:
            self.tx_failed += 1
            for s in out:
                self.free(s)
            raise
        return out

    # ---- freeing ---------------------------------------------------------------------------------

    def free(self, skb: SkBuff) -> None:
        """kfree_skb(): the data, the head, any fragments; then uncharge the reserve."""
        head = skb.head
        if head is None:
            raise RuntimeError(f"double free of {skb!r}")
        skb.head = None  # type: ignore[assignment]
        fl = skb.frag_list
        own = skb.truesize
        if fl:
            for s in fl:
                own -= s.truesize
                self.free(s)
            skb.frag_list = None  # type: ignore[misc]  # only an SkBuffX has a frag_list
        self.head_cache.free_obj(head)
        buf = skb.buf
        if buf.__class__ is Slab:
            buf.cache.free_obj(buf)
        else:
            self.slabs.kfree(buf)  # a page-backed buffer (above the largest kmalloc cache)
        self.live -= 1
        self.live_truesize -= own
        if not skb.memalloc and self.rx_failed:
            self.rx_failed.clear()  # an ordinary object went back: try normally again
        charged = skb.charged
        if charged:
            skb.charged = 0  # type: ignore[misc]  # only an SkBuffX is charged
            self.skb_data.uncharge(charged)  # type: ignore[union-attr]  # freed first, then uncharged

    def free_queue(self, items: list[SkBuff | SkbRun]) -> int:
        """kfree_skb() of every skb of a socket's receive queue (`SkbQueue.take_all`: its owner
        read them all); returns their truesize.  Runs of like skbs (a flood's) are freed in bulk
        (kmem_cache_free_bulk); single skbs one by one, in queue order."""
        truesize = 0
        rx_failed = self.rx_failed
        for item in items:
            if item.__class__ is SkbRun:
                run: SkbRun = item  # type: ignore[assignment]
                n = len(run)
                if not n:
                    continue
                start = run.start
                heads, bufs = run.heads, run.bufs
                run.start = len(heads)  # a double free finds nothing left
                self.head_cache.free_bulk(heads[start:] if start else heads)
                bufs[start].cache.free_bulk(bufs[start:] if start else bufs)
                ts = n * (run.size + SKB_OVERHEAD)
                self.live -= n
                self.live_truesize -= ts
                truesize += ts
                if rx_failed:
                    rx_failed.clear()  # an ordinary object went back: try normally again
            else:
                truesize += item.truesize
                self.free(item)  # type: ignore[arg-type]
        return truesize


def _pf(buf: Any) -> bool:
    return bool(buf.pfmemalloc)
