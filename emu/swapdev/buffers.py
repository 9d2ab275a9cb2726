"""Request buffers charged to the emulated host (the clients' `RequestBuffers` hook).

Each request the NFS client or the iSCSI initiator sends holds, until its reply has been
processed, a control structure (`rpc_rqst` / the iSCSI task) and its header buffer, as kmalloc
objects of the host. The data of a swap write is *not* copied: as in Linux (xdr_buf page vectors,
scatter-gather for iSCSI) the request references the swapped page itself, so only the headers
are charged (at most `HEAD_MAX` bytes; smaller requests are charged whole). Allocated with the client's gfp (GFP_NOFS for NFS, GFP_NOIO for iSCSI): a
swap write runs under PF_MEMALLOC and so may take them from the reserve, like rpciod does.
"""

from __future__ import annotations

from typing import Any

from emu.mm.slab import Slabs


HEAD_MAX = 1024  # call header + reply header space (rpc_malloc's rq_callsize + rq_rcvsize)


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
        ctl, buf, nbytes = token  # type: ignore[misc]
        self.slabs.kfree(buf)
        self.slabs.kfree(ctl)
        self.live -= 1
        self.bytes_live -= nbytes
