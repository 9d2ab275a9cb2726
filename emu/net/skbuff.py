"""Socket buffers (`struct sk_buff`) paid for in the emulated host's memory.

An skb is two allocations, as `__alloc_skb` makes them: the head (`struct sk_buff`) from the
`skbuff_head_cache` slab and the data buffer (`size` bytes plus `struct skb_shared_info`) from
kmalloc.  The SkBuff itself stands for its head object, so `head` is the slab that object lives
in and `buf` the data buffer's slab (a page-backed `SlabObj` above the largest kmalloc cache):
no handle objects per frame.  Both have `.pfmemalloc` and `.cache`.  `truesize = size + SKB_HEAD + SKB_SHARED_INFO` is what socket receive buffers are charged.

How an RX skb may reach the reserve is the policy's RX rule (DESIGN §2), implemented in
`NetMem.rx_skb`; the skb is then marked `emergency` (v12) or `pfmemalloc` (3.6), and `memalloc`
is true for either.  The frame's real bytes travel in `data`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emu.mm.gfp import Gfp
from emu.mm.sizes import SKB_HEAD, SKB_SHARED_INFO

if TYPE_CHECKING:
    from emu.net.netmem import NetMem
    from emu.net.sock import Sock

SKB_OVERHEAD = SKB_HEAD + SKB_SHARED_INFO


class SkBuff:
    __slots__ = ("mem", "len", "truesize", "head", "buf", "emergency", "pfmemalloc", "memalloc",
                 "charged", "own_truesize", "data", "saddr", "sport", "sk", "frag_list", "rx", "freed")

    def __init__(self, mem: NetMem, size: int, head: Any, buf: Any, rx: bool) -> None:
        self.mem = mem
        self.len = size
        self.truesize = size + SKB_OVERHEAD
        self.own_truesize = self.truesize  # without a reassembled datagram's frag_list
        self.head = head
        self.buf = buf
        self.emergency = False
        self.pfmemalloc = False
        self.memalloc = False
        self.charged = 0  # bytes charged to the v12 "SKB data reserve"
        self.data: Any = None
        self.saddr = ""
        self.sport = 0
        self.sk: Sock | None = None
        self.frag_list: list[SkBuff] | None = None
        self.rx = rx
        self.freed = False

    def free(self) -> None:
        """kfree_skb(): free the data, the head and any fragments; uncharge the reserve."""
        self.mem.skb_free(self)

    def attach_frag_list(self, rest: list[SkBuff], payload: Any) -> None:
        """Turn the first fragment into the reassembled datagram (ip_frag_reasm)."""
        self.frag_list = rest
        for s in rest:
            self.truesize += s.truesize
            if s.memalloc:
                self.memalloc = True
                self.emergency |= s.emergency
                self.pfmemalloc |= s.pfmemalloc
        self.data = payload
        self.len = len(payload)

    def __repr__(self) -> str:
        mark = " emergency" if self.emergency else " pfmemalloc" if self.pfmemalloc else ""
        return f"<SkBuff len={self.len} truesize={self.truesize}{mark}>"


def alloc_skb(net: Any, size: int, gfp: Gfp, rx: bool = True) -> SkBuff | None:
    """alloc_skb for `net` (a NetStack, or anything with `.net`): never sleeps.

    RX skbs follow the policy's emergency rule (DESIGN §2); TX skbs use `gfp` as given.
    """
    mem = _mem(net)
    if rx:
        return mem.rx_skb(size)
    skb = mem.skb_try(size, gfp, rx=False)
    if skb is not None:
        mem.stat.tx_skbs += 1
        if skb.head.pfmemalloc or skb.buf.pfmemalloc:
            skb.pfmemalloc = skb.memalloc = True
            mem.stat.tx_skbs_reserve += 1
    return skb


def kfree_skb(skb: SkBuff) -> None:
    skb.free()


def _mem(net: Any) -> NetMem:
    mem = getattr(net, "mem", None)
    if mem is None and hasattr(net, "net"):
        mem = net.net.mem
    if mem is None:
        raise TypeError(f"{net!r} is not a NetStack")
    return mem
