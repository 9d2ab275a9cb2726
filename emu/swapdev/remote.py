"""What the NFS swap file and the iSCSI swap LUN share: swap storage on a remote server.

It owns the transport's lifetime in the host's nursery, runs the transport's own workers as a
PF_MEMALLOC kernel thread (rpciod, iscsi_q), remembers every socket it used (reconnects) for the
report, models the path to the server (`emu.net.link.PeerLink`: the LAN round trip and the link
rate, from the cost table), and adds its TX term to the v12 reserve tree while it is active.
"""

from __future__ import annotations

import contextlib
from typing import Literal, TYPE_CHECKING, Any

import trio

from emu.kernel.cpu import Costs
from emu.kernel.sched import TaskFlags, task
from emu.mm.swap import SwapIOError
from emu.net.link import PeerLink
from emu.swapdev.inflight import Inflight

if TYPE_CHECKING:
    from emu.net.stack import NetStack


class RemoteSwap:
    KTHREAD = "kswapdev"  # the name of the transport's worker thread, as ps shows it
    RESERVE_USER = "swap"  # its name in the v12 "protocol TX pages" inputs
    fs_backed = False

    def __init__(self, net: NetStack | None, name: str, *, via_host: bool = True) -> None:
        """`net` None (with via_host False): the same client over plain sockets, unemulated."""
        if net is None and via_host:
            raise ValueError("a swap device on the emulated host needs its network stack")
        # Typed as present: every emulated path checks `via_host` first, and only those use it.
        self.net: NetStack = net  # type: ignore[assignment]
        self.via_host = via_host
        costs = net.costs if net is not None else Costs()
        self.link = PeerLink(name, costs.peer_rtt, costs.link_rate)
        self.inflight = Inflight()
        self.page_size = 4096
        self.nr_pages = 0
        self.sockets: list[Any] = []  # every transport socket this device has used (reconnects)
        self.connects = 0
        self._nursery: trio.Nursery = None  # type: ignore[assignment]  # set by run(), before any use
        self._done = trio.Event()
        self._reserve_pages = 0  # the TX term this device added to the v12 reserve

    @property
    def sock(self) -> Any:
        live = [s for s in self.sockets if not s.closed]
        return live[-1] if live else (self.sockets[-1] if self.sockets else None)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the client's lifetime (its receive tasks) in the host's nursery until cancelled."""
        async with trio.open_nursery() as n:
            self._nursery = n
            task_status.started()
            await trio.sleep_forever()

    async def _hold(self, client: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # The transport's own workers (receive task, recovery, NOP answers) are kernel threads
        # serving the VM: they run PF_MEMALLOC and never recurse into reclaim, as rpciod and
        # iscsi_q do for a swap transport. Tasks they start inherit this context.
        with task(self.KTHREAD, TaskFlags.PF_MEMALLOC | TaskFlags.PF_KTHREAD):
            async with client:
                task_status.started()
                await self._done.wait()

    def _submit(self) -> None:
        """Building and submitting one request costs the CPU (a bio, an rpc_task, a PDU)."""
        if self.via_host:
            self.net.cpu.charge(self.net.costs.swap_io)

    def _add_reserve_term(self, pages: int) -> None:
        """Under v12, this transport's TX pages join the reserve tree (once, until close)."""
        reserve = self.net.reserve if self.via_host else None
        if reserve is not None and not self._reserve_pages:
            reserve.add_tx_pages(self.RESERVE_USER, pages)
            self._reserve_pages = pages

    def _complete_read(self, what: str, slot: int, data: bytes, bufs: list[memoryview]) -> None:
        """Check a swap read's length, let the audit see it, and copy it into the pages."""
        want = len(bufs) * self.page_size
        if len(data) != want:
            raise SwapIOError(f"short {what} read at slot {slot}: {len(data)} of {want}")
        if self.via_host:
            self.net.cpu.charge(want * self.net.costs.copy_byte)
        self.inflight.read_back(slot, data, self.page_size)
        pos = 0
        for b in bufs:
            b[:] = data[pos:pos + len(b)]
            pos += len(b)

    async def swap_activate(self, nr_pages: int, page_size: int) -> None:
        raise NotImplementedError

    async def swap_rw(self, op: Literal["read", "write"], slot: int, bufs: list[memoryview]) -> None:
        raise NotImplementedError

    async def swap_deactivate(self) -> None:
        await self.close()

    async def close(self) -> None:
        reserve = self.net.reserve if self.via_host else None
        if self._reserve_pages and reserve is not None:
            with contextlib.suppress(ValueError):
                reserve.remove_tx_pages(self.RESERVE_USER, self._reserve_pages)
        self._reserve_pages = 0
        self._done.set()
        self._drop_client()

    def _drop_client(self) -> None:
        raise NotImplementedError

    def retransmits(self) -> int:
        """Requests sent again (RPC retransmissions, reissued SCSI commands)."""
        raise NotImplementedError

    def sock_name(self) -> str:
        """The transport's socket, as the report names it."""
        raise NotImplementedError

    def _sock_desc(self, plain: str) -> str:
        sk = self.sock
        if sk is None:
            return plain
        return f"{sk.proto} {sk.local_str()} -> {sk.peer_str()}{' SOCK_MEMALLOC' if sk.memalloc else ''}"


