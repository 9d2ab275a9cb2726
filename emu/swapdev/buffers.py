"""Request buffers charged to the emulated host (the clients' `RequestBuffers` hook).

Each request the NFS client or the iSCSI initiator sends holds, until its reply has been
processed, a control structure (`rpc_rqst` / the iSCSI task) and its header buffer, as kmalloc
objects of the host. The data of a swap write is *not* copied: as in Linux (xdr_buf page vectors,
scatter-gather for iSCSI) the request references the swapped page itself, so only the headers
are charged (at most `HEAD_MAX` bytes; smaller requests are charged whole).

iSCSI (`HostBuffers`, GFP_NOIO) may sleep in reclaim: it allocates before the command enters the
session, holding nothing another request needs.  NFS (`RpcBuffers`) follows `rpc_malloc`, which
"never sleeps" so that rpciod cannot hang (net/sunrpc/sched.c): GFP_NOWAIT, plus `__GFP_MEMALLOC`
for a swapper transport's tasks in 3.6 (`RPC_TASK_SWAPPER`); when that fails, one of the
`rpc_buffer_mempool`'s RPC_BUFFER_POOLSIZE buffers; when those are out too, `call_allocate` retries
after `rpc_delay(HZ >> 4)`, still holding its slot.  A request that slept in reclaim while holding
a slot could starve the very swap-out that reclaim waits for.  Under any policy a swap write runs
under PF_MEMALLOC and so may take its buffers from the reserve, as rpciod does.
"""

from __future__ import annotations

from typing import Any, cast

import trio

from emu.mm.gfp import GFP_KERNEL, Gfp
from emu.mm.slab import SlabObj, Slabs


HEAD_MAX = 1024  # call header + reply header space (rpc_malloc's rq_callsize + rq_rcvsize)
RPC_BUFFER_MAXSIZE = 2048  # net/sunrpc/sched.c: the mempool's element size
RPC_BUFFER_POOLSIZE = 8  # net/sunrpc/sched.c: elements kept for when kmalloc fails
RPC_ALLOC_RETRY = 1 / 16  # call_allocate: rpc_delay(task, HZ >> 4)


class HostBuffers:
    def __init__(self, slabs: Slabs, gfp: Any, control_size: int) -> None:
        self.slabs = slabs
        self.gfp = gfp
        self.control_size = control_size
        self.live = 0
        self.bytes_live = 0
        self.peak = 0

    async def alloc(self, nbytes: int) -> object:
        ctl = await self.slabs.kmalloc_wait(self.control_size, self.gfp)
        try:
            buf = await self.slabs.kmalloc_wait(max(1, min(nbytes, HEAD_MAX)), self.gfp)
        except BaseException:
            self.slabs.kfree(ctl)
            raise
        self.live += 1
        self.bytes_live += nbytes
        self.peak = max(self.peak, self.live)
        return (ctl, buf, nbytes)

    def free(self, token: object) -> None:
        ctl, buf, nbytes = cast(tuple[SlabObj, SlabObj, int], token)
        self.slabs.kfree(buf)
        self.slabs.kfree(ctl)
        self.live -= 1
        self.bytes_live -= nbytes


class RpcBuffers(HostBuffers):
    """`rpc_malloc` for the NFS client: never sleeps in reclaim (see the module docstring).

    The `rpc_rqst`s are the slot table's own (`xprt->slot`, allocated with the transport), so a
    request charges only its call/reply buffer at send time."""

    def __init__(self, slabs: Slabs, gfp: Gfp, control_size: int, slots: int) -> None:
        if gfp & Gfp.WAIT:
            raise ValueError(f"rpc_malloc never sleeps: {gfp} has __GFP_WAIT")
        super().__init__(slabs, gfp, control_size)
        self.slots = slots
        self.rqsts: list[SlabObj] = []  # free slots' rpc_rqst
        self.pool: list[SlabObj] = []  # rpc_buffer_mempool's elements
        self.pool_taken = 0  # times a buffer came from the pool
        self.delays = 0  # times call_allocate had to wait HZ >> 4

    async def fill_pool(self) -> None:
        """At setup, GFP_KERNEL: the slot table's rqsts (xprt_alloc) and sunrpc's mempool."""
        while len(self.rqsts) < self.slots:
            self.rqsts.append(await self.slabs.kmalloc_wait(self.control_size, GFP_KERNEL))
        while len(self.pool) < RPC_BUFFER_POOLSIZE:
            self.pool.append(await self.slabs.kmalloc_wait(RPC_BUFFER_MAXSIZE, GFP_KERNEL))

    def _try(self, nbytes: int) -> tuple[SlabObj, SlabObj | None, SlabObj | None] | None:
        if not self.rqsts:
            raise RuntimeError(f"more than {self.slots} requests in flight: the slot table bounds them")
        buf = self.slabs.kmalloc(max(1, min(nbytes, HEAD_MAX)), self.gfp)
        if buf is not None:
            return (self.rqsts.pop(), buf, None)
        if self.pool:  # mempool_alloc's fallback
            self.pool_taken += 1
            return (self.rqsts.pop(), None, self.pool.pop())
        return None

    async def alloc(self, nbytes: int) -> object:
        while (got := self._try(nbytes)) is None:
            self.delays += 1
            await trio.sleep(RPC_ALLOC_RETRY)
        rqst, buf, pooled = got
        self.live += 1
        self.bytes_live += nbytes
        self.peak = max(self.peak, self.live)
        return (rqst, buf, pooled, nbytes)

    def free(self, token: object) -> None:
        rqst, buf, pooled, nbytes = cast(tuple[SlabObj, SlabObj | None, SlabObj, int], token)
        if buf is not None:
            self.slabs.kfree(buf)
        else:
            self.pool.append(pooled)  # mempool_free refills the pool first
        self.rqsts.append(rqst)
        self.live -= 1
        self.bytes_live -= nbytes
