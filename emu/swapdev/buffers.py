"""Request buffers charged to the emulated host (the clients' `RequestBuffers` hook).

Each request the NFS client or the iSCSI initiator sends holds, until its reply has been
processed, a control structure (the RPC task / the iSCSI task) and a header buffer. As in Linux
they come from their own slab caches (sunrpc's `rpc_tasks` and `rpc_buffers` mempools; the iSCSI
task pool), not from the generic kmalloc caches the receive path's skb data uses: freeing them
must not hand a receive-path allocation memory it could not otherwise get. The data of a swap
write is not copied: the request references the swapped page itself (xdr_buf page vectors,
scatter-gather for iSCSI), so only the header is charged. Allocated with the client's gfp
(GFP_NOFS for NFS, GFP_NOIO for iSCSI): swap writes run under PF_MEMALLOC and so may take them
from the reserve, as rpciod does.
"""

from __future__ import annotations

from typing import Any

from emu.mm.slab import Slabs

HEAD_MAX = 2048  # RPC_BUFFER_MAXSIZE: call header + reply header space


class HostBuffers:
    def __init__(self, slabs: Slabs, gfp: Any, control: tuple[str, int], buffer: tuple[str, int]) -> None:
        self.ctl_cache = slabs.cache(*control)
        self.buf_cache = slabs.cache(*buffer)
        self.gfp = gfp
        self.live = 0
        self.peak = 0

    async def alloc(self, nbytes: int) -> object:
        ctl = await self.ctl_cache.alloc_wait(self.gfp)
        try:
            buf = await self.buf_cache.alloc_wait(self.gfp)
        except BaseException:
            self.ctl_cache.free(ctl)
            raise
        self.live += 1
        self.peak = max(self.peak, self.live)
        return (ctl, buf)

    def free(self, token: object) -> None:
        ctl, buf = token  # type: ignore[misc]
        self.buf_cache.free(buf)
        self.ctl_cache.free(ctl)
        self.live -= 1
