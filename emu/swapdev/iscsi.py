"""An iSCSI LUN used as a swap block device (the seed's patches 32-40).

- swap_activate: log in (the session's TCP socket is SOCK_MEMALLOC from the moment it is
  connected, and again after every reconnect: the connect factory marks each new one), read the
  capacity, check the LUN holds the swap area; under v12 the session's TX term is added to the
  reserve tree.
- swap_rw("write"): the PDUs are built and sent under PF_MEMALLOC; writes are durable with FUA
  (default) or WRITE followed by SYNCHRONIZE CACHE.
- swap_rw("read"): READ of the slot's blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import trio

from emu.kernel.sched import memalloc_noreclaim
from emu.mm.gfp import GFP_NOIO
from emu.mm.sizes import ISCSI_TASK
from emu.mm.swap import SwapIOError
from emu.net.reserve import tx_reserve_pages
from emu.swapdev.buffers import HostBuffers
from emu.swapdev.endpoint import IscsiEndpoint
from emu.swapdev.framers import IscsiFramer
from emu.swapdev.remote import RemoteSwap
from iscsi.initiator import Initiator, ISCSIError, ScsiError

if TYPE_CHECKING:
    from emu.net.stack import NetStack


class IscsiSwapLun(RemoteSwap):
    KTHREAD = "iscsi_q"
    RESERVE_USER = "iscsi_sessions"
    fs_backed = False  # a block device: GFP_NOFS reclaim may write to it (GFP_NOIO may not)

    def __init__(self, net: NetStack | None, server: IscsiEndpoint, *, durability: Literal["fua", "sync_cache"] = "fua",
                 via_host: bool = True, command_timeout: float | None = None, queue_depth: int = 16,
                 initiator_name: str | None = None) -> None:
        super().__init__(net, server.url(), via_host=via_host)
        self.server = server
        self.initiator_name = initiator_name
        self.durability = durability
        self.command_timeout = command_timeout
        # The SCSI device queue depth, 16 like the NFS transport's RPC slot table (open-iscsi: 32):
        # commands beyond it wait in the block layer, not on the wire.
        self.queue = trio.Semaphore(queue_depth)
        self.buffers = HostBuffers(net.slabs, GFP_NOIO, ISCSI_TASK) if net is not None and via_host else None
        self.ini: Any = None
        self.block_size = 512
        self._last_reissued = 0

    async def _connect(self) -> Any:
        self.connects += 1
        if not self.via_host:
            s = await trio.open_tcp_stream(self.server.host, self.server.port)
            return s
        st = await self.net.connect_tcp(self.server.host, self.server.port, memalloc=True, link=self.link,
                                        framer=IscsiFramer())
        self.sockets.append(st.sock)
        return st

    async def swap_activate(self, nr_pages: int, page_size: int) -> None:
        self.page_size, self.nr_pages = page_size, nr_pages
        kw: dict[str, Any] = {"lun": self.server.lun, "command_timeout": self.command_timeout}
        if self.buffers is not None:
            kw["buffers"] = self.buffers
        if self.initiator_name:
            kw["initiator_name"] = self.initiator_name
        self.ini = Initiator(self._connect, self.server.iqn, **kw)
        await self._nursery.start(self._hold, self.ini)
        self.block_size = self.ini.block_size
        if page_size % self.block_size:
            raise SwapIOError(f"LUN block size {self.block_size} does not divide the page size {page_size}")
        need = nr_pages * page_size // self.block_size
        if self.ini.nblocks < need:
            raise SwapIOError(f"LUN {self.server.url()} has {self.ini.nblocks} blocks of {self.block_size}; "
                              f"swap of {nr_pages} pages needs {need}")
        self._add_reserve_term(tx_reserve_pages(page_size))

    async def swap_rw(self, op: Literal["read", "write"], slot: int, bufs: list[memoryview]) -> None:

        if self.ini is None:
            raise SwapIOError("iSCSI LUN not active")
        if slot < 0 or slot + len(bufs) > self.nr_pages:
            raise SwapIOError(f"slots {slot}..{slot + len(bufs) - 1} outside the swap area of {self.nr_pages}")
        per = self.page_size // self.block_size
        lba = slot * per
        nblocks = len(bufs) * per
        async with self.queue:
            await self._rw(op, slot, bufs, lba, nblocks)

    async def _rw(self, op: str, slot: int, bufs: list[memoryview], lba: int, nblocks: int) -> None:
        try:
            self._submit()
            if op == "write":
                data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
                what = f"WRITE lba {lba}+{nblocks} {'FUA' if self.durability == 'fua' else '+ SYNCHRONIZE CACHE'}"
                with self.inflight.track("write", slot, len(bufs), what):
                    with memalloc_noreclaim():
                        await self.ini.write(lba, data, fua=self.durability == "fua")
                        if self.durability == "sync_cache":
                            await self.ini.synchronize_cache(lba, nblocks)
                self.inflight.wrote(slot, data, self.page_size)
            elif op == "read":
                with self.inflight.track("read", slot, len(bufs), f"READ lba {lba}+{nblocks}"):
                    data = await self.ini.read(lba, nblocks)
                self._complete_read("iSCSI", slot, data, bufs)
            else:
                raise ValueError(f"bad swap op {op!r}")
        except (ISCSIError, ScsiError) as e:
            raise SwapIOError(f"iSCSI {op} at slot {slot}: {e}") from e

    def _drop_client(self) -> None:
        self.ini = None

    def retransmits(self) -> int:
        """Session recoveries (reissued commands) and TCP re-offers of held response chunks."""
        if self.ini is not None:
            self._last_reissued = int(self.ini.reissued)
        sk = self.sock  # None until the first connect, and when not via the host (no wire)
        wire = sk.wire if sk is not None else None  # a TcpWire once connected
        return self._last_reissued + (wire.reoffers if wire is not None else 0)

    def sock_name(self) -> str:
        return self._sock_desc("iscsi (plain socket)")
