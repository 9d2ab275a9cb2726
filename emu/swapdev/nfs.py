"""A swap file on an NFS export, activated as Linux does it (nfs_swap_activate, 2007 and 3.6).

- swap_activate: MOUNT the export, LOOKUP or CREATE the swap file, make it exactly the swap size
  and preallocate it (write every block, so it has no holes, as swapon requires), then mark the
  transport a swapper: its socket gets SOCK_MEMALLOC (`sk_set_memalloc`) — again after every
  reconnect, since the connect factory marks each new socket — and under v12 the NFS swapper's
  TX term is added to the reserve tree.
- swap_rw("write"): runs under PF_MEMALLOC (RPC_TASK_SWAPPER); FILE_SYNC writes (default) or
  UNSTABLE writes followed by COMMIT, whose verifier is checked against the writes' (a changed
  verifier means the server restarted: the client resends the data).
- swap_rw("read"): READ of the slot's bytes into the pages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import trio

from emu.kernel.sched import TaskFlags, memalloc_noreclaim, task
from emu.mm.gfp import GFP_NOWAIT, Gfp
from emu.kernel.policy import Policy
from emu.mm.reserve import kmalloc_objs_estimate
from emu.mm.sizes import RPC_MAX_SLOT_TABLE, RPC_RQST
from emu.mm.swap import SwapIOError
from emu.net.reserve import tx_reserve_pages
from emu.swapdev.buffers import RpcBuffers
from emu.swapdev.endpoint import NfsEndpoint
from emu.swapdev.framers import RpcDatagramFramer, RpcStreamFramer
from emu.swapdev.remote import RemoteSwap
from nfs.client import NfsClient
from nfs.nfs3 import CreateMode, Nfs3Error, StableHow, Stat
from nfs.transport import tcp_connect, udp_connect

if TYPE_CHECKING:
    from emu.net.stack import NetStack
    from emu.net.transport import EmuDatagram, EmuStream

PREALLOC_CHUNK = 32 * 1024
NFS_SLOTS = 16  # xprt_udp_slot_table_entries / tcp_slot_table_entries (RPC_DEF_SLOT_TABLE)
PREALLOC_PARALLEL = 4


def rpc_reserve_pages(page_size: int = 4096, slot_table: int = RPC_MAX_SLOT_TABLE, rqst_size: int = RPC_RQST) -> int:
    """RPC_RESERVE_PAGES, the NFS swap transport's term: the kmalloc estimate of the slot table's
    rpc_rqst objects plus TX_RESERVE_PAGES."""
    return kmalloc_objs_estimate(slot_table, rqst_size, page_size) + tx_reserve_pages(page_size)


class NfsSwapFile(RemoteSwap):
    KTHREAD = "rpciod"
    RESERVE_USER = "nfs_swappers"
    fs_backed = True  # writing enters a filesystem: GFP_NOFS reclaim may not start it

    def __init__(self, net: NetStack | None, server: NfsEndpoint, proto: Literal["udp", "tcp"], *,
                 stable: Literal["FILE_SYNC", "UNSTABLE"] = "FILE_SYNC", timeo: float | None = None,
                 via_host: bool = True) -> None:
        super().__init__(net, server.url(), via_host=via_host)
        self.server = server
        self.proto = proto
        self.stable = stable
        self.timeo = timeo
        self.buffers: RpcBuffers | None = None
        if net is not None and via_host:
            # rpc_malloc's gfp: GFP_NOWAIT; 3.6 tags a swapper transport's tasks RPC_TASK_SWAPPER,
            # which adds __GFP_MEMALLOC.  Otherwise the calling task's PF_MEMALLOC decides.
            gfp = GFP_NOWAIT | Gfp.MEMALLOC if net.policy is Policy.PFMEMALLOC else GFP_NOWAIT
            self.buffers = RpcBuffers(net.slabs, gfp, RPC_RQST, NFS_SLOTS)
        self.client: Any = None
        self.fh: bytes = b""

    # ---- transports --------------------------------------------------------------------------

    async def _connect(self) -> Any:
        """The client's connect factory: every new socket is marked SOCK_MEMALLOC at once."""
        host, port = self.server.host, self.server.nfsport
        self.connects += 1
        if not self.via_host:
            return await (udp_connect(host, port) if self.proto == "udp" else tcp_connect(host, port))
        t: EmuDatagram | EmuStream
        if self.proto == "udp":
            t = await self.net.open_udp(host, port, memalloc=True, link=self.link, framer=RpcDatagramFramer())
        else:
            t = await self.net.connect_tcp(host, port, memalloc=True, link=self.link, framer=RpcStreamFramer())
        self.sockets.append(t.sock)
        return t

    async def _mount_connect(self) -> Any:
        host, port = self.server.host, self.server.mountport
        if not self.via_host:
            return await (udp_connect(host, port) if self.proto == "udp" else tcp_connect(host, port))
        if self.proto == "udp":
            return await self.net.open_udp(host, port, link=self.link, framer=RpcDatagramFramer())
        return await self.net.connect_tcp(host, port, link=self.link, framer=RpcStreamFramer())

    async def swap_activate(self, nr_pages: int, page_size: int) -> None:
        self.page_size, self.nr_pages = page_size, nr_pages
        kw: dict[str, Any] = {"proto": self.proto, "slots": NFS_SLOTS, "server": self.server.host}
        if self.timeo is not None:
            kw["timeo"] = self.timeo
        if self.buffers is not None:
            await self.buffers.fill_pool()
            kw["buffers"] = self.buffers
        self.client = NfsClient(self._connect, mount_connect=self._mount_connect, **kw)
        await self._nursery.start(self._hold, self.client)
        with task("rpciod", TaskFlags.PF_MEMALLOC | TaskFlags.PF_KTHREAD):
            await self._activate(nr_pages, page_size)

    async def _activate(self, nr_pages: int, page_size: int) -> None:
        root = await self.client.mount(self.server.export)
        name = self.server.swapfile
        try:
            fh, attr = await self.client.lookup(root, name)
        except Nfs3Error as e:
            if e.status != Stat.NFS3ERR_NOENT:
                raise
            fh, attr = await self.client.create(root, name, mode=0o600, how=CreateMode.UNCHECKED)
        self.fh = fh
        size = nr_pages * page_size
        if attr is None:
            attr = await self.client.getattr(fh)
        # A swap file must have no holes: reuse one that is fully allocated, else write it all.
        if attr.size != size or attr.used < size:
            await self.client.setattr(fh, size=size)
            await self._preallocate(size)
        # The transport serves the VM from now on (xs_set_memalloc / sk_set_memalloc).
        self._add_reserve_term(rpc_reserve_pages(page_size))

    async def _preallocate(self, size: int) -> None:
        """Write every block once (no holes), as mkswap + dd would. FILE_SYNC: UNSTABLE data would
        be held by the client until a COMMIT (to resend it if the server restarts)."""
        zero = bytes(PREALLOC_CHUNK)
        offsets = list(range(0, size, PREALLOC_CHUNK))

        async def worker(i: int) -> None:
            for off in offsets[i::PREALLOC_PARALLEL]:
                n = min(PREALLOC_CHUNK, size - off)
                await self.client.write(self.fh, off, zero[:n], stable=StableHow.FILE_SYNC)

        async with trio.open_nursery() as n:
            for i in range(PREALLOC_PARALLEL):
                n.start_soon(worker, i)

    async def swap_rw(self, op: Literal["read", "write"], slot: int, bufs: list[memoryview]) -> None:
        if self.client is None:
            raise SwapIOError("NFS swap file not active")
        if slot < 0 or slot + len(bufs) > self.nr_pages:
            raise SwapIOError(f"slots {slot}..{slot + len(bufs) - 1} outside the swap file of {self.nr_pages}")
        off = slot * self.page_size
        want = len(bufs) * self.page_size
        try:
            self._submit()
            if op == "write":
                data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
                stable = StableHow.FILE_SYNC if self.stable == "FILE_SYNC" else StableHow.UNSTABLE
                with self.inflight.track("write", slot, len(bufs), f"NFS WRITE {self.stable} {want} bytes at {off}"):
                    # Swap writes run as RPC_TASK_SWAPPER: under PF_MEMALLOC.
                    with memalloc_noreclaim():
                        res = await self.client.write(self.fh, off, data, stable=stable)
                        if res.count != want:
                            raise SwapIOError(f"short NFS write at slot {slot}: {res.count} of {want}")
                        if stable == StableHow.UNSTABLE and res.committed == StableHow.UNSTABLE:
                            await self.client.commit(self.fh, off, want)  # verifier checked, resent if changed
                self.inflight.wrote(slot, data, self.page_size)
            elif op == "read":
                with self.inflight.track("read", slot, len(bufs), f"NFS READ {want} bytes at {off}"):
                    data = await self.client.read(self.fh, off, want)
                self._complete_read("NFS", slot, data, bufs)
            else:
                raise ValueError(f"bad swap op {op!r}")
        except Nfs3Error as e:
            raise SwapIOError(f"NFS {op} at slot {slot}: {e}") from e
        except trio.ClosedResourceError as e:
            # The transport was shut down under the I/O (swapoff, or the end of a stuck run): an
            # I/O error for this page, as for a dead server, not a crash of the host.
            raise SwapIOError(f"NFS {op} at slot {slot}: client closed") from e

    def _drop_client(self) -> None:
        self.client = None

    # ---- for the report ------------------------------------------------------------------------

    def retransmits(self) -> int:
        if self.client is None:
            return self._last_retrans
        self._last_retrans = int(self.client.stats.get("retransmissions", 0))
        return self._last_retrans

    _last_retrans = 0

    def sock_name(self) -> str:
        return self._sock_desc(f"nfs-{self.proto} (plain socket)")
