"""IPv4 fragment reassembly (2.6-era net/ipv4/ip_fragment.c).

Queues are keyed by (source, destination, IP id, protocol).  Every queued fragment's truesize and
every queue's `struct ipq` count in `ip_frag_mem`; when a new fragment arrives with `ip_frag_mem`
above `ipfrag_high_thresh`, `ip_evictor` frees the least recently updated queues until it is at or
below `ipfrag_low_thresh`.  A queue expires `ipfrag_time` after it was created.  The `struct ipq`
comes from kmalloc in the receive stage's context (from the reserve while an emergency skb is
processed under PF_MEMALLOC; under v12 charged to the "IPv4 fragment cache" node).

Fragments here carry (offset, length) of the IP payload; the datagram's bytes travel with its
first fragment, so reassembly checks coverage arithmetic rather than copying bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emu.mm.gfp import GFP_ATOMIC
from emu.mm.reserve import kmem_cache_alloc_reserve, kmem_cache_free_reserve
from emu.mm.sizes import IPQ
from emu.net.netstat import DUP_FRAG, FRAG_NOMEM
from emu.net.skbuff import attach_frag_list

if TYPE_CHECKING:
    from emu.mm.reserve import MemReserve
    from emu.net.netstat import NetStat
    from emu.net.skbuff import SkbAllocator, SkBuff

FragKey = tuple[str, str, int, int]  # saddr, daddr, id, protocol

# net.ipv4 sysctls of the era
IPFRAG_HIGH_THRESH = 256 * 1024
IPFRAG_LOW_THRESH = 192 * 1024
IPFRAG_TIME = 30.0  # seconds


class IpQueue:
    __slots__ = ("key", "frags", "meat", "len", "created", "obj", "reserve_charged", "truesize", "payload")

    def __init__(self, key: FragKey, obj: Any, reserve_charged: bool, now: float) -> None:
        self.key = key
        self.frags: list[tuple[int, int, SkBuff]] = []  # (offset, end, skb)
        self.meat = 0  # payload bytes received
        self.len = 0  # total payload length, known once the last fragment arrived
        self.created = now
        self.obj = obj
        self.reserve_charged = reserve_charged
        self.truesize = 0
        self.payload: bytes | None = None


class FragQueues:
    """ipq_hash with its `struct ipq`s (kmalloc); `reserve` is v12's "IPv4 fragment cache"."""

    def __init__(self, skbs: SkbAllocator, stat: NetStat, high_thresh: int = IPFRAG_HIGH_THRESH,
                 low_thresh: int = IPFRAG_LOW_THRESH, timeout: float = IPFRAG_TIME,
                 reserve: MemReserve | None = None) -> None:
        if not 0 <= low_thresh <= high_thresh:
            raise ValueError("need 0 <= ipfrag_low_thresh <= ipfrag_high_thresh")
        self.skbs = skbs
        self.ipq_cache = skbs.slabs.kmalloc_cache(IPQ)
        self.reserve = reserve
        self.stat = stat
        self.high_thresh = high_thresh
        self.low_thresh = low_thresh
        self.timeout = timeout
        self.ip_frag_mem = 0
        # Insertion order is LRU order: a queue is moved to the end when a fragment joins it.
        self.queues: dict[FragKey, IpQueue] = {}

    def __len__(self) -> int:
        return len(self.queues)

    def queue_fragment(self, skb: SkBuff, key: FragKey, offset: int, length: int, more: bool,
                       payload: bytes | None, now: float) -> SkBuff | int | None:
        """ip_defrag: queue one fragment; return the reassembled skb when the datagram is complete,
        None while it waits for more, or a drop reason (FRAG_NOMEM, DUP_FRAG) after freeing it.

        Consumes `skb` either way.
        """
        if self.ip_frag_mem > self.high_thresh:
            self.evict()
        q = self.queues.get(key)
        if q is not None and now - q.created >= self.timeout:
            self._expire(q)
            q = None
        if q is None:
            got = kmem_cache_alloc_reserve(self.ipq_cache, GFP_ATOMIC, self.reserve, IPQ)
            if got is None:
                self.skbs.free(skb)
                return FRAG_NOMEM
            q = IpQueue(key, got[0], got[1], now)
            self.queues[key] = q
            self.ip_frag_mem += IPQ
        else:
            # list_move_tail(&qp->lru_list, &ipq_lru_list)
            del self.queues[key]
            self.queues[key] = q
        end = offset + length
        for o, e, _ in q.frags:
            if offset < e and o < end:  # overlap/duplicate: drop the newcomer (RFC 5722 spirit)
                self.skbs.free(skb)
                return DUP_FRAG
        q.frags.append((offset, end, skb))
        q.meat += length
        q.truesize += skb.truesize
        self.ip_frag_mem += skb.truesize
        if payload is not None:
            q.payload = payload
        if not more:
            q.len = end
        if q.len and q.meat == q.len:
            return self._reassemble(q)
        return None

    def _reassemble(self, q: IpQueue) -> SkBuff | None:
        del self.queues[q.key]
        self.ip_frag_mem -= q.truesize + IPQ
        q.frags.sort(key=lambda f: f[0])
        head = q.frags[0][2]
        rest = [f[2] for f in q.frags[1:]]
        kmem_cache_free_reserve(self.ipq_cache, q.obj, self.reserve, q.reserve_charged, IPQ)
        if q.payload is None:  # first fragment lost and a duplicate filled its hole: impossible
            self.skbs.free(head)
            for s in rest:
                self.skbs.free(s)
            return None
        self.stat.frag_reassembled += 1
        return attach_frag_list(head, rest, q.payload)

    def evict(self) -> int:
        """ip_evictor: free least recently updated queues down to ipfrag_low_thresh."""
        n = 0
        while self.ip_frag_mem > self.low_thresh and self.queues:
            q = next(iter(self.queues.values()))
            self._kill(q)
            self.stat.frag_evicted += 1
            n += 1
        return n

    def expire(self, now: float) -> int:
        """ip_expire for every queue whose ipfrag_time has run out."""
        old = [q for q in self.queues.values() if now - q.created >= self.timeout]
        for q in old:
            self._expire(q)
        return len(old)

    def _expire(self, q: IpQueue) -> None:
        self._kill(q)
        self.stat.frag_timeout += 1

    def _kill(self, q: IpQueue) -> None:
        del self.queues[q.key]
        for _, _, skb in q.frags:
            self.skbs.free(skb)
        self.ip_frag_mem -= q.truesize + IPQ
        kmem_cache_free_reserve(self.ipq_cache, q.obj, self.reserve, q.reserve_charged, IPQ)

    def flush(self) -> None:
        for q in list(self.queues.values()):
            self._kill(q)

    def queued_skbs(self) -> int:
        return sum(len(q.frags) for q in self.queues.values())
